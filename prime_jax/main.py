"""Entry point: `python -m prime_jax.main --config=configs/X.py [--config.a.b=value ...]`.

Validates the config before anything is loaded or compiled, joins the multi-host runtime when
asked, builds the run (warm-starting the built-in synthetic run's SFT model if needed) and trains.
`--config.dry_run=True` prints the resolved config and the memory plan and loads no weights.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)


def run(c) -> dict[str, float]:
    """Validates, builds and trains; returns the last step's metrics."""
    from prime_jax import paths
    from prime_jax.config import validate
    from prime_jax.distributed import init_distributed
    from prime_jax.memory_plan import print_plan

    validate(c)
    init_distributed(c)
    import jax

    from prime_jax.mesh import make_mesh
    from prime_jax.programs import validate_programs

    validate_programs(c, make_mesh(dict(c.mesh)))
    if c.dry_run:
        print(c)
        print_plan(c)
        return {}
    if c.data.source == "synthetic" and not c.model.path:
        from prime_jax.warm_start import warm_start

        from jax.experimental import multihost_utils

        sft_dir = paths.join(c.workdir, "sft")
        if jax.process_index() == 0:
            warm_start(c, sft_dir)
        multihost_utils.sync_global_devices("warm_start")
        with c.unlocked():
            c.model.path = sft_dir
            c.model.tokenizer = c.model.tokenizer or paths.join(c.model.path, "tokenizer.model")
    from prime_jax.components import build
    from prime_jax.trainer import Trainer

    parts = build(c)
    try:
        metrics = Trainer(parts).fit()
    finally:
        parts.pool.close()
    if jax.process_index() == 0 and metrics:
        print("final: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "train_verify"))))
    return metrics


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.verbosity <= 0:  # orbax and absl are chatty at INFO; -v 1 brings it back
        logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value)
    except ValueError as e:
        if str(e).startswith("config."):
            sys.exit(f"error: {e}")
        raise


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
