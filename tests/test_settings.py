"""prime_jax.settings: every rule, one line naming a key that exists, and the values resolve derives.

The rule table walks each key of `base_config()` that has a rule (and the rules between keys): a bad value must
fail `resolve` with a ConfigError whose message is one line starting `config.<key>:`, for a key that exists in
the base config. A key with no entry below must be listed in FREE_FORM, so a new key cannot go unchecked.
"""

import re

import jax
import ml_collections
import pytest

from prime_jax import settings
from prime_jax.config import base_config
from prime_jax.mesh import make_mesh
from tests.fixtures import load_config


# Keys whose values are free-form (paths, names): any string is accepted here; what they point at is checked
# where it is read (model.* below, data files by preflight and the readers).
FREE_FORM = {"model.prm_path", "model.ref_path", "model.tokenizer", "model.arch", "data.val_files",
             "warm_start.arch", "log.wandb_project"}




def one_device() -> jax.sharding.Mesh:
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def tiny(tmp_path, **overrides) -> ml_collections.ConfigDict:
    """configs/tiny.py in a fresh workdir (the built-in run before its warm start: no files needed)."""
    c = load_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.update_from_flattened_dict(overrides)
    return c


def leaf_keys(c: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict) and k not in ("arch", "mesh"):
            keys |= leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


