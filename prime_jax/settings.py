"""Run settings: a config resolved once into a frozen tree of typed settings.

`resolve(config, mesh, arch)` is the only code that reads config keys (`prime_jax/config.py` defines them). It
checks every rule once, before anything is loaded or compiled, and raises `ConfigError("config.<key>: ...")`
naming a key that exists in `base_config()`. Programs, trainer, AOT, memory plan, preflight and evaluation
take the `RunSettings` it returns; the config itself is never changed after it.

Two kinds of values come out: the config's own (paths, dtypes, knobs), and what follows from them on this
mesh and architecture (rows per step, prompts in flight, the sampler layouts, pack lengths, the attention
kernel). The tokenizer's stop and pad ids are not known here; `Programs` adds them to the sampler settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NoReturn

import ml_collections
from jax.sharding import Mesh

from prime_jax import paths
from prime_jax.mesh import data_parallel_size, make_mesh
from prime_jax.models import ModelConfig, read_hf_config, resolve_attention
from prime_jax.models.config import CONFIG_ATTENTION
from prime_jax.rl.advantages import check_advantage_args
from prime_jax.rl.collect import CollectConfig
from prime_jax.rl.optim import OptimConfig
from prime_jax.rl.packing import PackSpec
from prime_jax.rl.ppo import AGGREGATIONS, PpoStepConfig
from prime_jax.rl.prm import GRANULARITIES, NORM_SCOPES, UPDATE_MODES, PrmStepConfig
from prime_jax.sampling import (SamplerConfig, SamplingParams, compacts_tail, length_buckets, per_layer_decode,
                                refills_on_device, rows_in_flight)

SOURCES = ("files", "tfds", "synthetic")
DTYPES = ("float32", "bfloat16", "float16")
ON_OFF_AUTO = ("auto", "on", "off")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # any one makes a tokenizer dir


class ConfigError(ValueError):
    """A bad config value: the message is one line, `config.<key>: what is wrong`."""


def _fail(key: str, msg: str) -> NoReturn:
    raise ConfigError(f"config.{key}: {msg}")


# --- the settings tree -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Where the three models come from and how they compute. `arch`: the policy's architecture (from
    `path`/config.json, `model.arch`, or the built-in run's `warm_start.arch` before its warm start)."""

    path: str
    prm_path: str
    ref_path: str
    tokenizer: str
    param_dtype: str
    ref_dtype: str
    compute_dtype: str
    remat: bool
    logits_chunk: int
    attention: str  # resolved for the mesh's platform
    arch: ModelConfig

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `load_pretrained` besides the path and dtype."""
        return dict(compute_dtype=self.compute_dtype, remat=self.remat, logits_chunk=self.logits_chunk,
                    attention=self.attention)

    def config(self, param_dtype: str) -> ModelConfig:
        """The architecture with this run's dtypes and memory knobs, as `load_pretrained` builds it."""
        return self.arch.replace(param_dtype=param_dtype, dtype=self.compute_dtype, remat=self.remat,
                                 logits_chunk=self.logits_chunk, attention=self.attention)


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    train_size: int
    val_size: int
    math_frac: float
    difficulty: int
    max_operand: int
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class DataSettings:
    source: str                      # files | tfds | synthetic
    train_files: tuple[str, ...]     # JSONL/Parquet globs
    val_files: tuple[str, ...]
    tfds_dir: str
    max_prompt_length: int
    max_val_prompts: int             # 0: all
    synthetic: SyntheticSettings


@dataclasses.dataclass(frozen=True)
class WarmStartSettings:
    """The built-in run's supervised warm start; `needed` when the run has no model of its own and the warm-start
    model is not in `settings.model.path` yet."""

    needed: bool
    steps: int
    batch_size: int
    lr: float
    num_examples: int
    arch: Mapping[str, Any]          # ModelConfig fields of the model to initialise


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
    """`rl.advantages.compute_advantages` keyword arguments, and the logging-only reward weights."""

    n: int
    estimator: str
    gamma_process: float
    gamma_outcome: float
    process_coef: float
    rloo_formula: str
    process_credit: str
    rm_coef: float
    verifier_coef: float

    def kwargs(self) -> dict[str, Any]:
        return dict(n=self.n, estimator=self.estimator, gamma_process=self.gamma_process,
                    gamma_outcome=self.gamma_outcome, process_coef=self.process_coef, rloo_formula=self.rloo_formula,
                    process_credit=self.process_credit)


