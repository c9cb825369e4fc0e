"""Toy step time of every trainer, as the study runs it: each script in its own process for --steps
optimizer steps (held-out evaluation cut to a few prompts), and the median of its logged
`step_time` over the steps after the first (which pays for warm-up):

    python bench/step_bench.py --label before          # 2 CPU cores: about 5 minutes
    python bench/step_bench.py --label after           # then the table puts both side by side
    python bench/step_bench.py --only grpo,gkd --steps 20

Besides the step time it keeps the medians of each script's own timing split (`timing/rollout`,
`timing/update`, `timing/sample`, ...), so a change can be traced to the part it sped up. Results:
bench_results/steps.json (one entry per label, the newest run of a label replaces the older) and
bench_results/steps.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataio  # noqa: E402

# (name, argv after `python`): the study's settings (scripts/study.py), held-out sets cut to 4 rows
RLMT = ["--data", "toy-arithmetic", "--thought-tokens", "128", "--temperature", "0.5"]
RLMT += ["--batch-size", "8", "--num-generations", "8", "--no-gate-after", "--gate-prefixes", "4"]
TRAINERS = [
    ("sft_think", ["sft_think.py", "--toy-styles", "gsm8k,math,mc", "--eval-every", "0"]),
    ("dpo_online", ["dpo_online.py", "--eval-size", "4"]),
    ("grpo", ["grpo.py", "--eval-size", "4", "--eval-every", "0"]),
    ("grpo_continuation", ["grpo.py", "--task", "continuation", "--eval-size", "4"]),
    ("rlmt", ["rlmt.py", "--init-adapter", "toy/sft_think", *RLMT]),
    ("gkd", ["gkd.py", "--eval-size", "4", "--eval-every", "0"]),
]
RESULTS = ROOT / "bench_results"


def measure(name: str, argv: list[str], steps: int, out: Path) -> dict:
    cmd = [sys.executable, *argv, "--max-steps", str(steps), "--out", str(out / name)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = [r for r in dataio.read_jsonl(out / name / "metrics.jsonl") if "loss" in r][1:]
    keys = sorted({k for r in rows for k in r if k == "step_time" or k.startswith("timing/")})
    medians = {k: statistics.median(r[k] for r in rows if k in r) for k in keys}
    return {"command": "python " + " ".join(argv), "steps": steps, **medians}


def markdown(results: dict) -> str:
    labels = list(results["runs"])
    lines = [
        "# Toy step time per trainer: CPU",
        "",
        f"- command: `python bench/step_bench.py --label <label>` ({results['machine']})",
        "- figure: median `step_time` (s) over steps 2..N of one run of the study's settings; "
        "in brackets the script's own split of that step",
        "",
        "| trainer | "
        + " | ".join(labels)
        + " | "
        + " | ".join(f"{b} / {labels[0]}" for b in labels[1:])
        + " |",
        "| --- | "
        + " | ".join("---:" for _ in labels)
        + " | "
        + " | ".join("---:" for _ in labels[1:])
        + " |",
    ]
    for name, _ in TRAINERS:
        cells, base = [], None
        for label in labels:
            r = results["runs"][label]["trainers"].get(name)
            if r is None:
                cells.append("")
                continue
            split = ", ".join(f"{k[7:]} {v:.3f}" for k, v in r.items() if k.startswith("timing/"))
            cells.append(f"{r['step_time']:.3f}" + (f" ({split})" if split else ""))
            base = base if base is not None else r["step_time"]
        ratios = []
        for label in labels[1:]:
            r = results["runs"][label]["trainers"].get(name)
            ratios.append(f"{r['step_time'] / base:.2f}" if r and base else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Runs:", ""]
    for label, run in results["runs"].items():
        lines.append(f"- {label}: {run['date']}, commit {run['commit']}, {run['steps']} steps")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--label", required=True, help="this run's column in the table (before, after, ...)"
    )
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per trainer")
    p.add_argument("--only", default="", help="comma-separated trainer names (default: all)")
    a = p.parse_args(argv)
    chosen = [t for t in TRAINERS if not a.only or t[0] in a.only.split(",")]
    path = RESULTS / "steps.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    cpu = platform.processor() or platform.machine()
    results["machine"] = (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    run = results["runs"].setdefault(a.label, {"trainers": {}})
    run.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        steps=a.steps,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in chosen:
            run["trainers"][name] = measure(name, args, a.steps, Path(tmp))
            print(name, json.dumps(run["trainers"][name]), flush=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "steps.md").write_text(markdown(results))
    print((RESULTS / "steps.md").read_text())


if __name__ == "__main__":
    main()
