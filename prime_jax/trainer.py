"""The PRIME iteration (docs/design.md, docs/prime_spec.md §1): a host loop around three jitted programs.

    collect prompts -> sample n each -> decode -> verify -> online filter (+ prompt buffer)
    -> PRM kernel (token rewards, online PRM update) -> advantages -> PPO step
    -> metrics -> periodic validation -> periodic checkpoint

With `rollout.max_staleness` k >= 1 (or a sampler mesh of its own, `rollout.devices`), the first line runs in a
thread of its own, up to k steps ahead with the policy of an earlier step (`prime_jax.rl.rollouts_ahead`); each
update is then published to the sampler (`timing/publish`: the previous update's copy) and the step waits only for
what the thread has not collected yet (`timing/rollout_wait`). k = 0 on one mesh is the synchronous loop.

On a batch with synthetic math rows, the PRM's pre-update token rewards are also read back to the host for its
step-credit diagnostics (`prime_jax.rl.step_credit`: prm/step_auroc, prm/first_error_top1, ...).

An optimiser update whose loss or gradients are not finite is skipped (`prime_jax.rl.optim.make_optimizer`) and
counted: `train/skipped_nonfinite` (this step's, PRM + PPO), `train/skipped_nonfinite_total` (the run's, kept in
the optimiser states so it survives a resume); `train.max_nonfinite_steps` steps in a row that skipped one save a
checkpoint and stop the run (`NonfiniteGuard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prime_jax import paths
from prime_jax.checkpointing import Checkpointer, StopOnSignal
from prime_jax.components import Components
from prime_jax.data.example import Example
from prime_jax.eval.scoring import score_examples, summarize
from prime_jax.mesh import batch_sharding, global_to_host, host_to_global, state_shardings
from prime_jax.metrics import MetricWriter, plot_curves
from prime_jax.models import in_compute_dtype, save_pretrained
from prime_jax.rl.collect import Experience, Prompt, collect
from prime_jax.rl.optim import TrainState, layout_sharding, skipped_updates
from prime_jax.rl.prm import shuffled_labels
from prime_jax.rl.rollouts_ahead import RolloutsAhead, check_versions
from prime_jax.rl.step_credit import credit_metrics, label_rows
from prime_jax.sampling import Rollout, RowsCallback, StopCallback


class Timer:
    """Wall-clock seconds per named phase, as `timing/<name>` metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[f"timing/{name}"] = time.perf_counter() - t0