# (key set, bad value, key the error names, message fragment); extra overrides first where a rule needs them.
RULES = [
    ("seed", -1, "seed", "integer >= 0"),
    ("workdir", "", "workdir", "non-empty"),
    ("total_steps", 0, "total_steps", ">= 1"),
    ("dry_run", "yes", "dry_run", "True or False"),
    ("distributed", 1, "distributed", "True or False"),
    ("mesh", {"data": 0, "fsdp": -1, "tensor": 1}, "mesh.data", "positive integer or -1"),
    ("data.source", "hub", "data.source", "'hub' is not one of"),
    ({"data.source": "files"}, None, "data.train_files", "empty"),
    ({"data.source": "tfds"}, None, "data.tfds_dir", "empty while data.source=tfds"),
    ({"data.source": "tfds", "data.tfds_dir": "gs://b/eurus2", "model.path": "/m"}, None, "data.tfds_dir",
     r"is remote.*\(gcloud storage cp -r gs://b/eurus2 /local/dir\)"),
    ({"data.source": "files", "data.train_files": "x.parquet"}, None, "model.path", "empty"),
    ("data.max_prompt_length", 0, "data.max_prompt_length", ">= 1"),
    ("data.max_val_prompts", -1, "data.max_val_prompts", ">= 0"),
    ("synthetic.train_size", 0, "synthetic.train_size", ">= 1"),
    ("synthetic.val_size", 0, "synthetic.val_size", ">= 1"),
    ("synthetic.difficulty", 0, "synthetic.difficulty", ">= 1"),
    ("synthetic.vocab_size", 0, "synthetic.vocab_size", ">= 1"),
    ("synthetic.math_frac", 1.5, "synthetic.math_frac", "<= 1"),
    ("synthetic.max_operand", 1, "synthetic.max_operand", "must be 0"),
    ("synthetic.code_steps", 1, "synthetic.code_steps", "must be True or False"),
    ("prm.shuffle_labels", "yes", "prm.shuffle_labels", "must be True or False"),
    ("model.path", "/nonexistent", "model.path", "no config.json in '/nonexistent'"),
    ("model.param_dtype", "fp8", "model.param_dtype", "'fp8' is not one of"),
    ("model.ref_dtype", "int8", "model.ref_dtype", "is not one of"),
    ("model.compute_dtype", "half", "model.compute_dtype", "is not one of"),
    ("model.attention", "flash", "model.attention", "'flash' is not one of"),
    ("model.attention", "splash", "model.attention", "needs a TPU backend"),
    ("model.attention", "cudnn", "model.attention", "needs a GPU backend"),
    ("model.remat", "no", "model.remat", "True or False"),
    ("model.remat_saves", "all", "model.remat_saves", "'all' is not one of"),
    ("model.layers", "loop", "model.layers", "'loop' is not one of"),
    ("model.logits_chunk", 0, "model.logits_chunk", ">= 1"),
    ("rollout.n_samples", 0, "rollout.n_samples", ">= 1"),
    ("rollout.n_samples", 1, "rollout.n_samples", "rloo needs at least 2 samples"),
    ("rollout.temperature", -0.5, "rollout.temperature", ">= 0"),
    ("rollout.top_p", 0.0, "rollout.top_p", "> 0"),
    ("rollout.top_k", -1, "rollout.top_k", ">= 0"),
    ("rollout.max_response_length", 0, "rollout.max_response_length", ">= 1"),
    ("rollout.prompts_per_call", -1, "rollout.prompts_per_call", ">= 0"),
    ("rollout.steps_per_sync", 0, "rollout.steps_per_sync", ">= 1"),
    ("rollout.kv_block", 0, "rollout.kv_block", ">= 1"),
    ("rollout.kv_cache_gib", -1.0, "rollout.kv_cache_gib", ">= 0"),
    ("rollout.kv_cache_gib", 1e-6, "rollout.prompts_per_call", r"128 rows in flight \(32 prompts x 4\) need a"),
    ("rollout.gather_params", "no", "rollout.gather_params", "True or False"),
    ("rollout.compact_tail", "yes", "rollout.compact_tail", "'yes' is not one of auto, on, off"),
    ("rollout.max_staleness", -1, "rollout.max_staleness", ">= 0"),
    ("rollout.devices", -1, "rollout.devices", ">= 0"),
    ("train.batch_size", 0, "train.batch_size", ">= 1"),
    ("train.filter_accuracy", 0, "train.filter_accuracy", "True or False"),
    ("train.accuracy_lower_bound", -0.1, "train.accuracy_lower_bound", ">= 0"),
    ("train.accuracy_upper_bound", 1.1, "train.accuracy_upper_bound", "<= 1"),
    ({"train.accuracy_lower_bound": 0.9, "train.accuracy_upper_bound": 0.5}, None, "train.accuracy_lower_bound",
     "above train.accuracy_upper_bound"),
    ("train.filter_truncated", None, "train.filter_truncated", "True or False"),
    ("train.max_rounds", 0, "train.max_rounds", ">= 1"),
    ("train.max_nonfinite_steps", 0, "train.max_nonfinite_steps", ">= 1"),
    ("train.layout", "rows", "train.layout", "'rows' is not one of packed, padded, shared_prompt"),
    ("train.pack_length", -1, "train.pack_length", ">= 0"),
    ("train.pack_length", 100, "train.pack_length", "100 is shorter than the longest sequence"),
    ("algorithm.adv_estimator", "gae", "algorithm.adv_estimator", "'gae' is not one of"),
    ("algorithm.process_formula", "mine", "algorithm.process_formula", "is not one of"),
    ("algorithm.process_credit", "max", "algorithm.process_credit", "'max' is not one of"),
    ("algorithm.gamma_process", 1.5, "algorithm.gamma_process", "<= 1"),
    ({"algorithm.process_credit": "min", "algorithm.gamma_process": 0.9}, None, "algorithm.gamma_process",
     "min-form process credit needs gamma_process=1"),
    ("algorithm.gamma_outcome", -1.0, "algorithm.gamma_outcome", ">= 0"),
    ("algorithm.process_coef", float("nan"), "algorithm.process_coef", "finite number"),
    ("algorithm.rm_coef", "5", "algorithm.rm_coef", "finite number"),
    ("algorithm.verifier_coef", float("inf"), "algorithm.verifier_coef", "finite number"),
    *[row for section in ("actor", "prm") for row in (
        (f"{section}.lr", -1e-3, f"{section}.lr", ">= 0"),
        (f"{section}.weight_decay", -0.1, f"{section}.weight_decay", ">= 0"),
        (f"{section}.grad_clip", 0.0, f"{section}.grad_clip", "> 0"),
        (f"{section}.mini_batch_size", 0, f"{section}.mini_batch_size", ">= 1"),
        (f"{section}.mini_batch_size", 48, f"{section}.mini_batch_size", "48 does not divide the 128 rows"),
        (f"{section}.micro_batch_size", 0, f"{section}.micro_batch_size", ">= 1"),
        (f"{section}.micro_batch_size", 7, f"{section}.micro_batch_size", "7 does not divide"),
        (f"{section}.micro_batch_tokens", -1, f"{section}.micro_batch_tokens", ">= 0"),
        (f"{section}.micro_batch_tokens", 100, f"{section}.micro_batch_tokens", "100 is smaller than the longest"),
        (f"{section}.zero_lr_first_iteration", 1, f"{section}.zero_lr_first_iteration", "True or False"),
        (f"{section}.warmup_steps", -1, f"{section}.warmup_steps", ">= 0"))],
    ("actor.clip_ratio", 1.5, "actor.clip_ratio", "<= 1"),
    ("actor.clip_ratio_high", -0.2, "actor.clip_ratio_high", ">= 0"),
    ("actor.ppo_epochs", 0, "actor.ppo_epochs", ">= 1"),
    ("actor.entropy_coeff", -0.01, "actor.entropy_coeff", ">= 0"),
    ("actor.loss_agg", "sum", "actor.loss_agg", "'sum' is not one of"),
    ("prm.beta", 0.0, "prm.beta", "> 0"),
    ("prm.update_mode", "sometimes", "prm.update_mode", "'sometimes' is not one of"),
    ("prm.granularity", "step", "prm.granularity", "is not one of"),
    ("prm.include_eos", "yes", "prm.include_eos", "True or False"),
    ("prm.norm_scope", "local", "prm.norm_scope", "is not one of"),
    ("verifier.num_workers", 0, "verifier.num_workers", ">= 1"),
    ("verifier.item_timeout_s", 0.0, "verifier.item_timeout_s", "> 0"),
    ("verifier.batch_timeout_s", -1.0, "verifier.batch_timeout_s", "> 0"),
    ("verifier.literal_numbers", "yes", "verifier.literal_numbers", "True or False"),
    ("verifier.allow_unsandboxed", 1, "verifier.allow_unsandboxed", "True or False"),
    ("eval.freq", 0, "eval.freq", ">= 1"),
    ("eval.before_train", "no", "eval.before_train", "True or False"),
    ("eval.max_response_length", -1, "eval.max_response_length", ">= 0"),
    ("eval.batch_size", 0, "eval.batch_size", ">= 1"),
    ("eval.k", 0, "eval.k", ">= 1"),
    ("eval.temperature", -1.0, "eval.temperature", ">= 0"),
    ("checkpoint.freq", 0, "checkpoint.freq", ">= 1"),
    ("checkpoint.keep", 0, "checkpoint.keep", ">= 1"),
    ("checkpoint.export_hf", "yes", "checkpoint.export_hf", "True or False"),
    ("log.tensorboard", 1, "log.tensorboard", "True or False"),
    ("log.plot", 0, "log.plot", "True or False"),
    ("log.wandb_project", 3, "log.wandb_project", "must be a string"),
    ("warm_start.steps", -1, "warm_start.steps", ">= 0"),
    ("warm_start.batch_size", 0, "warm_start.batch_size", ">= 1"),
    ("warm_start.num_examples", 0, "warm_start.num_examples", ">= 1"),
    ("warm_start.lr", 0.0, "warm_start.lr", "> 0"),
    ("length_mix.prompt_tokens", -1, "length_mix.prompt_tokens", ">= 0"),
    ("length_mix.response_tokens", -1, "length_mix.response_tokens", ">= 0"),
    ("length_mix.clipped_fraction", 1.5, "length_mix.clipped_fraction", "<= 1"),
]


