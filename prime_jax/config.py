"""Run configuration: the defaults of the PRIME recipe (PRIME_SPEC.md §3) and their validation.

Every `configs/*.py` starts from `base_config()` and overrides what differs. `validate` runs before
any weights are loaded or programs compiled; a bad value is a one-line `ValueError` naming its key.
"""

from __future__ import annotations

import ml_collections

from prime_jax.models.config import CONFIG_ATTENTION

ESTIMATORS = ("rloo", "grpo", "reinforce")
PRM_UPDATES = ("after", "before", "none")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"
    c.dry_run = False          # validate, print the resolved config and memory plan, load nothing
    c.distributed = False      # jax.distributed.initialize() (TPU pods; GPU hosts via JAX_* env vars)
    c.total_steps = 592        # PRIME steps (the released Eurus-2-7B-PRIME is step 592)

    c.model = ml_collections.ConfigDict()
    c.model.path = ""          # HF directory of the SFT policy; the PRM and the reference start from it too
    c.model.prm_path = ""      # default: model.path
    c.model.ref_path = ""      # default: model.path (ref_type "freeze")
    c.model.tokenizer = ""     # default: model.path
    c.model.param_dtype = "float32"   # trainable copies (policy, PRM) and their Adam moments
    c.model.ref_dtype = "bfloat16"    # the frozen reference
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.model.logits_chunk = 1024
    c.model.attention = "auto"  # training attention: auto (16-bit: cuDNN on GPU, Pallas splash on TPU; else XLA) | xla | cudnn | splash

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.data = ml_collections.ConfigDict()
    c.data.source = "files"     # files | tfds | synthetic
    c.data.train_files = ""     # comma-separated JSONL/Parquet globs in the Eurus-2-RL-Data schema
    c.data.val_files = ""
    c.data.tfds_dir = ""        # prepared eurus2_rl_data dataset (data.source = tfds)
    c.data.max_prompt_length = 1024
    c.data.max_val_prompts = 0  # 0: all

    c.synthetic = ml_collections.ConfigDict()  # data.source = synthetic (the built-in run)
    c.synthetic.train_size = 4000
    c.synthetic.val_size = 256
    c.synthetic.math_frac = 0.75
    c.synthetic.difficulty = 2
    c.synthetic.max_operand = 0         # 0: operands grow with difficulty (10 * difficulty); >= 2 caps them
    c.synthetic.vocab_size = 512

    c.rollout = ml_collections.ConfigDict()
    c.rollout.n_samples = 4
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.max_response_length = 3072
    c.rollout.prompts_per_call = 0      # prompts in flight x n_samples = sampler rows, <= train.batch_size (0: train.batch_size); bounds the KV cache
    c.rollout.steps_per_sync = 16       # most decode steps between host round trips (stopped rows replaced then)
    c.rollout.kv_block = 256            # KV cache slots per attention block (TPU/GPU decode reads the filled ones)
    c.rollout.kv_cache_gib = 0.0        # KV cache budget per device (0: unchecked); more rows in flight fail early
    c.rollout.gather_params = False     # decode gathers the policy once per call, replicated in the compute dtype
                                        # (+ 2 bytes a param a device at bf16), not every layer's weights every step
    c.rollout.compact_tail = "auto"     # once no prompt waits, live rows move into halved batches (a decode program
                                        # each): auto (CPU only: not yet costed on TPU/GPU) | on | off

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256            # prompts per step; the learner sees batch_size * n_samples rows
    c.train.filter_accuracy = True
    c.train.accuracy_lower_bound = 0.2
    c.train.accuracy_upper_bound = 0.8
    c.train.filter_truncated = False
    c.train.max_rounds = 8              # max_rounds x batch_size prompts offered to a step's sampler call, which stops once the filter has a batch
    c.train.packing = True              # PRM / reference / PPO passes on packed rows; False: one padded row per sequence
    c.train.pack_length = 0             # slots per packed row (0: data.max_prompt_length + rollout.max_response_length)

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.adv_estimator = "rloo"
    c.algorithm.process_formula = "reference"   # reference | paper (RLOO on process rewards)
    c.algorithm.gamma_process = 1.0
    c.algorithm.gamma_outcome = 1.0
    c.algorithm.process_coef = 1.0      # 0: the paper's "RLOO w/ outcome verifier only" baseline
    c.algorithm.process_credit = "sum"  # sum | min (PURE, arXiv 2504.15275: process return = min of future rewards)
    c.algorithm.rm_coef = 5.0           # logging-only weights, as the reference (advantages are whitened)
    c.algorithm.verifier_coef = 5.0

    c.actor = ml_collections.ConfigDict()
    c.actor.lr = 5e-7
    c.actor.weight_decay = 0.01
    c.actor.grad_clip = 1.0
    c.actor.clip_ratio = 0.2
    c.actor.clip_ratio_high = 0.0       # 0: symmetric
    c.actor.mini_batch_size = 256       # responses per optimiser step
    c.actor.micro_batch_size = 8
    c.actor.micro_batch_tokens = 0      # packed token budget per forward-backward (0: micro_batch_size full rows)
    c.actor.ppo_epochs = 1
    c.actor.entropy_coeff = 0.0
    c.actor.loss_agg = "seq-mean-token-mean"
    c.actor.zero_lr_first_iteration = False   # True reproduces the reference's lr=0 on iteration 1
    c.actor.warmup_steps = 0                  # linear lr warmup over this many PRIME steps

    c.prm = ml_collections.ConfigDict()
    c.prm.lr = 1e-6
    c.prm.weight_decay = 0.0
    c.prm.grad_clip = 10.0
    c.prm.beta = 0.05
    c.prm.mini_batch_size = 256
    c.prm.micro_batch_size = 8
    c.prm.micro_batch_tokens = 0        # packed token budget per forward-backward (0: micro_batch_size full rows)
    c.prm.update_mode = "after"        # after (single forward) | before (double forward) | none
    c.prm.granularity = "token"        # token | whole
    c.prm.include_eos = True
    c.prm.norm_scope = "global"        # global | shard (the reference normalises per data shard)
    c.prm.zero_lr_first_iteration = False
    c.prm.warmup_steps = 0

    c.verifier = ml_collections.ConfigDict()
    c.verifier.num_workers = 64
    c.verifier.item_timeout_s = 300.0
    c.verifier.batch_timeout_s = 1800.0
    c.verifier.literal_numbers = False  # True: a number ground truth needs a number answer, not an expression
    # UNSAFE. True: without a working bubblewrap, run model-written code anyway (rlimits, and a uid of its
    # own when root, only). False: code items then score 0, counted as verifier/unsandboxed.
    c.verifier.allow_unsandboxed = False

    c.eval = ml_collections.ConfigDict()
    c.eval.freq = 16
    c.eval.before_train = True
    c.eval.max_response_length = 0     # 0: rollout.max_response_length
    c.eval.batch_size = 256            # prompts per validation generate call
    c.eval.k = 1                       # responses per prompt; val/test_score is their mean (avg@k)
    c.eval.temperature = 0.0           # 0: greedy pass@1, as the reference validates

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.freq = 16
    c.checkpoint.keep = 3
    c.checkpoint.export_hf = True      # export policy and PRM as HF safetensors at the end

    c.log = ml_collections.ConfigDict()
    c.log.every = 1
    c.log.tensorboard = True
    c.log.wandb_project = ""
    c.log.plot = True

    c.warm_start = ml_collections.ConfigDict()
    c.warm_start.steps = 0             # > 0: supervised warm start before PRIME (built-in tiny run)
    c.warm_start.batch_size = 32
    c.warm_start.lr = 1e-3
    c.warm_start.num_examples = 4000
    c.warm_start.arch = ml_collections.ConfigDict()  # ModelConfig fields of the model to initialise

    c.model.arch = ml_collections.ConfigDict()  # HF config.json fields, for dry runs / AOT without weights

    # The token lengths a step really has, for `python -m prime_jax.aot`'s whole-step roofline (step_s):
    # mean prompt and response tokens and the fraction of responses that reach rollout.max_response_length.
    # 0 means "at the limit" (every prompt data.max_prompt_length, every response the full length); a mean above
    # its limit counts as the limit.
    c.length_mix = ml_collections.ConfigDict()
    c.length_mix.prompt_tokens = 0
    c.length_mix.response_tokens = 0
    c.length_mix.clipped_fraction = 0.0
    return c


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"config.{key}: {msg}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks values and their combinations; raises ValueError('config.<key>: ...') on the first problem."""
    n = c.rollout.n_samples
    rows = c.train.batch_size * n
    if c.data.source not in ("files", "tfds", "synthetic"):
        _fail("data.source", f"{c.data.source!r} is not one of files, tfds, synthetic")
    if c.data.source == "files" and not c.data.train_files:
        _fail("data.train_files", "empty; give JSONL/Parquet paths (or data.source=synthetic|tfds)")
    if c.data.source == "tfds" and not c.data.tfds_dir:
        _fail("data.tfds_dir", "empty while data.source=tfds")
    if c.data.source == "tfds" and "://" in c.data.tfds_dir:
        _fail("data.tfds_dir", f"{c.data.tfds_dir} is remote; its array_record files are read from local disk only: "
              f"stage it first (gcloud storage cp -r {c.data.tfds_dir} /local/dir) and pass the local directory, "
              "or read Parquet from the bucket (data.source=files)")
    if c.synthetic.max_operand < 0 or c.synthetic.max_operand == 1:
        _fail("synthetic.max_operand", f"must be 0 (grow with difficulty) or >= 2, got {c.synthetic.max_operand}")
    if c.data.source != "synthetic" and not c.model.path:
        _fail("model.path", "empty; give a local Hugging Face model directory")
    for key in ("train.batch_size", "rollout.max_response_length", "data.max_prompt_length", "total_steps",
                "actor.mini_batch_size", "actor.micro_batch_size", "prm.mini_batch_size", "prm.micro_batch_size",
                "actor.ppo_epochs", "verifier.num_workers", "train.max_rounds"):
        section, name = key.split(".") if "." in key else (None, key)
        value = c[section][name] if section else c[name]
        if not isinstance(value, int) or value < 1:
            _fail(key, f"must be a positive integer, got {value!r}")
    if n < 1:
        _fail("rollout.n_samples", f"must be >= 1, got {n}")
    if c.algorithm.adv_estimator not in ESTIMATORS:
        _fail("algorithm.adv_estimator", f"{c.algorithm.adv_estimator!r} is not one of {ESTIMATORS}")
    if c.algorithm.adv_estimator in ("rloo", "grpo") and n < 2:
        _fail("rollout.n_samples", f"{c.algorithm.adv_estimator} needs at least 2 samples per prompt, got {n}")
    if c.algorithm.process_formula not in ("reference", "paper"):
        _fail("algorithm.process_formula", f"{c.algorithm.process_formula!r} is not one of reference, paper")
    if c.algorithm.process_credit not in ("sum", "min"):
        _fail("algorithm.process_credit", f"{c.algorithm.process_credit!r} is not one of sum, min")
    if c.algorithm.process_credit == "min" and c.algorithm.gamma_process != 1.0:
        _fail("algorithm.gamma_process", f"min-form process credit needs gamma_process=1, got {c.algorithm.gamma_process}")
    if c.rollout.prompts_per_call < 0:
        _fail("rollout.prompts_per_call", f"must be >= 0 (0: train.batch_size), got {c.rollout.prompts_per_call}")
    for key in ("steps_per_sync", "kv_block"):
        if not isinstance(c.rollout[key], int) or c.rollout[key] < 1:
            _fail(f"rollout.{key}", f"must be a positive integer, got {c.rollout[key]!r}")
    if c.rollout.kv_cache_gib < 0:
        _fail("rollout.kv_cache_gib", f"must be >= 0 (0: unchecked), got {c.rollout.kv_cache_gib}")
    if c.rollout.temperature < 0:
        _fail("rollout.temperature", f"must be >= 0, got {c.rollout.temperature}")
    if not 0 < c.rollout.top_p <= 1:
        _fail("rollout.top_p", f"must be in (0, 1], got {c.rollout.top_p}")
    if not 0 <= c.train.accuracy_lower_bound <= c.train.accuracy_upper_bound <= 1:
        _fail("train.accuracy_lower_bound", "need 0 <= accuracy_lower_bound <= accuracy_upper_bound <= 1")
    for section in ("actor", "prm"):
        mini, micro = c[section].mini_batch_size, c[section].micro_batch_size
        if rows % mini:
            _fail(f"{section}.mini_batch_size", f"{mini} does not divide the {rows} rows of a step (train.batch_size * rollout.n_samples)")
        if mini % micro:
            _fail(f"{section}.micro_batch_size", f"{micro} does not divide {section}.mini_batch_size={mini}")
        if c[section].lr < 0:
            _fail(f"{section}.lr", f"must be >= 0, got {c[section].lr}")
    if c.prm.update_mode not in PRM_UPDATES:
        _fail("prm.update_mode", f"{c.prm.update_mode!r} is not one of {PRM_UPDATES}")
    if c.prm.granularity not in ("token", "whole"):
        _fail("prm.granularity", f"{c.prm.granularity!r} is not one of token, whole")
    if c.prm.norm_scope not in ("global", "shard"):
        _fail("prm.norm_scope", f"{c.prm.norm_scope!r} is not one of global, shard")
    if c.actor.loss_agg not in ("token", "seq-mean-token-mean"):
        _fail("actor.loss_agg", f"{c.actor.loss_agg!r} is not one of token, seq-mean-token-mean")
    for key, value in c.mesh.items():
        if not isinstance(value, int) or (value < 1 and value != -1):
            _fail(f"mesh.{key}", f"must be a positive integer or -1, got {value!r}")
    mix = c.length_mix
    for key in ("prompt_tokens", "response_tokens"):
        if not mix[key] >= 0:
            _fail(f"length_mix.{key}", f"must be >= 0 (0: at the limit), got {mix[key]!r}")
    if not 0 <= mix.clipped_fraction <= 1:
        _fail("length_mix.clipped_fraction", f"must be in [0, 1], got {mix.clipped_fraction!r}")
    longest = c.data.max_prompt_length + c.rollout.max_response_length
    if not isinstance(c.train.pack_length, int) or c.train.pack_length < 0:
        _fail("train.pack_length", f"must be an integer >= 0, got {c.train.pack_length!r}")
    if c.train.packing and 0 < c.train.pack_length < longest:
        _fail("train.pack_length", f"{c.train.pack_length} is shorter than the longest sequence, data.max_prompt_length "
                                   f"+ rollout.max_response_length = {longest}")
    for section in ("actor", "prm"):
        tokens = c[section].micro_batch_tokens
        if not isinstance(tokens, int) or tokens < 0:
            _fail(f"{section}.micro_batch_tokens", f"must be an integer >= 0, got {tokens!r}")
        if c.train.packing and 0 < tokens < (c.train.pack_length or longest):
            _fail(f"{section}.micro_batch_tokens", f"{tokens} is smaller than the longest sequence "
                                                   f"(train.pack_length={c.train.pack_length or longest})")
    if c.rollout.compact_tail not in ("auto", "on", "off"):
        _fail("rollout.compact_tail", f"{c.rollout.compact_tail!r} is not one of auto, on, off")
    if c.model.attention not in ("auto", *CONFIG_ATTENTION):
        _fail("model.attention", f"{c.model.attention!r} is not one of auto, {', '.join(CONFIG_ATTENTION)}")
    for key in ("param_dtype", "ref_dtype", "compute_dtype"):
        if c.model[key] not in ("float32", "bfloat16", "float16"):
            _fail(f"model.{key}", f"{c.model[key]!r} is not one of float32, bfloat16, float16")
