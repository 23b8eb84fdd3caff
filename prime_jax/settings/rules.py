"""The rules of each config key, and the readers `resolve` uses: the first broken rule raises a one-line
`ConfigError("config.<key>: ...")`."""

from __future__ import annotations

import math
from typing import Any, NoReturn

import ml_collections

from prime_jax import paths
from prime_jax.models.config import CONFIG_ATTENTION, LAYER_LOOPS, REMAT_SAVES
from prime_jax.rl.advantages import check_advantage_args
from prime_jax.rl.packing import LAYOUTS
from prime_jax.rl.ppo import AGGREGATIONS
from prime_jax.rl.prm import GRANULARITIES, NORM_SCOPES, UPDATE_MODES

SOURCES = ("files", "tfds", "synthetic")
DTYPES = ("float32", "bfloat16", "float16")
ON_OFF_AUTO = ("auto", "on", "off")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # any one makes a tokenizer dir


class ConfigError(ValueError):
    """A bad config value: the message is one line, `config.<key>: what is wrong`."""


def _fail(key: str, msg: str) -> NoReturn:
    raise ConfigError(f"config.{key}: {msg}")


def _positive_int(c: ml_collections.ConfigDict, key: str, minimum: int = 1, note: str = "") -> int:
    value = _get(c, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, f"must be an integer >= {minimum}{note}, got {value!r}")
    return value


