"""The actor update in the training loop vs the same program alone: is there loop overhead around the PPO step?

Builds a run from a config (default: the built-in run's, warm start included when it has none), runs `--steps`
PRIME iterations, then re-runs the last step's jitted PPO step `--repeats` times on that step's exact device batch
and slots (the shapes already compiled) with nothing else around it. Prints the in-loop `timing/update_actor`
as trained tokens/s (real prompt + response tokens of the trained rows, what `bench/train_step.py` counts: the
median of each step's rate after the first, which compiles) beside the isolated re-runs' (the last step's tokens
over their median time), and their ratio. The in-loop figure
includes what the loop adds inside the timer: moving the slots to the device and reading the metrics back.
Run: `python bench/actor_in_loop.py --config=configs/tiny.py --config.workdir=/tmp/actor_bench [--steps 6]`.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from prime_jax import cli  # noqa: E402

_CONFIG = cli.config_flag()
_STEPS = flags.DEFINE_integer("steps", 6, "PRIME iterations in the loop (the first compiles)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "isolated re-runs of the last step's PPO program")


def main(argv) -> None:
    import jax

    from prime_jax import settings
    from prime_jax.components import build
    from prime_jax.trainer import Trainer
    from prime_jax.warm_start import warm_start

    c = cli.load_config(_CONFIG)
    c.eval.before_train, c.eval.freq, c.total_steps = False, 10**6, 10**6
    s = settings.resolve(c)
    if s.warm_start.needed:
        warm_start(s, s.model.path)
        s = settings.resolve(c, s.mesh, rollout_mesh=s.rollout_mesh)
    parts = build(s)
    trainer = Trainer(parts)
    ppo_step, captured = parts.programs.ppo_step, {}

    def spy(state, batch, slots):
        captured.update(batch=batch, slots=slots)
        return ppo_step(state, batch, slots)

    parts.programs.ppo_step = spy
    rates, tokens = [], 0.0
    try:
        for _ in range(_STEPS.value):
            metrics = trainer.iteration()
            trainer.step += 1
            tokens = float((np.asarray(captured["slots"]["segment_ids"]) > 0).sum())
            rates.append(tokens / metrics["timing/update_actor"])
        alone = []
        for _ in range(_REPEATS.value):
            t0 = time.perf_counter()
            trainer.policy, out = ppo_step(trainer.policy, captured["batch"], captured["slots"])
            jax.block_until_ready(out)
            alone.append(time.perf_counter() - t0)
    finally:
        parts.pool.close()
    loop_rate, alone_rate = float(np.median(rates[1:])), tokens / float(np.median(alone))
    shape = tuple(captured["slots"]["tokens"].shape)
    print(f"actor update in the loop: {loop_rate:,.0f} tok/s (median of steps 2..{len(rates)}); the last step's "
          f"program alone ({tokens:.0f} trained tokens in slots {shape}, {len(alone)} runs): {alone_rate:,.0f} tok/s; "
          f"in-loop / alone = {loop_rate / alone_rate:.2f}")


if __name__ == "__main__":
    cli.run(main)
