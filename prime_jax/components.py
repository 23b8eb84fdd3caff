"""Everything a PRIME run needs, built from its settings: tokenizer, data, the three models, programs, verifiers."""

from __future__ import annotations

import collections
import dataclasses
import logging

from flax import nnx

from prime_jax.data.dataset import PromptDataset
from prime_jax.data.eurus import ReadResult, read_eurus
from prime_jax.data.example import Example
from prime_jax.data.synthetic import make_tasks
from prime_jax.data.tfds_reader import read_tfds
from prime_jax.models import load_pretrained
from prime_jax.models.tokenizer import Tokenizer, load_tokenizer
from prime_jax.programs import Programs, init_states, make_programs
from prime_jax.rl.optim import TrainState
from prime_jax.settings import DataSettings, RunSettings
from prime_jax.verifiers.pool import VerifierPool

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Components:
    settings: RunSettings
    tokenizer: Tokenizer
    train_data: PromptDataset
    val_examples: list[Example]
    data_skipped: dict[str, int]
    graphdef: nnx.GraphDef
    policy: TrainState
    prm: TrainState | None           # None (and no reference) for outcome-only RL: neither is loaded
    ref_params: nnx.State | None
    programs: Programs
    pool: VerifierPool


def read_examples(d: DataSettings, seed: int, split: str) -> ReadResult:
    """Train or validation examples of the configured source, with per-reason skip counts."""
    if d.source == "synthetic":
        s = d.synthetic
        n, seed = (s.train_size, seed + 1) if split == "train" else (s.val_size, seed + 2)
        tasks = make_tasks(n, seed, math_frac=s.math_frac, difficulty=s.difficulty, max_operand=s.max_operand)
        return ReadResult(tasks, collections.Counter())
    if d.source == "tfds":
        return read_tfds(d.tfds_dir, "train" if split == "train" else "validation")
    globs = d.train_files if split == "train" else d.val_files
    return read_eurus(list(globs)) if globs else ReadResult([], collections.Counter())


def build(s: RunSettings) -> Components:
    """Loads data and the models onto the settings' mesh (policy, PRM and reference; the policy alone for
    outcome-only RL, which never runs the PRM) and builds the programs."""
    m = s.model
    tokenizer = load_tokenizer(m.tokenizer)
    train, val = read_examples(s.data, s.seed, "train"), read_examples(s.data, s.seed, "validation")
    skipped = {f"data/skipped_{k}": v for k, v in sorted((train.skipped + val.skipped).items())}
    if skipped:
        log.warning("data: skipped malformed rows: %s", skipped)
    # Every host walks the same global prompt stream (prompts are small); the rows of each generation
    # round are then split by process for verification and placed on the mesh per device. This is what
    # makes an N-host run take exactly the steps of a one-host run.
    train_data = PromptDataset(train.examples, tokenizer, max_prompt_len=s.data.max_prompt_length, seed=s.seed)
    skipped.update({f"data/skipped_{k}": v for k, v in train_data.skipped.items()})
    val_examples = val.examples[: s.data.max_val_prompts or None]

    policy = load_pretrained(m.path, mesh=s.mesh, dtype=m.param_dtype, **m.load_kwargs())
    graphdef, policy_params = nnx.split(policy)
    prm_params = ref_params = None
    if s.runs_prm:
        prm_params = nnx.state(load_pretrained(m.prm_path, mesh=s.mesh, dtype=m.param_dtype, **m.load_kwargs()))
        ref_params = nnx.state(load_pretrained(m.ref_path, mesh=s.mesh, dtype=m.ref_dtype, **m.load_kwargs()))
    policy_state, prm_state = init_states(s, policy_params, prm_params)
    programs = make_programs(s, graphdef, policy_state, prm_state, ref_params, stop_ids=tokenizer.eos_ids,
                             pad_id=tokenizer.pad_id)
    pool = VerifierPool(**dataclasses.asdict(s.verifier))
    return Components(s, tokenizer, train_data, val_examples, skipped, graphdef, policy_state, prm_state,
                      ref_params, programs, pool)