def _number(c: ml_collections.ConfigDict, key: str, lo: float | None = None, hi: float | None = None, *,
            lo_open: bool = False, note: str = "") -> float:
    value = _get(c, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        bounds = " and ".join(b for b in ((f"> {lo}" if lo_open else f">= {lo}") if lo is not None else "",
                                          f"<= {hi}" if hi is not None else "") if b)
        _fail(key, f"must be a finite number{' ' + bounds if bounds else ''}{note}, got {value!r}")
    return float(value)


def _choice(c: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]) -> str:
    value = _get(c, key)
    if value not in choices:
        _fail(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _flag(c: ml_collections.ConfigDict, key: str) -> bool:
    value = _get(c, key)
    if not isinstance(value, bool):
        _fail(key, f"must be True or False, got {value!r}")
    return value


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
    node = c
    for part in key.split("."):
        if part not in node:
            _fail(key, "missing (start the config from prime_jax.config.base_config())")
        node = node[part]
    return node


def _globs(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in text.split(",") if g.strip())


def mesh_axes(c: ml_collections.ConfigDict) -> dict[str, int]:
    """`mesh.*`: axis name -> size (-1: the remaining devices)."""
    for key, value in c.mesh.items():
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            _fail(f"mesh.{key}", f"must be a positive integer or -1, got {value!r}")
    return dict(c.mesh)


def wants_distributed(c: ml_collections.ConfigDict) -> bool:
    """`distributed`: join the multi-host runtime before the mesh is built."""
    return _flag(c, "distributed")


def check(c: ml_collections.ConfigDict) -> None:
    """The rules that need no devices and no files: run first, so a bad value fails in a second."""
    _check_values(c)


def _check_values(c: ml_collections.ConfigDict) -> None:
    """Every per-key rule and every rule between keys that needs no devices; the first broken one raises."""
    _positive_int(c, "seed", 0)
    if not isinstance(c.workdir, str) or not c.workdir:
        _fail("workdir", f"must be a non-empty path (local or gs://), got {c.workdir!r}")
    _positive_int(c, "total_steps")
    _flag(c, "dry_run")
    _flag(c, "distributed")
    mesh_axes(c)

    source = _choice(c, "data.source", SOURCES)
    if source == "files" and not _globs(c.data.train_files):
        _fail("data.train_files", "empty; give JSONL/Parquet globs (or data.source=synthetic|tfds)")
    if source == "tfds" and not c.data.tfds_dir:
        _fail("data.tfds_dir", "empty while data.source=tfds")
    if source == "tfds" and paths.is_remote(c.data.tfds_dir):
        _fail("data.tfds_dir", f"{c.data.tfds_dir} is remote; its array_record files are read from local disk only: "
                               f"stage it first (gcloud storage cp -r {c.data.tfds_dir} /local/dir) and pass the "
                               "local directory, or read Parquet from the bucket (data.source=files)")
    if source != "synthetic" and not c.model.path:
        _fail("model.path", "empty; give a local (or gs://) Hugging Face model directory")
    _positive_int(c, "data.max_prompt_length")
    _positive_int(c, "data.max_val_prompts", 0, " (0: all)")
    for key in ("train_size", "val_size", "difficulty", "vocab_size"):
        _positive_int(c, f"synthetic.{key}")
    _number(c, "synthetic.math_frac", 0, 1)
    if not isinstance(c.synthetic.max_operand, int) or c.synthetic.max_operand < 0 or c.synthetic.max_operand == 1:
        _fail("synthetic.max_operand", f"must be 0 (grow with difficulty) or >= 2, got {c.synthetic.max_operand!r}")
    _flag(c, "synthetic.code_steps")

    for key in ("param_dtype", "ref_dtype", "compute_dtype"):
        _choice(c, f"model.{key}", DTYPES)
    _choice(c, "model.attention", ("auto", *CONFIG_ATTENTION))
    _flag(c, "model.remat")
    _choice(c, "model.remat_saves", REMAT_SAVES)
    _choice(c, "model.layers", LAYER_LOOPS)
    _positive_int(c, "model.logits_chunk")

    n = _positive_int(c, "rollout.n_samples")
    _number(c, "rollout.temperature", 0, note=" (0: greedy)")
    _number(c, "rollout.top_p", 0, 1, lo_open=True)
    _positive_int(c, "rollout.top_k", 0, " (0: off)")
    r_len = _positive_int(c, "rollout.max_response_length")
    _positive_int(c, "rollout.prompts_per_call", 0, " (0: train.batch_size)")
    _positive_int(c, "rollout.steps_per_sync")
    _positive_int(c, "rollout.kv_block")
    _number(c, "rollout.kv_cache_gib", 0, note=" (0: unchecked)")
    _flag(c, "rollout.gather_params")
    _choice(c, "rollout.compact_tail", ON_OFF_AUTO)
    if _positive_int(c, "rollout.max_staleness", 0, " (0: synchronous)") and _flag(c, "distributed"):
        _fail("rollout.max_staleness", "rollouts ahead of training run in one process only (distributed=True); "
                                       "use 0 on multi-host runs")
    _positive_int(c, "rollout.devices", 0, " (0: the sampler shares the training mesh)")

    _positive_int(c, "train.batch_size")
    _flag(c, "train.filter_accuracy")
    lo, hi = _number(c, "train.accuracy_lower_bound", 0, 1), _number(c, "train.accuracy_upper_bound", 0, 1)
    if lo > hi:
        _fail("train.accuracy_lower_bound", f"{lo} is above train.accuracy_upper_bound={hi}")
    _flag(c, "train.filter_truncated")
    _positive_int(c, "train.max_rounds")
    _positive_int(c, "train.max_nonfinite_steps")
    packing = _choice(c, "train.layout", LAYOUTS) == "packed"
    pack_length = _positive_int(c, "train.pack_length", 0, " (0: the longest sequence)")
    longest = c.data.max_prompt_length + r_len
    if packing and 0 < pack_length < longest:
        _fail("train.pack_length", f"{pack_length} is shorter than the longest sequence, data.max_prompt_length + "
                                   f"rollout.max_response_length = {longest}")

    a = c.algorithm
    gamma_process = _number(c, "algorithm.gamma_process", 0, 1)
    try:  # the estimator's own rules (rl.advantages), named by their config keys
        check_advantage_args(n=n, estimator=a.adv_estimator, rloo_formula=a.process_formula,
                             process_credit=a.process_credit, gamma_process=gamma_process)
    except ValueError as e:
        arg, _, rest = str(e).partition(": ")
        key = {"estimator": "algorithm.adv_estimator", "n": "rollout.n_samples", "rloo_formula":
               "algorithm.process_formula", "process_credit": "algorithm.process_credit",
               "gamma_process": "algorithm.gamma_process"}[arg.split("=")[0]]
        _fail(key, f"{arg.split('=', 1)[1]} {rest}")
    _number(c, "algorithm.gamma_outcome", 0, 1)
    for key in ("process_coef", "rm_coef", "verifier_coef"):
        _number(c, f"algorithm.{key}")

    for section in ("actor", "prm"):
        _number(c, f"{section}.lr", 0)
        _number(c, f"{section}.weight_decay", 0)
        _number(c, f"{section}.grad_clip", 0, lo_open=True)
        _positive_int(c, f"{section}.mini_batch_size")
        _positive_int(c, f"{section}.micro_batch_size")
        tokens = _positive_int(c, f"{section}.micro_batch_tokens", 0, " (0: micro_batch_size full rows)")
        if packing and 0 < tokens < (pack_length or longest):
            _fail(f"{section}.micro_batch_tokens", f"{tokens} is smaller than the longest sequence "
                                                   f"(train.pack_length={pack_length or longest})")
        _flag(c, f"{section}.zero_lr_first_iteration")
        _positive_int(c, f"{section}.warmup_steps", 0)
    _number(c, "actor.clip_ratio", 0, 1, lo_open=True)
    _number(c, "actor.clip_ratio_high", 0, note=" (0: actor.clip_ratio)")
    _positive_int(c, "actor.ppo_epochs")
    _number(c, "actor.entropy_coeff", 0)
    _choice(c, "actor.loss_agg", AGGREGATIONS)
    _number(c, "prm.beta", 0, lo_open=True)
    _choice(c, "prm.update_mode", UPDATE_MODES)
    _flag(c, "prm.shuffle_labels")
    _choice(c, "prm.granularity", GRANULARITIES)
    _flag(c, "prm.include_eos")
    _choice(c, "prm.norm_scope", NORM_SCOPES)

    _positive_int(c, "verifier.num_workers")
    _number(c, "verifier.item_timeout_s", 0, lo_open=True)
    _number(c, "verifier.batch_timeout_s", 0, lo_open=True)
    _flag(c, "verifier.literal_numbers")
    _flag(c, "verifier.allow_unsandboxed")

    _positive_int(c, "eval.freq")
    _flag(c, "eval.before_train")
    _positive_int(c, "eval.max_response_length", 0, " (0: rollout.max_response_length)")
    _positive_int(c, "eval.batch_size")
    _positive_int(c, "eval.k")
    _number(c, "eval.temperature", 0, note=" (0: greedy)")

    _positive_int(c, "checkpoint.freq")
    _positive_int(c, "checkpoint.keep")
    _flag(c, "checkpoint.export_hf")
    _flag(c, "log.tensorboard")
    _flag(c, "log.plot")
    if not isinstance(c.log.wandb_project, str):
        _fail("log.wandb_project", f"must be a string (empty: off), got {c.log.wandb_project!r}")

    _positive_int(c, "warm_start.steps", 0, " (0: no warm start)")
    for key in ("batch_size", "num_examples"):
        _positive_int(c, f"warm_start.{key}")
    _number(c, "warm_start.lr", 0, lo_open=True)

    _number(c, "length_mix.prompt_tokens", 0, note=" (0: at the limit)")
    _number(c, "length_mix.response_tokens", 0, note=" (0: at the limit)")
    _number(c, "length_mix.clipped_fraction", 0, 1)
