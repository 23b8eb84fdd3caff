"""The training loop end to end, in-process: configs/qwen7b.py's exact code path with its model shrunk."""

import json
import math
import os
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from prime_jax.data.eurus import example_to_row
from prime_jax.data.synthetic import make_tasks, reference_solution
from prime_jax.main import run
from prime_jax.metrics import read_metrics
from prime_jax.models import load_pretrained
from prime_jax.trainer import NonfiniteGuard, Trainer
from tests.fixtures import hf_logits, load_config, write_tiny_model_dir





def write_parquet_with_bad_rows(path, tasks):
    """Eurus-2-RL-Data rows for `tasks` plus malformed rows: 2 without ground truth, 1 unknown ability,
    1 code row whose tests are not JSON."""
    rows = [example_to_row(t, split="train", index=i) for i, t in enumerate(tasks)]
    no_truth = dict(rows[0], reward_model={"style": "rule", "ground_truth": ""})
    rows += [no_truth, dict(no_truth), dict(rows[1], ability="poetry")]
    rows.append(dict(rows[2], ability="code", reward_model={"style": "rule", "ground_truth": "{not json"}))
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def qwen7b_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen7b_path")
    tasks = make_tasks(48, seed=5, math_frac=0.5, difficulty=1)
    corpus = [m["content"] for t in tasks for m in t.prompt] + [reference_solution(t) for t in tasks]
    model_dir = write_tiny_model_dir(tmp / "model", corpus * 4)
    write_parquet_with_bad_rows(tmp / "train.parquet", tasks[:40])
    write_parquet_with_bad_rows(tmp / "val.parquet", tasks[40:])
    c = load_config("qwen7b")
    overrides = {  # the model, data and sizes shrink; every code path stays qwen7b's
        "model.path": model_dir, "data.train_files": str(tmp / "train.parquet"), "data.val_files": str(tmp / "val.parquet"),
        "workdir": str(tmp / "run"), "total_steps": 2, "train.batch_size": 4, "rollout.max_response_length": 12,
        "rollout.prompts_per_call": 2,  # 2 of the offered prompts in flight, as the v5p-8 plan samples
        "actor.mini_batch_size": 8, "actor.micro_batch_size": 8, "prm.mini_batch_size": 16, "prm.micro_batch_size": 8,
        "verifier.num_workers": 2, "eval.batch_size": 16, "checkpoint.freq": 1,
    }
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    metrics = run(c)
    return c, metrics, model_dir


def test_qwen7b_path_runs_two_iterations_with_the_reference_sanity_checks(qwen7b_run):
    c, last, _ = qwen7b_run
    records = read_metrics(c.workdir)
    assert [r["step"] for r in records] == [0, 1, 2]
    first = records[1]
    # Step 1: PRM == reference (same checkpoint, same compute dtype), one PRM mini-batch updated "after" the rewards.
    assert first["reward_model/prm_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_model/dpo_acc_before"] == pytest.approx(0.5, abs=1e-6)
    assert first["reward_model/dpo_acc_before_tie_neutral"] == 0.5   # every score tied at 0
    assert first["train_reward/reward_model"] == 0.0
    for key in ("train_verify_score/all", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm",
                "actor/lr", "actor/entropy", "critic/advantages/mean", "critic/returns/max", "response_length/mean",
                "timing/gen", "timing/reward_model", "timing/update_actor", "throughput/gen_tokens_per_s",
                "val/test_score/all"):
        assert key in records[2], key
    assert abs(records[2]["critic/advantages/mean"]) < 1e-5  # whitened over all valid tokens
    assert records[2]["actor/lr"] == pytest.approx(5e-7)
    assert all(r["train/skipped_nonfinite"] == r["train/skipped_nonfinite_total"] == 0 for r in records[1:])


def test_malformed_parquet_rows_are_skipped_and_counted(qwen7b_run):
    c, _, _ = qwen7b_run
    step0 = read_metrics(c.workdir)[0]
    # train + val files each hold 2 rows without ground truth, 1 unknown ability, 1 bad code tests
    assert step0["data/skipped_missing_ground_truth"] == 4
    assert step0["data/skipped_unknown_ability"] == 2
    assert step0["data/skipped_bad_code_tests"] == 2


def test_exported_policy_loads_in_transformers_with_the_same_logits(qwen7b_run):
    c, _, _ = qwen7b_run
    export = os.path.join(c.workdir, "export", "policy")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    tokens = np.random.default_rng(0).integers(1, 200, (2, 9)).astype(np.int32)
    mask = np.ones_like(tokens)
    ours = np.asarray(load_pretrained(export)(tokens, attention_mask=mask))
    assert np.max(np.abs(hf_logits(export, tokens, mask) - ours)) < 1e-4
    assert os.path.isfile(os.path.join(c.workdir, "export", "prm", "model.safetensors"))
    assert os.path.isfile(os.path.join(c.workdir, "curves.png"))


