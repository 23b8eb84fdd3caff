"""Datasets: Eurus-2-RL-Data schema readers, prompt templates, benchmarks, synthetic tasks.

Import the submodule you need (no re-exports here, so that e.g. `synthetic` does not pull in
pyarrow, TFDS or the code verifier):
  example      `Example` (chat prompt, ability, ground truth, data source, uid)
  prompts      PRIME system prompt, math / code suffixes, `build_messages`
  eurus        Eurus-2-RL-Data schema rows from/to JSONL / Parquet, skip counts (`read_eurus`, `write_eurus`)
  tfds_reader  the prepared TFDS (array_record) dataset, read without TensorFlow (`read_tfds`)
  dataset      `PromptDataset`: templated, length-filtered, sharded, reshuffled, resumable prompt stream
  benchmarks   `load_benchmark` for MATH-500, AIME (24), AMC, Minerva, OlympiadBench, HumanEval, MBPP, LeetCode,
               LiveCodeBench v2; per-benchmark token limits, the paper's Table 1 columns
  livecodebench  LiveCodeBench release files (compressed private tests, contest-date windows)
  synthetic    `make_tasks` / `reference_solution` for the built-in CPU run; `task_chain`, a task's steps
  steps        `label_steps`: a synthetic math or code response's step lines, right / wrong / malformed
"""
