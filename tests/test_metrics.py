"""`prime_jax.metrics`: the records a run writes, and what writing them costs the process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITE_TWO_STEPS = """
import glob, json, sys
from prime_jax.metrics import MetricWriter, read_metrics
w = MetricWriter(sys.argv[1], total_steps=2, tensorboard=True, stream=open("/dev/null", "w"))
w.write(1, {"actor/pg_loss": 0.25, "timing/step": 1.5})
w.write(2, {"actor/pg_loss": -0.125})
w.close()
torch_loaded = "torch" in sys.modules
import torch  # still importable afterwards
print(json.dumps({"records": read_metrics(sys.argv[1]), "torch_loaded": torch_loaded,
                  "events": [len(open(f, "rb").read()) for f in glob.glob(sys.argv[1] + "/tensorboard/events.*")]}))
"""


def test_records_and_tensorboard_events_without_importing_torch(tmp_path):
    """torch is installed here (the tests' parity reference): tensorboardX would import it, 0.5 GiB held by a run."""
    out = subprocess.run([sys.executable, "-c", WRITE_TWO_STEPS, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["records"] == [{"step": 1, "actor/pg_loss": 0.25, "timing/step": 1.5},
                                 {"step": 2, "actor/pg_loss": -0.125}]
    assert not result["torch_loaded"]
    assert len(result["events"]) == 1 and result["events"][0] > 100