@pytest.mark.parametrize("key, value, named, fragment", RULES, ids=[f"{r[2]}:{r[1]!r}" for r in RULES])
def test_each_bad_value_is_one_line_naming_a_key_that_exists(tmp_path, key, value, named, fragment):
    c = tiny(tmp_path, **(key if isinstance(key, dict) else {}))
    if not isinstance(key, dict):
        section, _, name = key.rpartition(".")
        node = c[section] if section else c
        if isinstance(value, dict):
            node[name] = ml_collections.ConfigDict(value)
        else:
            with node.ignore_type():
                node[name] = value
    with pytest.raises(settings.ConfigError) as err:
        settings.resolve(c, one_device())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config.{named}: "), message
    assert re.search(fragment, message), message
    section, _, name = named.rpartition(".")
    assert name in (base_config()[section] if section else base_config()), f"{named} is not a base_config key"


def test_every_key_has_a_rule_or_is_free_form():
    tested = {r[0] for r in RULES if isinstance(r[0], str)} | {r[2] for r in RULES}
    untested = leaf_keys(base_config()) - tested - FREE_FORM
    assert not untested, f"keys without a rule in this table: {sorted(untested)}"


def test_rules_that_need_the_mesh(tmp_path):
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    c = tiny(tmp_path, **{"actor.mini_batch_size": 32, "actor.micro_batch_size": 3 * 1})
    with pytest.raises(settings.ConfigError, match=r"^config\.actor\.micro_batch_size: 3 does not divide"):
        settings.resolve(c, mesh)
    c = tiny(tmp_path, **{"prm.mini_batch_size": 64, "prm.micro_batch_size": 1})
    with pytest.raises(settings.ConfigError, match=r"^config\.prm\.micro_batch_size: 1 is not divisible by the "
                                                   r"data-parallel size 2"):
        settings.resolve(c, mesh)
    c = tiny(tmp_path, **{"train.batch_size": 1, "rollout.n_samples": 3, "actor.mini_batch_size": 3,
                          "actor.micro_batch_size": 3, "prm.mini_batch_size": 3, "prm.micro_batch_size": 3})
    with pytest.raises(settings.ConfigError, match=r"^config\.train\.batch_size: 3 rows per step"):
        settings.resolve(c, mesh)
    c = tiny(tmp_path, **{"actor.micro_batch_tokens": 3 * 144})
    with pytest.raises(settings.ConfigError, match=r"^config\.actor\.micro_batch_tokens: 432 is not a multiple of "
                                                   r"train\.pack_length=144 times the data-parallel size 2"):
        settings.resolve(c, mesh)


