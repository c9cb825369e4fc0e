"""The real-model tour: thinking SFT, then GRPO, on a real pretrained chat model, on a CPU, offline.

    # SmolLM2-135M-Instruct (offline.py), runs in runs/real
    python scripts/real_tour.py
    # any chat model (a GPU helps)
    python scripts/real_tour.py --model Qwen/Qwen3-0.6B-Base --runs runs/real_qwen
    # print the commands only
    python scripts/real_tour.py --dry-run

The data are grade-school word problems written for this repo (data/word_problems, GSM8K's format;
see scripts/make_word_problems.py). The stages:

  sft_think   sft_think.py: the model learns to think in <think>...</think>, then answer with
              `#### N`
  grpo        grpo.py from the SFT adapter: correct answer (1.0) + format (0.1), groups of 8
  eval        eval_reasoning.py over the arms base / sft / grpo (the held-out problems, k samples
              each)

Then, per arm on the held-out problems: the think-format rate (a closed `<think>...</think>`
followed by a `#### N` line) and the accuracy (Mean@k), each with a 95% interval over problems (k
samples of one problem are not independent), the paired differences between arms, and what the model
wrote for one problem before and after. The tables go to <runs>/tour.md and <runs>/tour.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import study  # noqa: E402  (scripts/: its stage runner)

import dataio  # noqa: E402

DATA = Path("data") / "word_problems"  # relative: the stages run in the repo root
# SFT: a small LoRA learns the format fast; GRPO: 8 samples per prompt at T 1.0 (grpo.py's hub
# default)
SFT = [
    "--max-steps",
    "40",
    "--batch-size",
    "8",
    "--micro-batch-size",
    "8",
    "--max-length",
    "256",
    "--lr",
    "2e-4",
    "--lora-r",
    "32",
    "--eval-size",
    "16",
]
GRPO = [
    "--max-steps",
    "10",
    "--batch-size",
    "4",
    "--num-generations",
    "8",
    "--max-completion-length",
    "96",
    "--lr",
    "5e-5",
    "--reward",
    "correct:1.0,format:0.1",
    "--eval-size",
    "16",
    "--eval-samples",
    "2",
]
EVAL = [
    "--benchmarks",
    "gsm8k",
    "--limit",
    "40",
    "--num-samples",
    "4",
    "--max-new-tokens",
    "128",
    "--temperature",
    "0.6",
    "--top-p",
    "1.0",
]
FORMAT = re.compile(r"<think>.*?</think>.*^#### *-?[\d,]+(\.\d+)?\s*$", re.DOTALL | re.MULTILINE)


def stages(r: Path, model: str) -> list[tuple[str, list[str]]]:
    train, test = str(DATA / "train.jsonl"), str(DATA / "test.jsonl")
    m = ["--model", model]
    return [
        (
            "sft_think",
            ["sft_think.py", *m, "--data", train, *SFT],
        ),  # val loss on 16 rows held out of train
        (
            "grpo",
            [
                "grpo.py",
                *m,
                "--data",
                train,
                "--eval-data",
                test,
                "--init-adapter",
                str(r / "sft_think"),
                *GRPO,
            ],
        ),
        (
            "eval",
            [
                "eval_reasoning.py",
                *m,
                "--arms",
                f"base=,sft={r / 'sft_think'},grpo={r / 'grpo'}",
                "--data",
                f"gsm8k={test}",
                "--compare",
                "sft-base,grpo-base,grpo-sft",
                *EVAL,
            ],
        ),
    ]


def per_problem(samples: list[dict], arm: str, key) -> dict[str, float]:
    """Per held-out problem, the share of its k samples for which key(sample) holds."""
    by: dict[str, list[float]] = {}
    for s in samples:
        if s["arm"] == arm:
            by.setdefault(s["problem"], []).append(float(key(s)))
    return {p: sum(v) / len(v) for p, v in by.items()}


def clustered(values: list[float], lo: float, hi: float) -> tuple[float, float, float]:
    """Mean and 95% interval over problems, mean +- 1.96 sd / sqrt(N), kept within the quantity's
    range."""
    mean = sum(values) / len(values)
    half = (
        1.96 * statistics.stdev(values) / math.sqrt(len(values))
        if len(values) > 1
        else float("inf")
    )
    return mean, max(lo, mean - half), min(hi, mean + half)


def tables(r: Path, walls: dict[str, float]) -> tuple[str, dict]:
    samples = [
        json.loads(line) for line in (r / "eval" / "samples.jsonl").read_text().splitlines() if line
    ]
    arms = list(dict.fromkeys(s["arm"] for s in samples))
    metrics = {
        "format rate": lambda s: bool(FORMAT.search(s["text"])),
        "accuracy": lambda s: bool(s["correct"]),
    }
    per = {(a, name): per_problem(samples, a, key) for a in arms for name, key in metrics.items()}
    out: dict = {"arms": {}, "comparisons": {}, "wall_seconds": walls}
    lines = [
        "| arm | think-format rate | 95% interval | accuracy (Mean@k) | 95% interval | problems |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        row = {}
        for name in metrics:
            mean, lo, hi = clustered(list(per[(a, name)].values()), 0.0, 1.0)
            row[name] = {"mean": mean, "interval": [lo, hi]}
        out["arms"][a] = row
        f, acc = row["format rate"], row["accuracy"]
        lines.append(
            f"| {a} | {f['mean']:.3f} | [{f['interval'][0]:.3f}, {f['interval'][1]:.3f}] | "
            f"{acc['mean']:.3f} | [{acc['interval'][0]:.3f}, {acc['interval'][1]:.3f}] | "
            f"{len(per[(a, 'accuracy')])} |"
        )
    lines += [
        "",
        "| comparison | metric | before -> after | paired difference | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for left, right in (("base", "sft"), ("base", "grpo"), ("sft", "grpo")):
        if left not in arms or right not in arms:
            continue
        for name in metrics:
            a, b = per[(left, name)], per[(right, name)]
            diffs = [b[p] - a[p] for p in a if p in b]
            mean, lo, hi = clustered(diffs, -1.0, 1.0)
            out["comparisons"][f"{right}-{left}/{name}"] = {
                "metric": name,
                "before": out["arms"][left][name]["mean"],
                "after": out["arms"][right][name]["mean"],
                "interval": [lo, hi],
            }
            lines.append(
                f"| {right} - {left} | {name} | {out['arms'][left][name]['mean']:.3f} -> "
                f"{out['arms'][right][name]['mean']:.3f} | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] |"
            )
    # what the model writes: the first held-out problem, sample 0, before and after
    first = {
        s["arm"]: s for s in samples if s["problem"] == samples[0]["problem"] and s["sample"] == 0
    }
    lines += [
        "",
        f"What the model writes (held-out problem {samples[0]['problem']}, gold "
        f"{samples[0]['gold']}):",
    ]
    for a in arms:
        text = first[a]["text"].strip()
        lines += [
            "",
            f"{a} ({'right' if first[a]['correct'] else 'wrong'}):",
            "",
            "    " + text.replace("\n", "\n    "),
        ]
    out["examples"] = {a: first[a]["text"] for a in arms}
    lines += ["", "Stage wall times: " + ", ".join(f"{n} {s:.0f} s" for n, s in walls.items())]
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="smollm2", help="a chat model: hub id, local dir, or smollm2 (offline)"
    )
    p.add_argument("--runs", default="runs/real", help="where the stages write")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    r = Path(a.runs)
    walls = study.run_stages(stages(r, a.model), r, a.dry_run, who="real_tour")
    if a.dry_run:
        return
    text, result = tables(r, walls)
    dataio.atomic_write_text(r / "tour.md", text + "\n")
    dataio.atomic_write_json(r / "tour.json", result)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
