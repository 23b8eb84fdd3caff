"""Run configuration: every key and its default, the PRIME recipe (docs/prime_spec.md §3).

Every `configs/*.py` starts from `base_config()` and overrides what differs. The keys are read and checked in
one place, `prime_jax.settings.resolve`, before any weights are loaded or programs compiled.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import ml_collections


def config_module(path: str) -> ModuleType:
    """A `configs/*.py` file loaded as a module by path (its `get_config()`, and `SHARDING` where it has plans), so one
    config file can start from another's: `config_module(os.path.join(os.path.dirname(__file__), "tiny.py"))`."""
    spec = importlib.util.spec_from_file_location(f"_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ValueError(f"cannot load a config file from {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    c.model.remat_saves = "nothing"  # with remat, what a layer keeps for the backward: nothing | dots (matmul outputs)
    c.model.layers = "auto"    # full-sequence forward: auto (unroll on CPU, scan elsewhere) | scan | unroll
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
    c.synthetic.code_steps = False      # warm-start code solutions: False `return <expr>`; True one `x = x op n` line a step
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
    c.rollout.max_staleness = 0         # policy versions a rollout may lag the step that trains on it: 0 = sample
                                        # with the current policy (synchronous); k >= 1: step t+k's rollouts are
                                        # sampled with step t's policy while step t trains (one process only)
    c.rollout.devices = 0               # devices of a sampler mesh of their own (the first ones; the rest train);
                                        # 0: the sampler shares the training mesh

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256            # prompts per step; the learner sees batch_size * n_samples rows
    c.train.filter_accuracy = True
    c.train.accuracy_lower_bound = 0.2
    c.train.accuracy_upper_bound = 0.8
    c.train.filter_truncated = False
    c.train.max_rounds = 8              # max_rounds x batch_size prompts offered to a step's sampler call, which stops once the filter has a batch
    c.train.layout = "packed"           # PRM / reference / PPO passes: "packed" rows; "padded", one row per sequence;
                                        # "shared_prompt", each prompt's layers once for its samples (XLA attention)
    c.train.pack_length = 0             # slots per packed row (0: data.max_prompt_length + rollout.max_response_length)
    c.train.max_nonfinite_steps = 3     # a PRM/PPO update with non-finite loss or gradients is skipped; this many steps
                                        # in a row that skipped one stop the run (checkpoint of the last good state)

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
    c.prm.shuffle_labels = False       # control: the PRM learns from the batch's outcome labels permuted (no information)
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

