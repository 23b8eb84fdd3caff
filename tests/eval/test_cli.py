"""The benchmark command line, `python -m prime_jax.eval`: end to end on real benchmark rows (progress, results JSON,
Table-1 markdown equal to the JSON); the Table-1 layout and average; bad input is one line naming it and stops
before the model is loaded."""

import json
import os
import re
import subprocess
import sys

import pytest

from prime_jax.eval.__main__ import check_request, render_tables, table1_row
from tests.fixtures import EVAL_CORPUS, write_tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(os.path.dirname(ROOT), "shared", "data", "benchmarks")


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "prime_jax.eval", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_evaluate_writes_results_json_and_the_table1_layout(tmp_path):
    # Context 4096 so that real benchmark prompts fit the tiny model; 10 problems of MATH-500, 3 of HumanEval.
    model = write_tiny_model_dir(tmp_path / "model", EVAL_CORPUS, max_position_embeddings=4096)
    out = _run(f"--model={model}", "--benchmarks=math500,humaneval", f"--data_root={BENCHMARKS}", "--limit=3",
               "--max_new_tokens=8", "--k=2", "--temperature=1.0", "--workers=2", "--batch_size=2",
               "--min_response_tokens=2000", f"--output_dir={tmp_path / 'out'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"math500: generated and verified \d+/\d+ prompts x 2", out.stderr)  # progress per sampler call
    (run_dir,) = os.listdir(tmp_path / "out")
    with open(tmp_path / "out" / run_dir / "results.json") as f:
        results = json.load(f)
    with open(tmp_path / "out" / run_dir / "table.md") as f:
        table = f.read()
    assert table in out.stdout
    bench = results["benchmarks"]
    for name in ("math500", "humaneval"):
        r = bench[name]
        assert r["metric"] == "avg@2" and r["scored"] + r["skipped_too_long"] == 3 and r["max_new_tokens"] <= 8
        if r["skipped_too_long"]:
            assert f"{name}: skipped {r['skipped_too_long']} of 3 prompts longer than 2096 tokens" in out.stdout
    assert results["settings"]["k"] == 2 and results["settings"]["temperature"] == 1.0
    # The Table-1 markdown shows the JSON's numbers.
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert head == ["model (avg@2)", "AIME24", "AMC", "MATH-500", "Minerva", "OlympiadBench", "LeetCode", "LCB v2", "Avg"]
    cells = dict(zip(head[1:], row[1:]))
    fmt = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    assert cells == {h: fmt(v) for h, v in results["table1"].items()}
    assert cells["MATH-500"] == fmt(bench["math500"]["score"]) and cells["AMC"] == "–"
    assert results["table1"]["Avg"] == results["table1"]["MATH-500"]  # the only Table-1 column run
    other = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert lines[-3].split("|")[2].strip() == "humaneval" and other[1] == fmt(bench["humaneval"]["score"])


def test_table1_average_and_layout_by_hand():
    results = {"aime24": {"metric": "pass@1", "score": 20.0}, "math500": {"metric": "pass@1", "score": 78.2},
               "lcb_v2": {"metric": "pass@1", "score": 27.5}, "mbpp": {"metric": "pass@1", "score": 50.0}}
    row = table1_row(results)
    assert row["Avg"] == pytest.approx((20.0 + 78.2 + 27.5) / 3) and row["AMC"] is None
    lines = render_tables("m", results).splitlines()
    assert lines[2] == "| m | 20.0 | – | 78.2 | – | – | – | 27.5 | 41.9 |"
    assert lines[4] == "Avg over the 3 of 7 Table 1 benchmarks run." and lines[6] == "| model (pass@1) | mbpp |"


@pytest.mark.parametrize("flag,value,message", [
    ("benchmarks", "gsm8k", "unknown benchmark 'gsm8k'"),
    ("benchmarks", "validation", "--benchmarks=validation needs --config"),
    ("k", 0, "--k must be >= 1, got 0"),
    ("temperature", -0.5, "--temperature must be >= 0 (0 = greedy), got -0.5"),
    ("data_root", "/nonexistent", "benchmark file for 'math500' not found: /nonexistent/math500.json"),
])
def test_bad_input_is_one_line_naming_it(flag, value, message):
    request = dict(benchmarks="math500", data_root=BENCHMARKS, k=1, temperature=0.0)
    request[flag] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        check_request(request.pop("benchmarks").split(","), request.pop("data_root"), top_p=1.0, max_new_tokens=0,
                      limit=0, batch_size=1, memory_gb=1.0, min_response_tokens=1, has_config=False, **request)


def test_bad_input_stops_before_loading_the_model():
    # The model path does not exist: the error must be about the flag, so nothing was loaded first.
    out = _run("--model=/nonexistent/model", f"--data_root={BENCHMARKS}", "--benchmarks=math500,lcb_v2", timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"prime_jax.eval: benchmark file for 'lcb_v2' not found: {os.path.join(BENCHMARKS, 'livecodebench')}")