def test_dry_run_validates_and_prints_the_memory_plan(capsys):
    c = load_config("qwen7b")
    c.dry_run = True
    c.model.path = "/nonexistent"  # no weights are touched: the plan uses the config's architecture
    assert run(c) == {}
    out = capsys.readouterr().out
    assert "memory plan: qwen2 7.62B params" in out
    assert "rollouts of 1024+3072 tokens, 256 prompts per sampler call" in out


def test_metrics_file_is_json_lines(qwen7b_run):
    c, _, _ = qwen7b_run
    with open(os.path.join(c.workdir, "metrics.jsonl")) as f:
        for line in f:
            assert "step" in json.loads(line)


def test_nonfinite_guard_stops_after_the_bound_in_a_row_and_a_clean_step_resets_it():
    guard = NonfiniteGuard(3)
    assert [guard.observe(step, skipped) for step, skipped in enumerate([1, 2, 0, 1, 1], 1)] == [None] * 5
    error = guard.observe(6, 1.0)
    assert isinstance(error, RuntimeError) and guard.streak == 3
    assert "step 6" in str(error) and "3 steps in a row" in str(error) and "train.max_nonfinite_steps=3" in str(error)
    with pytest.raises(ValueError, match="train.max_nonfinite_steps"):
        NonfiniteGuard(0)


def test_fit_saves_a_checkpoint_and_raises_after_max_nonfinite_steps_in_a_row(capsys):
    """The loop with stub programs: steps skipping (1, 0, 1, 1) updates with train.max_nonfinite_steps=2 warn on steps
    1, 3 and 4, then save step 4 (no regular checkpoint due) and raise there."""
    skips = iter([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    saved, written, closed = [], [], []
    t = Trainer.__new__(Trainer)
    mesh = object()  # synchronous, one mesh: no rollout thread
    t.s = types.SimpleNamespace(total_steps=6, checkpoint_freq=100, max_nonfinite_steps=2, workdir="w",
                                eval=types.SimpleNamespace(freq=100, before_train=False), max_staleness=0,
                                mesh=mesh, rollout_mesh=mesh)
    t.ahead = None
    t.p = types.SimpleNamespace(data_skipped={})
    t.step, t.nonfinite, total = 0, NonfiniteGuard(2), [0.0]

    def iteration():
        n = next(skips)
        total[0] += n
        return {"train/skipped_nonfinite": n, "train/skipped_nonfinite_total": total[0], "actor/skipped_nonfinite": n}

    t.iteration, t.restore, t.validate = iteration, lambda: None, dict
    t.save = lambda: saved.append(t.step)
    t.writer = types.SimpleNamespace(write=lambda step, m: written.append(step), close=lambda: closed.append("w"))
    t.ckpt = types.SimpleNamespace(close=lambda: closed.append("c"))
    with pytest.raises(RuntimeError, match=r"step 4: 2 steps in a row .* train.max_nonfinite_steps=2"):
        t.fit()
    assert saved == [4] and written == [0, 1, 2, 3, 4] and sorted(closed) == ["c", "w"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert [w.split(":")[1].strip() for w in warnings] == ["step 1", "step 3", "step 4"]
    assert "skipped 1 optimiser update(s)" in warnings[-1] and "(1 actor)" in warnings[-1] and "3 in this run" in warnings[-1]


def test_outcome_only_loads_no_prm_or_reference_and_checkpoints_the_policy_alone(qwen7b_run, tmp_path, capsys):
    """process_coef 0 with no PRM update: no PRM or reference on the mesh, none in the checkpoint, the export or
    the memory plan; the run resumes from its policy-only checkpoint."""
    c = qwen7b_run[0].copy_and_resolve_references()
    c.workdir = str(tmp_path / "run")
    c.algorithm.process_coef, c.prm.update_mode = 0.0, "none"
    run(c)
    assert not [k for k in read_metrics(c.workdir)[-1] if k.startswith("reward_model/")]
    from prime_jax.checkpointing import Checkpointer
    from prime_jax.components import build
    from prime_jax.settings import resolve

    saved = Checkpointer(c.workdir, keep=10).manager.item_metadata(2)["device"]
    assert set(saved) == {"policy"}
    assert os.path.isdir(os.path.join(c.workdir, "export", "policy"))
    assert not os.path.exists(os.path.join(c.workdir, "export", "prm"))
    c.total_steps = 3
    capsys.readouterr()
    run(c)
    assert "at step 2" in capsys.readouterr().out and read_metrics(c.workdir)[-1]["step"] == 3
    parts = build(resolve(c))
    assert parts.prm is None and parts.ref_params is None and parts.programs.prm_step is None
    parts.pool.close()
    c.dry_run = True
    capsys.readouterr()
    run(c)
    plan = capsys.readouterr().out.split("memory plan:")[1]
    assert "policy (params + adam)" in plan and "prm (params + adam)" not in plan and "reference" not in plan
