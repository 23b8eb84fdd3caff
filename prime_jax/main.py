"""Entry point: `python -m prime_jax.main --config=configs/X.py [--config.a.b=value ...]`.

Resolves the config into run settings (every key checked before anything is loaded or compiled), joins the
multi-host runtime when asked, warm-starts the built-in synthetic run's SFT model if it has none, builds the
run and trains. `--config.dry_run=True` prints the config, the settings' shape and the memory plan, loading nothing.
"""

from __future__ import annotations

from prime_jax import cli

_CONFIG = cli.config_flag()


def run(c) -> dict[str, float]:
    """Resolves, builds and trains; returns the last step's metrics."""
    from prime_jax import settings as settings_lib
    from prime_jax.distributed import init_distributed

    settings_lib.check(c)  # the rules that need no devices: a bad value fails before the runtime starts
    if settings_lib.wants_distributed(c):
        init_distributed()
    s = settings_lib.resolve(c)
    if s.dry_run:
        from prime_jax.memory_plan import print_plan

        print(c)
        print_plan(s)
        return {}
    import jax

    if s.warm_start.needed:
        from jax.experimental import multihost_utils

        from prime_jax.warm_start import warm_start

        if jax.process_index() == 0:
            warm_start(s, s.model.path)
        multihost_utils.sync_global_devices("warm_start")
        s = settings_lib.resolve(c, s.mesh, rollout_mesh=s.rollout_mesh)  # with the warm-start model's architecture
    settings_lib.check_paths(s)
    from prime_jax.components import build
    from prime_jax.trainer import Trainer

    parts = build(s)
    try:
        metrics = Trainer(parts).fit()
    finally:
        parts.pool.close()
    if jax.process_index() == 0 and metrics:
        print("final: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "train_verify"))))
    return metrics


def main(argv) -> None:
    run(cli.load_config(_CONFIG))


if __name__ == "__main__":
    cli.run(main)
