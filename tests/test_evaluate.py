"""`python -m prime_jax.evaluate` on a tiny checkpoint over real MATH-500 and HumanEval rows: prompts, sampling,
extraction and scoring run end to end and the table is printed; `summarize` groups by source."""

import os
import subprocess
import sys

import numpy as np

from prime_jax.data.example import Example
from prime_jax.evaluate import summarize
from tests.fixtures import write_tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(os.path.dirname(ROOT), "shared", "data", "benchmarks")


def test_evaluate_prints_the_benchmark_table(tmp_path):
    model = write_tiny_model_dir(tmp_path / "model", ["\\boxed{42} def f(x): return x + 1"] * 50)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "prime_jax.evaluate", f"--model={model}", "--benchmarks=math500,humaneval",
                          f"--data_root={BENCHMARKS}", "--limit=3", "--max_new_tokens=8", "--k=2", "--temperature=1.0",
                          "--workers=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("benchmark"))
    assert lines[header].split() == ["benchmark", "n", "pass@1", "avg@2"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:]}
    assert rows["math500"][0] == "3" and rows["humaneval"][0] == "3"
    for name in ("math500", "humaneval"):
        assert 0.0 <= float(rows[name][1]) <= 100.0  # a random tiny model: near 0, but scored


def test_summarize_means_per_source_and_overall():
    ex = lambda src: Example(prompt=[], ability="math", ground_truth="1", data_source=src, uid=src)  # noqa: E731
    examples = [ex("a"), ex("a"), ex("b")]
    scores = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    assert summarize(examples, scores) == {"val/test_score/a": 0.75, "val/test_score/b": 0.0,
                                           "val/test_score/all": 0.5}