@dataclasses.dataclass(frozen=True)
class VerifierSettings:
    """`verifiers.pool.VerifierPool` keyword arguments."""

    num_workers: int
    item_timeout_s: float
    batch_timeout_s: float
    literal_numbers: bool
    allow_unsandboxed: bool


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Periodic validation: avg@k at `temperature` (0: greedy), responses up to `max_response_length`."""

    freq: int
    before_train: bool
    max_response_length: int
    batch_size: int
    k: int
    temperature: float


@dataclasses.dataclass(frozen=True)
class LengthMix:
    """Mean prompt and response tokens of a step and the fraction of responses cut at the response limit (for
    the AOT whole-step roofline); 0 in the config means "at the limit", a mean above its limit counts as it."""

    prompt_tokens: float
    response_tokens: float
    clipped_fraction: float

    def describe(self) -> str:
        return (f"prompt {self.prompt_tokens:g} + response {self.response_tokens:g} tokens on average, "
                f"{100 * self.clipped_fraction:g}% of responses at the limit")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a run reads from its config, typed and checked. `sampler` lacks the tokenizer's stop and pad ids
    (`Programs` adds them); `eval_sampler(...)` gives validation's sampler with the same knobs."""

    seed: int
    workdir: str
    total_steps: int
    dry_run: bool
    mesh: Mesh
    model: ModelSettings
    data: DataSettings
    warm_start: WarmStartSettings
    collect: CollectConfig
    sampler: SamplerConfig
    prompts_per_call: int            # prompts in flight in the training sampler
    advantages: AdvantageSettings
    prm: PrmStepConfig
    prm_optim: OptimConfig
    prm_pack: PackSpec
    runs_prm: bool                   # False for outcome-only RL: no PRM pass at all
    ppo: PpoStepConfig
    actor_optim: OptimConfig
    ppo_pack: PackSpec
    verifier: VerifierSettings
    eval: EvalSettings
    checkpoint_freq: int
    checkpoint_keep: int
    export_hf: bool
    tensorboard: bool
    wandb_project: str
    plot: bool
    length_mix: LengthMix
    config: Mapping[str, Any]        # the resolved config as a plain dict, for logging only

    @property
    def rows_per_step(self) -> int:
        """Responses a step trains on: train.batch_size x rollout.n_samples."""
        return self.collect.batch_size * self.collect.n

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def sampler_config(self, *, n: int, max_new_tokens: int, prompts: int, buckets: tuple[int, ...],
                       sampling: SamplingParams, pad_id: int) -> SamplerConfig:
        """A sampler of `prompts` x n rows in flight with the training sampler's layout knobs (steps per sync, KV
        block, gathered params, tail compaction, refill) on this mesh."""
        dp, s = data_parallel_size(self.mesh), self.sampler
        return dataclasses.replace(s, n=n, max_new_tokens=max_new_tokens, sampling=sampling, buckets=buckets,
                                   rows=rows_in_flight(prompts, prompts, n, dp), pad_id=pad_id)


# --- reading the config ------------------------------------------------------------------------------------

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


def read_architecture(c: ml_collections.ConfigDict) -> ModelConfig:
    """The policy architecture: `model.path`/config.json when the path is given, else the config's inline
    `model.arch`, else (the built-in synthetic run, before its warm start) `warm_start.arch` at the synthetic
    vocabulary. Without any: a ConfigError naming model.path."""
    path = c.model.path or (_sft_dir(c) if _builtin(c) else "")
    if path and (paths.path(path) / "config.json").exists():
        return read_hf_config(path)
    if c.model.path and not c.model.arch:
        _fail("model.path", f"no config.json in {c.model.path!r}: give a Hugging Face model directory "
                            "(config.json, *.safetensors, tokenizer)")
    if c.model.arch:
        try:
            return ModelConfig.from_hf(c.model.arch.to_dict())
        except (TypeError, ValueError, KeyError) as e:
            _fail("model.arch", f"not a usable config.json dict: {e}")
    if _builtin(c) and c.warm_start.arch:
        try:
            return ModelConfig(model_type="qwen2", vocab_size=c.synthetic.vocab_size, attention_bias=True,
                               **c.warm_start.arch.to_dict())
        except (TypeError, ValueError) as e:
            _fail("warm_start.arch", f"not a usable ModelConfig: {e}")
    _fail("model.path", "empty; give a local (or gs://) Hugging Face model directory")


