"""Every script on the offline real model (SmolLM2-135M-Instruct, `--model smollm2`) at a small
budget: the command, its time per step, its peak memory and its metrics, as one table.

    # about 10 minutes on 2 CPU cores; bench_results/real_model.md
    python bench/real_model_runs.py
    # some of them
    python bench/real_model_runs.py --only grpo,gkd

Step time: the median `step_time` of metrics.jsonl (sft_think: tokens per second instead); peak
memory: the process's peak resident set (summary.json). Runs go to a temporary directory unless
--runs is given.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = "data/word_problems/train.jsonl", "data/word_problems/test.jsonl"
M = ["--model", "smollm2"]


def commands(r: Path, docs: Path) -> list[tuple[str, list[str]]]:
    sft = str(r / "sft_think")
    return [
        (
            "sft_think",
            [
                "sft_think.py",
                *M,
                "--data",
                TRAIN,
                "--max-steps",
                "8",
                "--batch-size",
                "8",
                "--micro-batch-size",
                "8",
                "--lr",
                "2e-4",
                "--lora-r",
                "32",
                "--eval-size",
                "16",
            ],
        ),
        (
            "grpo",
            [
                "grpo.py",
                *M,
                "--data",
                TRAIN,
                "--eval-data",
                TEST,
                "--init-adapter",
                sft,
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--num-generations",
                "8",
                "--max-completion-length",
                "96",
                "--lr",
                "5e-5",
                "--eval-size",
                "8",
                "--eval-samples",
                "2",
            ],
        ),
        (
            "dpo_online",
            [
                "dpo_online.py",
                *M,
                "--data",
                str(docs),
                "--judge",
                "smollm2",
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--num-rollouts",
                "4",
                "--prefix-tokens",
                "24",
                "--suffix-tokens",
                "16",
                "--skip-short-documents",
                "--eval-size",
                "8",
            ],
        ),
        (
            "rlmt",
            [
                "rlmt.py",
                *M,
                "--data",
                TRAIN,
                "--eval-data",
                TEST,
                "--init-adapter",
                sft,
                "--judge",
                "smollm2",
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--num-generations",
                "8",
                "--thought-tokens",
                "64",
                "--answer-tokens",
                "32",
                "--gate-prefixes",
                "8",
            ],
        ),
        (
            "gkd",
            [
                "gkd.py",
                *M,
                "--teacher",
                "smollm2",
                "--teacher-adapter",
                sft,
                "--data",
                TRAIN,
                "--eval-data",
                TEST,
                "--eval-size",
                "8",
                "--max-steps",
                "3",
                "--batch-size",
                "8",
                "--micro-batch-size",
                "8",
                "--max-new-tokens",
                "96",
            ],
        ),
        (
            "karcher_merge",
            [
                "karcher_merge.py",
                "--base",
                "smollm2",
                "--adapters",
                sft,
                str(r / "grpo"),
                "--eval-data",
                str(docs),
                "--prompts",
                "2",
                "--samples",
                "4",
                "--max-new-tokens",
                "48",
            ],
        ),
        (
            "eval_reasoning",
            [
                "eval_reasoning.py",
                *M,
                "--arms",
                f"base=,sft={sft}",
                "--benchmarks",
                "gsm8k",
                "--data",
                f"gsm8k={TEST}",
                "--limit",
                "16",
                "--num-samples",
                "4",
                "--max-new-tokens",
                "128",
            ],
        ),
    ]


def describe(name: str, out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").exists()
        else []
    )
    steps = [r["step_time"] for r in rows if r.get("step_time") is not None]
    res = {
        "peak_mb": summary.get("peak_memory_mb"),
        "wall_s": summary.get("wall_seconds"),
        "step_s": statistics.median(steps[1:] or steps) if steps else None,
    }
    held = summary.get("heldout")
    if isinstance(held, dict) and "metric" in held:
        res["metric"] = f"{held['metric']} {held.get('before')} -> {held.get('after')}"
    if name == "sft_think":
        losses = [r["loss"] for r in rows if "loss" in r]
        res["metric"] = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; " + res.get("metric", "")
        res["tok_s"] = [r for r in rows if "tokens_per_s" in r][-1]["tokens_per_s"]
    if name == "karcher_merge":
        arms = {e["arm"]: e["all/nll"] for e in summary["eval"]}
        res["metric"] = "held-out NLL " + ", ".join(f"{a} {v:.3f}" for a, v in arms.items())
    if name == "eval_reasoning":
        res["metric"] = "Mean@4 " + ", ".join(
            f"{a} {v['macro']['mean_at_k']:.3f}" for a, v in summary["results"].items()
        )
    judged = [r["judge/invalid_rate"] for r in rows if r.get("judge/invalid_rate") is not None]
    if judged:
        res["metric"] = res.get("metric", "") + f"; judge invalid rate {max(judged):.2f} at most"
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--runs", default="", help="run directories here (default: a temporary directory)"
    )
    p.add_argument("--only", default="", help="comma-separated script names")
    p.add_argument(
        "--out", default="bench_results", help="where real_model.md and real_model.json go"
    )
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="real_model_") as tmp:
        r = Path(a.runs or tmp)
        r.mkdir(parents=True, exist_ok=True)
        docs = r / "docs.jsonl"  # the worked problems as plain documents, for the document methods
        rows = [json.loads(x) for x in (ROOT / TRAIN).read_text().splitlines()[:200]]
        docs.write_text(
            "".join(
                json.dumps({"text": x["question"] + " " + x["answer"].replace("\n", " ")}) + "\n"
                for x in rows
            )
        )
        previous = ROOT / a.out / "real_model.json"  # --only updates the rows it reruns
        results = json.loads(previous.read_text()) if a.only and previous.exists() else {}
        for name, argv in commands(r, docs):
            if a.only and name not in a.only.split(","):
                continue
            cmd = [sys.executable, *argv, "--out", str(r / name)]
            print(f"==> {name}\n$ python {shlex.join(argv)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            shown = "python " + shlex.join(argv).replace(
                str(r), "<runs>"
            )  # no path of this machine in results
            results[name] = {
                "command": shown,
                "process_s": time.perf_counter() - t0,
                **describe(name, r / name),
            }
            print(json.dumps(results[name]), flush=True)
    lines = ["| script | step (s) | peak MB | wall (s) | metrics |", "|---|---|---|---|---|"]
    for name, v in results.items():
        step = (
            f"{v['step_s']:.1f}"
            if v.get("step_s")
            else (f"{v['tok_s']:.0f} tok/s" if v.get("tok_s") else "-")
        )
        lines.append(
            f"| {name} | {step} | {v['peak_mb']:.0f} | {v['wall_s']:.0f} | {v.get('metric', '')} |"
        )
    lines += [
        "",
        "Commands (`<runs>`: --runs, each run in <runs>/<script>; --out <runs>/<script> added):",
        "",
    ]
    lines += [f"- {name}: `{v['command']}`" for name, v in results.items()]
    text = "\n".join(lines) + "\n"
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_model.md").write_text(text)
    (out / "real_model.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
