"""prime_jax: PRIME (Process Reinforcement through IMplicit rEwards) in JAX/Flax."""