def _builtin(c: ml_collections.ConfigDict) -> bool:
    """The built-in run: synthetic data and no model of its own (the warm start makes one)."""
    return c.data.source == "synthetic" and not c.model.path


def _sft_dir(c: ml_collections.ConfigDict) -> str:
    return paths.join(c.workdir, "sft")


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


def resolve(c: ml_collections.ConfigDict, mesh: Mesh | None = None, arch: ModelConfig | None = None) -> RunSettings:
    """The run's settings on `mesh` (default: `mesh.*` over every device) for architecture `arch` (default:
    `read_architecture`). Raises ConfigError naming the first bad key."""
    _check_values(c)
    if mesh is None:
        try:
            mesh = make_mesh(mesh_axes(c))
        except ValueError as e:
            _fail("mesh", str(e))
    arch = arch or read_architecture(c)
    dp = data_parallel_size(mesh)
    platform = mesh.devices.flat[0].platform
    m, d, r, t, a, ac, p, e = c.model, c.data, c.rollout, c.train, c.algorithm, c.actor, c.prm, c.eval
    n = r.n_samples
    rows = t.batch_size * n
    builtin = _builtin(c)

    try:
        attention = resolve_attention(m.attention, platform, m.compute_dtype)
    except ValueError as err:
        _fail("model.attention", str(err).split(": ", 1)[-1])
    model_path = m.path or _sft_dir(c)
    model = ModelSettings(
        path=model_path, prm_path=m.prm_path or model_path, ref_path=m.ref_path or model_path,
        tokenizer=m.tokenizer or (paths.join(model_path, "tokenizer.model") if builtin else model_path),
        param_dtype=m.param_dtype, ref_dtype=m.ref_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
        logits_chunk=m.logits_chunk, attention=attention, arch=arch)

    needed = builtin and not (paths.path(model_path) / "config.json").exists()
    if rows % dp:
        _fail("train.batch_size", f"{rows} rows per step (x rollout.n_samples) do not split over the {dp}-way "
                                  "data-parallel mesh")
    for section in ("actor", "prm"):
        mini, micro = c[section].mini_batch_size, c[section].micro_batch_size
        if rows % mini:
            _fail(f"{section}.mini_batch_size", f"{mini} does not divide the {rows} rows of a step "
                                                "(train.batch_size x rollout.n_samples)")
        if mini % micro:
            _fail(f"{section}.micro_batch_size", f"{micro} does not divide {section}.mini_batch_size={mini}")
        if micro % dp:
            _fail(f"{section}.micro_batch_size", f"{micro} is not divisible by the data-parallel size {dp} "
                                                 f"of mesh {dict(mesh.shape)}")

    num_shards = dp if p.norm_scope == "shard" else 1
    if p.mini_batch_size % num_shards:
        _fail("prm.norm_scope", f"'shard' splits each PRM mini-batch over the {dp} data shards, which does not "
                                f"divide prm.mini_batch_size={p.mini_batch_size}")
    prm = PrmStepConfig(n=n, mini_batch_size=p.mini_batch_size, micro_batch_size=p.micro_batch_size, beta=p.beta,
                        update=p.update_mode, norm_scope=p.norm_scope, num_shards=num_shards,
                        include_eos=p.include_eos, granularity=p.granularity)
    ppo = PpoStepConfig(mini_batch_size=ac.mini_batch_size, micro_batch_size=ac.micro_batch_size,
                        epochs=ac.ppo_epochs, clip=ac.clip_ratio, clip_high=ac.clip_ratio_high or None,
                        agg=ac.loss_agg, entropy_coef=ac.entropy_coeff, temperature=r.temperature or 1.0)
    pack_length = t.pack_length or d.max_prompt_length + r.max_response_length

    def pack(section: str) -> PackSpec:
        s = c[section]
        tokens = s.micro_batch_tokens or s.micro_batch_size * pack_length
        if t.packing and tokens % (pack_length * dp):
            _fail(f"{section}.micro_batch_tokens", f"{tokens} is not a multiple of train.pack_length={pack_length} "
                                                   f"times the data-parallel size {dp}")
        return PackSpec(section, mini_batch_size=s.mini_batch_size, micro_batch_size=s.micro_batch_size,
                        data_parallel=dp, packed=t.packing, row_length=pack_length, micro_batch_tokens=tokens)

    def optim(section: str) -> OptimConfig:
        s = c[section]
        return OptimConfig(lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                           warmup_iterations=s.warmup_steps, zero_lr_first_iteration=s.zero_lr_first_iteration)

    prompts_per_call = min(r.prompts_per_call or t.batch_size, t.batch_size)
    sampler = SamplerConfig(
        n=n, max_new_tokens=r.max_response_length,
        sampling=SamplingParams(temperature=float(r.temperature), top_p=float(r.top_p), top_k=int(r.top_k)),
        rows=rows_in_flight(prompts_per_call, prompts_per_call, n, dp), buckets=length_buckets(d.max_prompt_length),
        steps_per_sync=r.steps_per_sync, kv_block=r.kv_block, data_parallel=dp, gather_params=r.gather_params,
        per_layer=per_layer_decode(platform),
        compact_tail=compacts_tail(platform) if r.compact_tail == "auto" else r.compact_tail == "on",
        refill=refills_on_device(platform, dp))
    if r.kv_cache_gib:
        per_device = sampler.cache_bytes(arch.replace(dtype=m.compute_dtype), d.max_prompt_length) / dp / 2**30
        if per_device > r.kv_cache_gib:
            _fail("rollout.prompts_per_call", f"{sampler.rows} rows in flight ({prompts_per_call} prompts x {n}) need "
                                              f"a {per_device:.2f} GiB/device KV cache, above "
                                              f"rollout.kv_cache_gib={r.kv_cache_gib}")

    mix = c.length_mix
    return RunSettings(
        seed=c.seed, workdir=c.workdir, total_steps=c.total_steps, dry_run=c.dry_run, mesh=mesh, model=model,
        data=DataSettings(source=d.source, train_files=_globs(d.train_files), val_files=_globs(d.val_files),
                          tfds_dir=d.tfds_dir, max_prompt_length=d.max_prompt_length,
                          max_val_prompts=d.max_val_prompts, synthetic=SyntheticSettings(**c.synthetic.to_dict())),
        warm_start=WarmStartSettings(
            needed=needed, steps=c.warm_start.steps,
            batch_size=c.warm_start.batch_size, lr=c.warm_start.lr, num_examples=c.warm_start.num_examples,
            arch=c.warm_start.arch.to_dict()),
        collect=CollectConfig(batch_size=t.batch_size, n=n, filter_accuracy=t.filter_accuracy,
                              lower=t.accuracy_lower_bound, upper=t.accuracy_upper_bound,
                              filter_truncated=t.filter_truncated, max_rounds=t.max_rounds),
        sampler=sampler, prompts_per_call=prompts_per_call,
        advantages=AdvantageSettings(n=n, estimator=a.adv_estimator, gamma_process=a.gamma_process,
                                     gamma_outcome=a.gamma_outcome, process_coef=a.process_coef,
                                     rloo_formula=a.process_formula, process_credit=a.process_credit,
                                     rm_coef=a.rm_coef, verifier_coef=a.verifier_coef),
        prm=prm, prm_optim=optim("prm"), prm_pack=pack("prm"),
        runs_prm=a.process_coef != 0 or p.update_mode != "none",
        ppo=ppo, actor_optim=optim("actor"), ppo_pack=pack("actor"),
        verifier=VerifierSettings(**c.verifier.to_dict()),
        eval=EvalSettings(freq=e.freq, before_train=e.before_train,
                          max_response_length=e.max_response_length or r.max_response_length, batch_size=e.batch_size,
                          k=e.k, temperature=e.temperature),
        checkpoint_freq=c.checkpoint.freq, checkpoint_keep=c.checkpoint.keep, export_hf=c.checkpoint.export_hf,
        tensorboard=c.log.tensorboard, wandb_project=c.log.wandb_project, plot=c.log.plot,
        length_mix=LengthMix(min(mix.prompt_tokens or d.max_prompt_length, d.max_prompt_length),
                             min(mix.response_tokens or r.max_response_length, r.max_response_length),
                             mix.clipped_fraction),
        config=c.to_dict())