def test_resolve_derives_the_run_and_leaves_the_config_unchanged(tmp_path):
    c = tiny(tmp_path)
    before = c.to_dict()
    s = settings.resolve(c, one_device())
    assert c.to_dict() == before
    assert s.rows_per_step == 128 and s.prompts_per_call == 32 and s.sampler.rows == 128
    assert s.warm_start.needed and s.model.path == str(tmp_path / "run" / "sft")
    assert s.model.tokenizer == str(tmp_path / "run" / "sft" / "tokenizer.model")
    assert s.model.prm_path == s.model.ref_path == s.model.path
    assert s.model.scan_layers  # configs/tiny.py keeps the scan; model.layers=auto unrolls on CPU:
    assert not settings.resolve(tiny(tmp_path, **{"model.layers": "auto"}), one_device()).model.scan_layers
    assert s.model.attention == "xla" and s.model.arch.hidden_size == 128 and s.model.arch.vocab_size == 512
    assert s.ppo_pack.row_length == s.prm_pack.row_length == 96 + 48
    assert s.ppo_pack.micro_batch_tokens == 32 * 144 and s.prm_pack.micro_batch_tokens == 64 * 144
    assert s.sampler.steps_per_sync == 4 and s.eval.max_response_length == 48
    assert s.runs_prm and s.advantages.estimator == "rloo"
    outcome_only = settings.resolve(tiny(tmp_path, **{"algorithm.process_coef": 0.0, "prm.update_mode": "none"}),
                                    one_device())
    assert not outcome_only.runs_prm


def test_eval_sampler_shares_the_training_knobs(tmp_path):
    s = settings.resolve(tiny(tmp_path), one_device())
    from prime_jax.sampling import SamplingParams

    cfg = s.sampler_config(n=4, max_new_tokens=48, prompts=128, buckets=(16, 1024), sampling=SamplingParams(), pad_id=0)
    assert (cfg.rows, cfg.n, cfg.buckets) == (512, 4, (16, 1024))
    for knob in ("steps_per_sync", "kv_block", "gather_params", "per_layer", "compact_tail", "refill", "data_parallel"):
        assert getattr(cfg, knob) == getattr(s.sampler, knob), knob


def test_qwen7b_resolves_with_its_inline_architecture(tmp_path):
    c = load_config("qwen7b")
    c.model.path = ""
    c.data.source = "synthetic"
    s = settings.resolve(c, one_device())
    assert s.model.arch.model_type == "qwen2" and round(s.model.arch.num_params / 1e9, 2) == 7.62
    assert s.length_mix.prompt_tokens <= 1024 and s.length_mix.response_tokens <= 3072


def test_check_paths_names_the_missing_model_or_tokenizer(tmp_path, qwen2_dir):
    c = load_config("qwen7b")
    c.model.path = "/nonexistent"  # the inline model.arch is enough for resolve (dry runs, AOT), not for a run
    s = settings.resolve(c, one_device())
    with pytest.raises(settings.ConfigError, match=r"^config\.model\.path: no config\.json in '/nonexistent'"):
        settings.check_paths(s)
    c.model.path = qwen2_dir  # a checkpoint without a tokenizer
    with pytest.raises(settings.ConfigError, match=r"^config\.model\.path: no tokenizer at"):
        settings.check_paths(settings.resolve(c, one_device()))
    c.model.tokenizer = str(tmp_path / "missing.model")
    with pytest.raises(settings.ConfigError, match=r"^config\.model\.tokenizer: no tokenizer at"):
        settings.check_paths(settings.resolve(c, one_device()))
    c.model.ref_path = str(tmp_path)
    with pytest.raises(settings.ConfigError, match=r"^config\.model\.ref_path: no config\.json"):
        settings.check_paths(settings.resolve(c, one_device()))