class NonfiniteGuard:
    """Counts the PRIME steps in a row that skipped a non-finite optimiser update; `limit` in a row stop the run
    (train.max_nonfinite_steps). A clean step resets the count."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"train.max_nonfinite_steps={limit}: must be >= 1")
        self.limit, self.streak = limit, 0

    def observe(self, step: int, skipped: float) -> RuntimeError | None:
        """After step `step`, which skipped `skipped` updates: None to go on, else the error that stops the run
        (the caller saves a checkpoint first, then raises it)."""
        self.streak = self.streak + 1 if skipped > 0 else 0
        if self.streak < self.limit:
            return None
        return RuntimeError(
            f"step {step}: {self.streak} steps in a row skipped an optimiser update whose loss or gradients were not "
            f"finite (NaN/inf), reaching train.max_nonfinite_steps={self.limit}; stopped with a checkpoint of the "
            f"last good state at step {step} (skipped updates changed nothing)")

    @staticmethod
    def warning(step: int, metrics: dict[str, float]) -> str:
        """The one-line warning for a step that skipped updates."""
        parts = [f"{metrics[k]:.0f} {k.split('/')[0]}" for k in ("reward_model/skipped_nonfinite",
                                                               "actor/skipped_nonfinite") if metrics.get(k, 0) > 0]
        return (f"warning: step {step}: skipped {metrics['train/skipped_nonfinite']:.0f} optimiser update(s) with "
                f"non-finite loss or gradients ({', '.join(parts)}); {metrics['train/skipped_nonfinite_total']:.0f} "
                f"in this run")


class Trainer:
    def __init__(self, parts: Components):
        self.p = parts
        self.s = s = parts.settings
        self.policy, self.prm = parts.policy, parts.prm
        self.buffer: list[Prompt] = []
        self.step = 0
        self.ahead: RolloutsAhead | None = None  # the rollout thread, during fit() when rollouts run ahead
        self.publish_s = 0.0
        self.nonfinite = NonfiniteGuard(s.max_nonfinite_steps)
        self.ckpt = Checkpointer(s.workdir, keep=s.checkpoint_keep)
        self.writer = MetricWriter(s.workdir, total_steps=s.total_steps, tensorboard=s.tensorboard,
                                   wandb_project=s.wandb_project, config=dict(s.config),
                                   enabled=jax.process_index() == 0)

    # --- the iteration ------------------------------------------------------------------------------

    def iteration(self) -> dict[str, float]:
        """One PRIME step (docs/prime_spec.md §1.9); returns its metrics."""
        t = Timer()
        with t("collect"):
            if self.ahead is None:
                exp, metrics = self.collect(self.step, self.step, self.policy.params)
            else:
                exp, metrics = self.ahead.take(self.step)
        metrics["rollout/staleness"] = check_versions(exp, self.step, self.s.max_staleness)
        host = exp.device_batch()
        with t("pack"):
            prm_slots = self.p.programs.prm_layout(host) if self.s.runs_prm else None
            ppo_slots = self.p.programs.ppo_layout(host, (self.s.seed, self.step))
        batch = self.to_device({k: host[k] for k in ("mask", "old_logp", "acc")})
        rm_scores, prm_metrics = jnp.zeros(batch["mask"].shape, jnp.float32), {}  # outcome-only RL: no PRM work
        if prm_slots is not None:
            extra = {"unpack": prm_slots.unpack}
            if self.s.prm.shuffle_labels:
                extra["labels"] = shuffled_labels(host["acc"], exp.trained, self.s.seed, self.step)
            with t("reward_model"):
                self.prm, prm_out = jax.block_until_ready(self.p.programs.prm_step(
                    self.prm, self.p.ref_params, {**batch, **self.to_device(extra)}, self.slots_to_device(prm_slots.arrays)))
            rm_scores, prm_metrics = prm_out.rm_scores, prm_out.metrics
            # Real tokens / token slots computed; the reference forward runs on the PRM's slots.
            metrics["throughput/token_efficiency/ref"] = metrics["throughput/token_efficiency/prm"] = prm_slots.efficiency
            with t("step_credit"):
                labelled = label_rows(exp, self.p.tokenizer.decode)
                if labelled:  # the same on every host (each holds the whole batch), so all join the gather or none
                    metrics.update(credit_metrics(labelled, global_to_host(prm_out.before)))
        with t("adv"):
            advantages, adv_metrics = jax.block_until_ready(self.p.programs.advantages(rm_scores, batch["acc"], batch["mask"]))
        with t("update_actor"):
            self.policy, actor = jax.block_until_ready(self.p.programs.ppo_step(
                self.policy, {**batch, "advantages": advantages}, self.slots_to_device(ppo_slots.arrays)))
        metrics.update({k: float(v) for k, v in jax.device_get({**prm_metrics, **adv_metrics, **actor}).items()})
        metrics["train/skipped_nonfinite"] = (metrics.get("reward_model/skipped_nonfinite", 0.0)
                                              + metrics["actor/skipped_nonfinite"])
        metrics["train/skipped_nonfinite_total"] = float(sum(jax.device_get(
            [skipped_updates(state.opt_state) for state in self.trained().values()])))
        metrics["throughput/token_efficiency/actor"] = ppo_slots.efficiency
        metrics.update(response_length_metrics(exp))
        metrics.update(t.seconds)
        metrics["timing/step"] = sum(t.seconds.values())
        waited = metrics.pop("timing/collect")  # = collect's own time when there is no rollout thread
        if self.ahead is not None:  # generation ran in the rollout thread; the step waited for what was left
            metrics["timing/rollout_wait"] = waited
            metrics["timing/publish"] = self.publish_s  # the previous update's copy to the sampler, between steps
            metrics["timing/step"] += self.publish_s
        metrics["throughput/gen_tokens_per_s"] = metrics["train/gen_tokens"] / max(metrics["timing/gen"], 1e-9)
        tokens = float(exp.mask.sum())
        train_s = metrics.get("timing/reward_model", 0.0) + metrics["timing/update_actor"]
        metrics["throughput/train_tokens_per_s"] = tokens / max(train_s, 1e-9)
        return metrics

    def fit(self) -> dict[str, float]:
        """Runs (or resumes) to `total_steps`; returns the last step's metrics."""
        s = self.s
        stop = StopOnSignal()
        self.restore()
        last: dict[str, float] = {}
        if self.step >= s.total_steps:
            print(f"run in {s.workdir} is complete: step {self.step} of total_steps={s.total_steps}; "
                  f"to train further, raise it (--config.total_steps={s.total_steps + s.checkpoint_freq})", flush=True)
        if self.step == 0:
            self.writer.write(0, {**self.p.data_skipped, **(self.validate() if s.eval.before_train else {})})
        if (s.max_staleness or s.rollout_mesh is not s.mesh) and self.step < s.total_steps:
            self.ahead = RolloutsAhead(self.collect, self.data_state, start=self.step, total_steps=s.total_steps,
                                       max_staleness=s.max_staleness, sync_every=(s.checkpoint_freq, s.eval.freq))
            self.publish()
        try:
            while self.step < s.total_steps and not stop.requested:
                last = self.iteration()
                self.step += 1
                if self.step % s.eval.freq == 0 or self.step == s.total_steps:
                    last.update(self.validate())
                self.writer.write(self.step, last)
                if last["train/skipped_nonfinite"] > 0 and jax.process_index() == 0:
                    print(NonfiniteGuard.warning(self.step, last), flush=True)
                error = self.nonfinite.observe(self.step, last["train/skipped_nonfinite"])
                if self.step % s.checkpoint_freq == 0 or self.step == s.total_steps or stop.requested or error:
                    self.save()
                if error:
                    raise error
                if self.ahead is not None and self.step < s.total_steps and not stop.requested:
                    self.publish()
            if self.step == s.total_steps and not stop.requested and last:
                self.ckpt.wait()  # the last checkpoint is written before the export
                self.finish()
        finally:
            if self.ahead is not None:
                self.ahead.close()
                self.ahead = None
            self.ckpt.close()
            stop.restore()
            self.writer.close()
        return last

    # --- pieces -------------------------------------------------------------------------------------

    def collect(self, step: int, version: int, params: nnx.State) -> tuple[Experience, dict[str, float]]:
        """Step `step`'s experience, sampled with policy `version` (`params`, on the sampler's mesh), and its
        metrics; moves the data stream and the prompt buffer on. Runs in the rollout thread when there is one."""
        t0 = time.perf_counter()
        # The step's rollout seed: a stream of its own, never validation's (`seed` + c * SEED_STRIDE).
        step_seed = int(np.random.SeedSequence((self.s.seed, step)).generate_state(1)[0])

        def sample(prompts: list[Prompt], seed: int, on_rows: RowsCallback | None = None,
                   stop: StopCallback | None = None) -> Rollout:
            return self.p.programs.sampler(params, [list(p.ids) for p in prompts], seed, on_rows, stop)

        exp, self.buffer, metrics = collect(sample, self.next_prompts, self.buffer, self.p.tokenizer.decode,
                                            self.p.pool, self.s.collect, seed=step_seed, version=version)
        metrics["timing/gen"] = time.perf_counter() - t0 - metrics["timing/verify_exposed"]
        return exp, metrics

    def publish(self) -> None:
        """Hands the current policy (version = step) to the rollout thread: a copy on the sampler's mesh, which the
        next update cannot donate away, in the compute dtype (the sampler draws what the master copy would draw, from
        half the bytes of fp32 params)."""
        t0 = time.perf_counter()
        params = in_compute_dtype(self.policy.params, self.s.model.compute_dtype)
        self.ahead.publish(self.step, jax.block_until_ready(
            jax.device_put(params, state_shardings(params, self.s.rollout_mesh), may_alias=False)))
        self.publish_s = time.perf_counter() - t0

    def data_state(self) -> dict:
        """The prompt stream's position and the prompt buffer, as a checkpoint stores them."""
        return {"data": self.p.train_data.state(), "buffer": [prompt_to_json(p) for p in self.buffer]}

    def next_prompts(self, k: int) -> list[Prompt]:
        return [Prompt(ex, tuple(ids)) for ex, ids in self.p.train_data.next_prompts(k)]

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: host_to_global(v, batch_sharding(self.s.mesh, v.ndim)) for k, v in batch.items()}

    def slots_to_device(self, slots: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: host_to_global(v, layout_sharding(self.s.mesh)) for k, v in slots.items()}

    def validate(self) -> dict[str, float]:
        """Validation score per data source (`val/test_score/<source>`, `.../all`): greedy pass@1 by default,
        avg@k at `eval.temperature` when configured; prompts too long for the model's context are skipped
        (`val/skipped_too_long`)."""
        if not self.p.val_examples:
            return {}
        e, params = self.s.eval, self.policy.params
        scored = score_examples(lambda ids, **kw: self.p.programs.eval_sample(params, ids, **kw),
                                self.s.model.arch, self.p.tokenizer, self.p.val_examples, self.p.pool,
                                max_new_tokens=e.max_response_length, k=e.k, temperature=e.temperature,
                                seed=self.s.seed, batch_size=e.batch_size)
        skipped = {"val/skipped_too_long": float(scored.skipped)} if scored.skipped else {}
        return {**summarize(scored.examples, scored.scores), **skipped}

    def trained(self) -> dict[str, TrainState]:
        """The states the run trains, by name: the policy, and the PRM unless the run is outcome-only."""
        return {"policy": self.policy} | ({} if self.prm is None else {"prm": self.prm})

    def save(self) -> None:
        data = self.data_state() if self.ahead is None else self.ahead.state_before(self.step, self.data_state)
        self.ckpt.save(self.step, self.trained(), {"step": self.step, **data})

    def restore(self) -> None:
        step = self.ckpt.latest_step()
        if step is None:
            return
        device, host = self.ckpt.restore(step, self.trained())
        self.policy, self.prm = device["policy"], device.get("prm")
        self.step = int(host["step"])
        self.p.train_data.restore(host["data"])
        self.buffer = [prompt_from_json(d) for d in host["buffer"]]
        print(f"resumed from {self.ckpt.directory} at step {self.step}", flush=True)

    def finish(self) -> None:
        """Exports the trained models (policy, PRM) as HF directories and renders the curves."""
        if self.s.export_hf:
            for name, state in self.trained().items():
                save_pretrained(nnx.merge(self.p.graphdef, state.params), paths.join(self.s.workdir, "export", name))
        if self.s.plot and jax.process_index() == 0:
            print(f"curves: {plot_curves(self.s.workdir)}", flush=True)


def response_length_metrics(exp: Experience) -> dict[str, float]:
    lengths = exp.mask.sum(axis=1)
    limit = exp.mask.shape[1]
    return {"response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()), "response_length/clip_ratio": float((lengths >= limit).mean())}


def prompt_to_json(p: Prompt) -> dict:
    return {"example": dataclasses.asdict(p.example), "ids": list(p.ids)}


def prompt_from_json(d: dict) -> Prompt:
    return Prompt(Example(**d["example"]), tuple(d["ids"]))
