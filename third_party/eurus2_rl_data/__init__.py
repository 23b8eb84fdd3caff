"""Eurus-2-RL-Data as a TFDS dataset (array_record, prepared and read without TensorFlow)."""
