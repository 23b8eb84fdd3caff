"""The settings tree: frozen, typed settings of a run (`RunSettings`), as `prime_jax.settings.resolve` makes them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
from jax.sharding import Mesh

from prime_jax.mesh import data_parallel_size
from prime_jax.models import ModelConfig
from prime_jax.rl.collect import CollectConfig
from prime_jax.rl.optim import OptimConfig
from prime_jax.rl.packing import PackSpec
from prime_jax.rl.ppo import PpoStepConfig
from prime_jax.rl.prm import PrmStepConfig
from prime_jax.sampling import SamplerConfig, SamplingParams, refills_on_device, rows_in_flight


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
    remat_saves: str
    scan_layers: bool  # resolved for the mesh's platform
    logits_chunk: int
    attention: str  # resolved for the mesh's platform
    arch: ModelConfig

    def _knobs(self) -> dict[str, Any]:
        """The `ModelConfig` fields this run sets besides the dtypes."""
        return dict(remat=self.remat, remat_saves=self.remat_saves, scan_layers=self.scan_layers,
                    logits_chunk=self.logits_chunk, attention=self.attention)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `load_pretrained` besides the path and dtype."""
        return dict(compute_dtype=self.compute_dtype, **self._knobs())

    def config(self, param_dtype: str) -> ModelConfig:
        """The architecture with this run's dtypes and memory knobs, as `load_pretrained` builds it."""
        return self.arch.replace(param_dtype=param_dtype, dtype=self.compute_dtype, **self._knobs())


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    train_size: int
    val_size: int
    math_frac: float
    difficulty: int
    max_operand: int
    code_steps: bool
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
    mesh: Mesh                       # policy, PRM, reference, optimiser states and every training program
    rollout_mesh: Mesh               # the training sampler's (the same mesh unless rollout.devices)
    max_staleness: int               # policy versions a step's rollouts may lag it (0: synchronous)
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
    max_nonfinite_steps: int         # consecutive steps that skipped a non-finite update before the run stops
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
        block, gathered params, tail compaction, refill) on the training mesh (validation samples there)."""
        dp, s = data_parallel_size(self.mesh), self.sampler
        return dataclasses.replace(s, n=n, max_new_tokens=max_new_tokens, sampling=sampling, buckets=buckets,
                                   rows=rows_in_flight(prompts, prompts, n, dp), pad_id=pad_id, data_parallel=dp,
                                   refill=refills_on_device(self.platform, dp))


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """`compare.*` of an experiment config: the arms on every seed, the ablations on their own (fewer) seeds; `base`:
    the config every arm starts from (without `compare`)."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    ablations: tuple[str, ...]
    ablation_seeds: tuple[int, ...]
    heldout_seed: int
    out_dir: str
    name: str
    workdir: str
    base: ml_collections.ConfigDict

    @property
    def runs(self) -> tuple[tuple[str, int], ...]:
        """(arm, seed) in run order: the arms seed by seed (a cut-short experiment still compares every arm on its
        first seeds), then the ablations seed by seed."""
        return (tuple((arm, seed) for seed in self.seeds for arm in self.arms)
                + tuple((arm, seed) for seed in self.ablation_seeds for arm in self.ablations))


def describe(s: RunSettings) -> str:
    """One line: the run's shape, for logs and dry runs."""
    return (f"{s.model.arch.model_type} {s.model.arch.num_params / 1e9:.2f}B params, mesh {dict(s.mesh.shape)}, "
            f"{s.collect.batch_size}x{s.collect.n} rollouts of {s.data.max_prompt_length}+"
            f"{s.sampler.max_new_tokens} tokens, {s.prompts_per_call} prompts per sampler call")
