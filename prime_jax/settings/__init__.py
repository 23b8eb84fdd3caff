"""Run settings: a config resolved once into a frozen tree of typed settings (`tree.py`), by the rules in `rules.py`.

`resolve(config, mesh, arch)` is the only code that reads config keys (`prime_jax/config.py` defines them). It
checks every rule once, before anything is loaded or compiled, and raises `ConfigError("config.<key>: ...")`
naming a key that exists in `base_config()`. Programs, trainer, AOT, memory plan, preflight and evaluation
take the `RunSettings` it returns; the config itself is never changed after it.

Two kinds of values come out: the config's own (paths, dtypes, knobs), and what follows from them on this
mesh and architecture (rows per step, prompts in flight, the sampler layouts, pack lengths, the attention
kernel). The tokenizer's stop and pad ids are not known here; `Programs` adds them to the sampler settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from prime_jax import paths
from prime_jax.mesh import data_parallel_size, make_mesh
from prime_jax.models import ModelConfig, read_hf_config, resolve_attention, scan_layers_for
from prime_jax.rl.collect import CollectConfig
from prime_jax.rl.optim import OptimConfig
from prime_jax.rl.packing import PackSpec
from prime_jax.rl.ppo import PpoStepConfig
from prime_jax.rl.prm import PrmStepConfig
from prime_jax.sampling import (SamplerConfig, SamplingParams, compacts_tail, length_buckets, per_layer_decode,
                                refills_on_device, rows_in_flight)
from prime_jax.settings.rules import (TOKENIZER_FILES, ConfigError, _check_values, _fail, _globs, _positive_int,
                                      check, mesh_axes, wants_distributed)
from prime_jax.settings.tree import (AdvantageSettings, DataSettings, EvalSettings, ExperimentSettings, LengthMix,
                                     ModelSettings, RunSettings, SyntheticSettings, VerifierSettings,
                                     WarmStartSettings, describe)


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


# The sampler's own mesh (rollout.devices > 0): weights split over one fsdp axis, rows over its devices.
SAMPLER_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def meshes(c: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> tuple[Mesh, Mesh]:
    """(training mesh, sampler mesh) over `devices` (default: every device; the AOT tool passes a TPU slice's): the
    first `rollout.devices` sample on a mesh of their own (one fsdp axis), the rest train on `mesh.*`; with
    rollout.devices=0 the sampler shares the training mesh (the same object)."""
    devices, split = list(jax.devices() if devices is None else devices), c.rollout.devices
    if split >= len(devices):
        _fail("rollout.devices", f"{split} leaves none of the {len(devices)} devices to train")
    try:
        mesh = make_mesh(mesh_axes(c), devices[split:])
    except ValueError as e:
        _fail("mesh", f"{e} (after rollout.devices={split} went to the sampler)" if split else str(e))
    return mesh, make_mesh(SAMPLER_MESH, devices[:split]) if split else mesh


def resolve(c: ml_collections.ConfigDict, mesh: Mesh | None = None, arch: ModelConfig | None = None, *,
            rollout_mesh: Mesh | None = None) -> RunSettings:
    """The run's settings on training mesh `mesh` and sampler mesh `rollout_mesh` (default: both from `mesh.*` and
    `rollout.devices` over every device; a given `mesh` alone is also the sampler's) for architecture `arch`
    (default: `read_architecture`). Raises ConfigError naming the first bad key."""
    _check_values(c)
    if mesh is None:
        mesh, rollout_mesh = meshes(c)
    elif rollout_mesh is None:
        if c.rollout.devices:
            _fail("rollout.devices", "a sampler mesh of its own needs the sampler's devices too (resolve's rollout_mesh)")
        rollout_mesh = mesh
    arch = arch or read_architecture(c)
    dp, sampler_dp = data_parallel_size(mesh), data_parallel_size(rollout_mesh)
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
        remat_saves=m.remat_saves, scan_layers=scan_layers_for(m.layers, platform),
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
                        include_eos=p.include_eos, granularity=p.granularity, shuffle_labels=p.shuffle_labels)
    ppo = PpoStepConfig(mini_batch_size=ac.mini_batch_size, micro_batch_size=ac.micro_batch_size,
                        epochs=ac.ppo_epochs, clip=ac.clip_ratio, clip_high=ac.clip_ratio_high or None,
                        agg=ac.loss_agg, entropy_coef=ac.entropy_coeff, temperature=r.temperature or 1.0)
    pack_length = t.pack_length or d.max_prompt_length + r.max_response_length

    def pack(section: str) -> PackSpec:
        s = c[section]
        tokens = s.micro_batch_tokens or s.micro_batch_size * pack_length
        if t.layout == "packed" and tokens % (pack_length * dp):
            _fail(f"{section}.micro_batch_tokens", f"{tokens} is not a multiple of train.pack_length={pack_length} "
                                                   f"times the data-parallel size {dp}")
        return PackSpec(section, mini_batch_size=s.mini_batch_size, micro_batch_size=s.micro_batch_size,
                        data_parallel=dp, layout=t.layout, row_length=pack_length, micro_batch_tokens=tokens)

    def optim(section: str) -> OptimConfig:
        s = c[section]
        return OptimConfig(lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                           warmup_iterations=s.warmup_steps, zero_lr_first_iteration=s.zero_lr_first_iteration)

    prompts_per_call = min(r.prompts_per_call or t.batch_size, t.batch_size)
    sampler = SamplerConfig(
        n=n, max_new_tokens=r.max_response_length,
        sampling=SamplingParams(temperature=float(r.temperature), top_p=float(r.top_p), top_k=int(r.top_k)),
        rows=rows_in_flight(prompts_per_call, prompts_per_call, n, sampler_dp),
        buckets=length_buckets(d.max_prompt_length), steps_per_sync=r.steps_per_sync, kv_block=r.kv_block,
        data_parallel=sampler_dp, gather_params=r.gather_params, per_layer=per_layer_decode(platform),
        compact_tail=compacts_tail(platform) if r.compact_tail == "auto" else r.compact_tail == "on",
        refill=refills_on_device(platform, sampler_dp))
    if r.kv_cache_gib:
        per_device = sampler.cache_bytes(arch.replace(dtype=m.compute_dtype), d.max_prompt_length) / sampler_dp / 2**30
        if per_device > r.kv_cache_gib:
            _fail("rollout.prompts_per_call", f"{sampler.rows} rows in flight ({prompts_per_call} prompts x {n}) need "
                                              f"a {per_device:.2f} GiB/device KV cache, above "
                                              f"rollout.kv_cache_gib={r.kv_cache_gib}")

    mix = c.length_mix
    return RunSettings(
        seed=c.seed, workdir=c.workdir, total_steps=c.total_steps, dry_run=c.dry_run, mesh=mesh,
        rollout_mesh=rollout_mesh, max_staleness=r.max_staleness, model=model,
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
        max_nonfinite_steps=t.max_nonfinite_steps,
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


def resolve_experiment(c: ml_collections.ConfigDict, known_arms: tuple[str, ...]) -> ExperimentSettings:
    """The experiment's own keys (`compare.*`), checked; each arm's run config is then resolved by `resolve`."""
    if "compare" not in c:
        _fail("compare", "missing: start from configs/compare.py")
    def arm_list(key: str, allow_empty: bool) -> tuple[str, ...]:
        arms = _globs(c.compare[key])
        if not arms and not allow_empty:
            _fail(f"compare.{key}", "empty")
        for arm in arms:
            if arm not in known_arms:
                _fail(f"compare.{key}", f"{arm!r} is not one of {', '.join(known_arms)}")
        return arms

    def seed_list(key: str) -> tuple[int, ...]:
        try:
            seeds = tuple(int(x) for x in _globs(c.compare[key]))
        except ValueError:
            _fail(f"compare.{key}", f"must be comma-separated integers, got {c.compare[key]!r}")
        if not seeds:
            _fail(f"compare.{key}", "empty")
        return seeds

    arms, ablations = arm_list("arms", False), arm_list("ablations", True)
    if set(arms) & set(ablations):
        _fail("compare.ablations", f"{sorted(set(arms) & set(ablations))} also in compare.arms")
    base = ml_collections.ConfigDict(c.to_dict())
    del base["compare"]
    _check_values(base)
    return ExperimentSettings(arms, seed_list("seeds"), ablations, seed_list("ablation_seeds"),
                              _positive_int(c, "compare.heldout_seed", 0), c.compare.out_dir, c.compare.name,
                              c.workdir, base)


__all__ = ["AdvantageSettings", "ConfigError", "DataSettings", "EvalSettings", "ExperimentSettings", "LengthMix",
           "ModelSettings",
           "RunSettings", "SyntheticSettings", "VerifierSettings", "WarmStartSettings", "check", "check_paths", "describe",
           "mesh_axes", "meshes", "read_architecture", "resolve", "resolve_experiment", "wants_distributed"]
