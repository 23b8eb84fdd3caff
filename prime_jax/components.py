"""Everything a PRIME run needs, built from its config: mesh, tokenizer, data, the three models, programs, verifiers."""

from __future__ import annotations

import collections
import dataclasses
import logging

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from prime_jax.data.dataset import PromptDataset
from prime_jax.data.eurus import ReadResult, read_eurus
from prime_jax.data.example import Example
from prime_jax.data.synthetic import make_tasks
from prime_jax.data.tfds_reader import read_tfds
from prime_jax.mesh import make_mesh
from prime_jax.models import load_pretrained
from prime_jax.models.tokenizer import Tokenizer, load_tokenizer
from prime_jax.programs import Programs, attention_implementation, init_states, make_programs
from prime_jax.rewards.pool import VerifierPool
from prime_jax.rl.optim import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Components:
    config: ml_collections.ConfigDict
    mesh: Mesh
    tokenizer: Tokenizer
    train_data: PromptDataset
    val_examples: list[Example]
    data_skipped: dict[str, int]
    graphdef: nnx.GraphDef
    policy: TrainState
    prm: TrainState
    ref_params: nnx.State
    programs: Programs
    pool: VerifierPool


def read_examples(c: ml_collections.ConfigDict, split: str) -> ReadResult:
    """Train or validation examples of the configured source, with per-reason skip counts."""
    d = c.data
    if d.source == "synthetic":
        s = c.synthetic
        n, seed = (s.train_size, c.seed + 1) if split == "train" else (s.val_size, c.seed + 2)
        tasks = make_tasks(n, seed, math_frac=s.math_frac, difficulty=s.difficulty, max_operand=s.max_operand)
        return ReadResult(tasks, collections.Counter())
    if d.source == "tfds":
        return read_tfds(d.tfds_dir, "train" if split == "train" else "validation")
    paths = d.train_files if split == "train" else d.val_files
    return read_eurus(paths) if paths else ReadResult([], collections.Counter())


def build(c: ml_collections.ConfigDict) -> Components:
    """Loads data and models onto one mesh and builds the programs. `c.model.path` must be set."""
    mesh = make_mesh(dict(c.mesh))
    m = c.model
    tokenizer = load_tokenizer(m.tokenizer or m.path)
    train, val = read_examples(c, "train"), read_examples(c, "validation")
    skipped = {f"data/skipped_{k}": v for k, v in sorted((train.skipped + val.skipped).items())}
    if skipped:
        log.warning("data: skipped malformed rows: %s", skipped)
    # Every host walks the same global prompt stream (prompts are small); the rows of each generation
    # round are then split by process for verification and placed on the mesh per device. This is what
    # makes an N-host run take exactly the steps of a one-host run.
    train_data = PromptDataset(train.examples, tokenizer, max_prompt_len=c.data.max_prompt_length, seed=c.seed)
    skipped.update({f"data/skipped_{k}": v for k, v in train_data.skipped.items()})
    val_examples = val.examples[: c.data.max_val_prompts or None]

    arch = dict(compute_dtype=m.compute_dtype, remat=m.remat, logits_chunk=m.logits_chunk,
                attention=attention_implementation(c, mesh.devices.flat[0].platform))
    policy = load_pretrained(m.path, mesh=mesh, dtype=m.param_dtype, **arch)
    prm = load_pretrained(m.prm_path or m.path, mesh=mesh, dtype=m.param_dtype, **arch)
    ref = load_pretrained(m.ref_path or m.path, mesh=mesh, dtype=m.ref_dtype, **arch)
    graphdef, policy_params = nnx.split(policy)
    policy_state, prm_state = init_states(c, mesh, policy_params, nnx.state(prm))
    ref_params = nnx.state(ref)
    programs = make_programs(c, mesh, graphdef, policy_state, prm_state, ref_params, stop_ids=tokenizer.eos_ids,
                             pad_id=tokenizer.pad_id)
    pool = VerifierPool(c.verifier.num_workers, c.verifier.item_timeout_s, c.verifier.batch_timeout_s,
                        literal_numbers=c.verifier.literal_numbers, allow_unsandboxed=c.verifier.allow_unsandboxed)
    return Components(c, mesh, tokenizer, train_data, val_examples, skipped, graphdef, policy_state, prm_state,
                      ref_params, programs, pool)
