"""TRL's GRPOTrainer on the vs_peers workload; prints one `PEER_RESULT {json}` line of step timings.

    <venv>/bin/python bench/peers/trl_grpo.py WORKLOAD.json OUT_DIR

Runs in its own virtualenv (bench/peers/requirements-trl.txt), made by bench/vs_peers.py. The policy is the saved
Qwen2 (fp32, CPU), the prompts are the workload's chat messages (TRL applies the tokenizer's chat template), the
reward is `peer_common.math_reward` (math-verify against the ground truth). One GRPO epoch, one mini-batch of
prompts x n completions per optimiser step (per_device_train_batch_size = prompts x n, no accumulation), no KL
term (beta 0: no reference model), AdamW at a constant lr.

Timing (wall clock, per optimiser step, `peer_common.StepClock`): a step runs from one `on_step_begin` to the next;
`gen` = `GRPOTrainer._generate` (prompt tokenisation, `generate`, decoding), `grade` = the reward function,
train = the rest of the step (log-probs, advantages, forward/backward, optimiser step).
"""

from __future__ import annotations

import os
import sys
import time

import peer_common


def main(workload_path: str, out_dir: str) -> None:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    w = peer_common.load_workload(workload_path)
    torch.manual_seed(w["seed"])
    tokenizer = AutoTokenizer.from_pretrained(w["model_dir"])
    model = Qwen2ForCausalLM.from_pretrained(w["model_dir"], dtype=torch.float32)
    rows = [{"prompt": p["messages"], "solution": p["answer"]} for p in w["prompts"]]
    dataset = datasets.Dataset.from_list(rows)
    total = w["warmup"] + w["steps"]
    clock = peer_common.StepClock(total)
    completions = len(rows) * w["n"]

    def reward(completions, solution, **_):
        t0 = time.perf_counter()
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        out = peer_common.math_reward(texts, solution)
        clock.add("grade", time.perf_counter() - t0)
        return out

    reward.__name__ = "math_verify"

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin_step()

        def on_train_end(self, args, state, control, **kwargs):
            clock.end()

    config = GRPOConfig(
        output_dir=out_dir, max_steps=total, seed=w["seed"], use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1, num_generations=w["n"],
        max_completion_length=w["max_new_tokens"], temperature=w["temperature"], top_p=1.0, top_k=0,
        learning_rate=w["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=w["weight_decay"],
        max_grad_norm=w["grad_clip"], optim="adamw_torch", beta=0.0, num_iterations=1, epsilon=w["clip_ratio"],
        loss_type="grpo", shuffle_dataset=False, report_to="none", save_strategy="no", logging_steps=total,
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    generate = trainer._generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = generate(prompts)
        clock.add("gen", time.perf_counter() - t0)
        clock.add("gen_tokens", float(sum(len(ids) for ids in out[1])))
        return out

    trainer._generate = timed_generate
    trainer.train()
    result = peer_common.summarize(clock.steps, w["warmup"])
    result.update(side="trl", arm="grpo", label=f"TRL {trl.__version__} GRPO",
                  versions={"trl": trl.__version__, "transformers": transformers.__version__,
                            "torch": torch.__version__, "python": sys.version.split()[0]},
                  threads=torch.get_num_threads(), pid=os.getpid())
    peer_common.emit(result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
