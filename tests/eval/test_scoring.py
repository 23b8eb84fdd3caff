"""Evaluation: prompts longer than a tiny Qwen2's context are skipped and counted while short ones are sampled
and scored as they are alone; the memory estimate against the compiled prefill; `python -m prime_jax.eval.scoring`
end to end on real benchmark rows (progress, results JSON, Table-1 markdown equal to the JSON); bad input
stops before the model is loaded; `summarize` groups by source."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.data.example import Example
from prime_jax.eval.scoring import (
    check_request,
    prompts_per_call,
    render_tables,
    sampler_call_bytes,
    score_examples,
    summarize,
    table1_row,
)
from prime_jax.models import Decoder, load_pretrained
from prime_jax.models.tokenizer import load_tokenizer
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.sampling import SamplerConfig, SamplingParams, empty_state, generate, insert
from tests.fixtures import tiny_config, write_tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(os.path.dirname(ROOT), "shared", "data", "benchmarks")
CORPUS = ["\\boxed{42} def f(x): return x + 1", "Compute 7 * 3. What is 12 + 5? Write a function f(x)."] * 50


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A transformers-made tiny Qwen2 checkpoint (context 256) with its tokenizer."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_eval"), CORPUS)


def _math(question, i):
    return Example(prompt=[{"role": "user", "content": question}], ability="math", ground_truth="21",
                   data_source="toy", uid=f"toy/{i}")


def test_prompts_longer_than_the_context_are_skipped_and_short_ones_scored(tiny_dir):
    model, tokenizer = load_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    assert model.cfg.max_position_embeddings == 256
    short = [_math(f"Compute 7 * {i}.", i) for i in range(5)]
    long = [_math("What is 12 + 5? " * 60 + f"({i})", 10 + i) for i in range(3)]
    mixed = [long[0], short[0], short[1], long[1], short[2], short[3], long[2], short[4]]
    encode = lambda ex: tokenizer.encode(tokenizer.apply_chat_template(ex.prompt))  # noqa: E731
    assert max(len(encode(e)) for e in short) < 40 and min(len(encode(e)) for e in long) > 256
    lines = []
    with VerifierPool(1, item_timeout_s=30.0, batch_timeout_s=300.0) as pool:
        scored = score_examples(model, tokenizer, mixed, pool, max_new_tokens=300, batch_size=2, min_response_tokens=16,
                                progress=lines.append)
        alone = score_examples(model, tokenizer, short, pool, max_new_tokens=300, batch_size=2, min_response_tokens=16)
    assert scored.skipped == 3 and alone.skipped == 0
    assert [e.uid for e in scored.examples] == [e.uid for e in short]
    assert scored.scores.shape == scored.lengths.shape == (5, 1)
    # The response limit is clipped to the context left after the shortest prompt; no row runs past the context.
    assert scored.max_new_tokens == 256 - min(len(encode(e)) for e in short)
    for ex, n in zip(short, scored.lengths[:, 0]):
        assert 1 <= n <= 256 - len(encode(ex))
    # Greedy: the short prompts get what they get without the long ones, and what generate() gives them directly.
    np.testing.assert_array_equal(scored.lengths, alone.lengths)
    np.testing.assert_array_equal(scored.scores, alone.scores)
    ref = generate(model, [encode(e) for e in short[:2]], max_new_tokens=scored.max_new_tokens, temperature=0.0,
                   stop_ids=tokenizer.eos_ids, seed=0, pad_id=tokenizer.pad_id)
    np.testing.assert_array_equal(scored.lengths[:2, 0], np.minimum(ref.lengths, [256 - len(encode(e)) for e in short[:2]]))
    assert lines[0] == f"5 prompts x 1 in 3 sampler calls of 2, up to {scored.max_new_tokens} new tokens"
    assert lines[-1].startswith("generated and verified 5/5 prompts x 1") and len(lines) == 4


@pytest.mark.parametrize("b,p,r,n", [(8, 256, 64, 1), (4, 512, 512, 4)])
def test_memory_estimate_matches_the_compiled_insert(b, p, r, n):
    """The sampler's cache and one insert (prefill) of its largest batch, as XLA allocates them on CPU."""
    cfg = tiny_config()
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    sampler = SamplerConfig(n=n, max_new_tokens=r, sampling=SamplingParams(temperature=0.0), rows=b * n)
    state = empty_state(cfg, sampler, p)
    batch = sampler.max_prefill
    index = jnp.zeros((n, batch + 1), jnp.int32)
    compiled = insert.lower(graphdef, params, state, jnp.zeros((batch, p), jnp.int32), jnp.ones((batch,), jnp.int32),
                            index, index, jnp.int32(batch), jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    allocated = memory.temp_size_in_bytes + memory.output_size_in_bytes
    estimate = sampler_call_bytes(cfg, b, p, r, n)
    # k, v x L x rows x K x (prompt + ring slots) x Dh x fp32
    assert estimate["kv_cache"] == 2 * 2 * b * n * 2 * sampler.cache_len(p) * 8 * 4
    assert 0.8 * allocated <= sum(estimate.values()) <= 2.0 * allocated, (estimate, allocated)
    # The budget picks the most prompts that fit: per prompt the sum is linear in the prompt count.
    per_prompt = sum(sampler_call_bytes(cfg, 1, p, r, n).values())
    assert prompts_per_call(cfg, 64, p, r, n, 3.5 * per_prompt) == 3
    assert prompts_per_call(cfg, 64, p, r, n, 0.5 * per_prompt) == 1 and prompts_per_call(cfg, 64, p, r, n, 0) == 64


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "prime_jax.eval.scoring", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_evaluate_writes_results_json_and_the_table1_layout(tmp_path):
    # Context 4096 so that real benchmark prompts fit the tiny model; 10 problems of MATH-500, 3 of HumanEval.
    model = write_tiny_model_dir(tmp_path / "model", CORPUS, max_position_embeddings=4096)
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
        f"evaluate: benchmark file for 'lcb_v2' not found: {os.path.join(BENCHMARKS, 'livecodebench')}")


def test_summarize_means_per_source_and_overall():
    ex = lambda src: Example(prompt=[], ability="math", ground_truth="1", data_source=src, uid=src)  # noqa: E731
    examples = [ex("a"), ex("a"), ex("b")]
    scores = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    assert summarize(examples, scores) == {"val/test_score/a": 0.75, "val/test_score/b": 0.0,
                                           "val/test_score/all": 0.5}
