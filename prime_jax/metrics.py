"""Metric writers (stdout progress line, `metrics.jsonl`, TensorBoard events, W&B) and the curve plot.

Metric names follow the reference implementation (docs/design.md "Metrics") so curves can be compared.
`python -m prime_jax.metrics WORKDIR` renders a run's curves to `WORKDIR/curves.png`.
WORKDIR may be local or `gs://` (prime_jax.paths): there, `metrics.jsonl` is rewritten whole at each
record (objects cannot be appended to; each upload replaces it atomically) and TensorBoard writes to a
local directory whose event files are uploaded after each record.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from prime_jax import paths

# The figures shown on the progress line, in order, with short labels.
PROGRESS = (("train_verify_score/all", "acc"), ("reward_model/prm_loss", "prm"), ("reward_model/dpo_acc_before", "dpo"),
            ("actor/pg_clipfrac", "clip"), ("response_length/mean", "len"), ("val/test_score/all", "val"),
            ("timing/step", "s"))

CURVES = ("train_verify_score/all", "val/test_score/all", "train_reward/verifier", "reward_model/prm_loss",
          "reward_model/dpo_acc_before", "actor/pg_loss", "actor/entropy", "response_length/mean")


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch: where torch is installed, tensorboardX imports it (only
    to accept torch tensors), which holds 0.5 GiB of host memory for the whole run. Torch stays importable after."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes one record per logged step to every configured sink. Only process 0 writes."""

    def __init__(self, workdir: str, *, total_steps: int, tensorboard: bool = True, wandb_project: str = "",
                 config: Mapping[str, Any] | None = None, stream: TextIO = sys.stdout, enabled: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream
        self._tb = self._wandb = None
        self._jsonl = None
        self._remote_lines: list[str] | None = None  # gs://: the whole file, rewritten at each record
        self._tb_local = ""  # gs://: where TensorBoard writes before each upload
        if not enabled:
            return
        self.path = paths.path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if paths.is_remote(workdir):
            self._remote_lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        else:
            self._jsonl = self.path.open("a")
        self._tb_dir = paths.join(workdir, "tensorboard")
        if tensorboard:
            if paths.is_remote(workdir):
                self._tb_local = tempfile.mkdtemp(prefix="prime_jax_tensorboard_")
            self._tb = summary_writer_class()(self._tb_local or self._tb_dir)
        if wandb_project:
            import wandb
            local_dir = tempfile.mkdtemp(prefix="prime_jax_wandb_") if paths.is_remote(workdir) else workdir
            self._wandb = wandb.init(project=wandb_project, dir=local_dir, config=dict(config or {}), resume="allow")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in sorted(metrics.items())}}
        line = json.dumps(record) + "\n"
        if self._remote_lines is not None:
            self._remote_lines.append(line)
            self.path.write_text("".join(self._remote_lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
            if self._tb_local:
                paths.upload(self._tb_local, self._tb_dir)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        shown = " ".join(f"{label} {record[k]:.3g}" for k, label in PROGRESS if k in record)
        width = len(str(self.total_steps))
        done = int(20 * min(step, self.total_steps) / max(1, self.total_steps))
        self.stream.write(f"[{'#' * done}{'.' * (20 - done)}] step {step:>{width}}/{self.total_steps} {shown}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            if self._tb_local:
                paths.upload(self._tb_local, self._tb_dir)
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
        v = np.asarray(v).item()
    return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; for a step logged twice (a resumed run), the last record wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in (paths.path(workdir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(workdir: str, out: str | None = None) -> str:
    """Renders the run's main curves to a PNG; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    names = [k for k in CURVES if any(k in r for r in records)]
    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = out or paths.join(workdir, "curves.png")
    with paths.path(out).open("wb") as f:
        fig.savefig(f, dpi=80, format="png")
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m prime_jax.metrics WORKDIR")
    print(plot_curves(sys.argv[1]))