def check_paths(s: RunSettings) -> None:
    """The models and tokenizer the run will load exist (before anything is loaded): a ConfigError naming the key.
    Not part of `resolve`: dry runs and ahead-of-time compiles need only the architecture."""
    if s.warm_start.needed:
        return
    named = {k: v for k, v in s.config["model"].items() if k in ("path", "prm_path", "ref_path", "tokenizer") and v}
    for key, path in (("path", s.model.path), ("prm_path", s.model.prm_path), ("ref_path", s.model.ref_path)):
        if not (paths.path(path) / "config.json").exists():
            key = key if key in named else "path"
            _fail(f"model.{key}", f"no config.json in {path!r}: give a Hugging Face model directory")
    tok = paths.path(s.model.tokenizer)
    if not (tok.is_file() or any((tok / name).exists() for name in TOKENIZER_FILES)):
        _fail("model.tokenizer" if "tokenizer" in named else "model.path",
              f"no tokenizer at {s.model.tokenizer!r}: give a Hugging Face tokenizer directory or a sentencepiece "
              ".model file")


# --- the rules ---------------------------------------------------------------------------------------------

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

    for key in ("param_dtype", "ref_dtype", "compute_dtype"):
        _choice(c, f"model.{key}", DTYPES)
    _choice(c, "model.attention", ("auto", *CONFIG_ATTENTION))
    _flag(c, "model.remat")
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

    _positive_int(c, "train.batch_size")
    _flag(c, "train.filter_accuracy")
    lo, hi = _number(c, "train.accuracy_lower_bound", 0, 1), _number(c, "train.accuracy_upper_bound", 0, 1)
    if lo > hi:
        _fail("train.accuracy_lower_bound", f"{lo} is above train.accuracy_upper_bound={hi}")
    _flag(c, "train.filter_truncated")
    _positive_int(c, "train.max_rounds")
    packing = _flag(c, "train.packing")
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


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """`compare.*` of an experiment config; `base`: the config every arm starts from (without `compare`)."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    heldout_seed: int
    out_dir: str
    name: str
    workdir: str
    base: ml_collections.ConfigDict


def resolve_experiment(c: ml_collections.ConfigDict, known_arms: tuple[str, ...]) -> ExperimentSettings:
    """The experiment's own keys (`compare.*`), checked; each arm's run config is then resolved by `resolve`."""
    if "compare" not in c:
        _fail("compare", "missing: start from configs/compare.py")
    arms = _globs(c.compare.arms)
    if not arms:
        _fail("compare.arms", "empty")
    for arm in arms:
        if arm not in known_arms:
            _fail("compare.arms", f"{arm!r} is not one of {', '.join(known_arms)}")
    try:
        seeds = tuple(int(x) for x in _globs(c.compare.seeds))
    except ValueError:
        _fail("compare.seeds", f"must be comma-separated integers, got {c.compare.seeds!r}")
    if not seeds:
        _fail("compare.seeds", "empty")
    base = ml_collections.ConfigDict(c.to_dict())
    del base["compare"]
    _check_values(base)
    return ExperimentSettings(arms, seeds, _positive_int(c, "compare.heldout_seed", 0), c.compare.out_dir,
                              c.compare.name, c.workdir, base)


def describe(s: RunSettings) -> str:
    """One line: the run's shape, for logs and dry runs."""
    return (f"{s.model.arch.model_type} {s.model.arch.num_params / 1e9:.3f}B params, mesh {dict(s.mesh.shape)}, "
            f"{s.collect.batch_size}x{s.collect.n} rollouts of {s.data.max_prompt_length}+"
            f"{s.sampler.max_new_tokens} tokens, {s.prompts_per_call} prompts per sampler call")


__all__ = ["AdvantageSettings", "ConfigError", "DataSettings", "EvalSettings", "ExperimentSettings", "LengthMix", "ModelSettings",
           "RunSettings", "SyntheticSettings", "VerifierSettings", "WarmStartSettings", "check", "check_paths", "describe",
           "mesh_axes", "read_architecture", "resolve", "resolve_experiment", "wants_distributed"]
