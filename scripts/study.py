"""The toy study: every method of the repo on the toy world, chained as the model card
Jarrodbarnes/qwen3-0.6B-interleaved-thinking chains its study, then the card's tables.

    # the whole study (about 23 minutes on a 2-core CPU), runs in runs/study
    python scripts/study.py
    # the short tour: thinking SFT, then GRPO from its adapter
    python scripts/study.py --quick
    # print the commands only
    python scripts/study.py --dry-run

The question the card asks: does self-improving continued pretraining (Phase 3, online DPO) make the
base a better substrate for thinking SFT and RLMT? The stages:

  phase3              dpo_online.py from the toy base (toy documents, the toy continuation judge)
  sft_raw_base        sft_think.py --no-think on the base (toy arithmetic, three answer formats)
  sft_think_base      sft_think.py on the base
  sft_think_phase3    sft_think.py --init-adapter <phase3> (the Phase-3 adapter merged first)
  rlmt_think_base     rlmt.py from sft_think_base (toy word problems, the judge sees the answer)
  rlmt_think_phase3   rlmt.py from sft_think_phase3
  gate                rlmt.py --gate over the four thinking arms (the same prompts and random draws
                      for each)
  eval                eval_reasoning.py over the four arms (toy GSM8K / MATH / GPQA / OlympiadBench)
  grpo, grpo_continuation, gkd, karcher_merge (the other methods, one row each)

Adapters record what they were trained on (args.json's init_adapter), so `rlmt_think_phase3` is the
base with the Phase-3, SFT and RLMT adapters merged in that order wherever it is loaded. Stages use
shorter budgets than the scripts' standalone defaults. Every command is printed before it runs; the
tables go to <runs>/study.md; each stage's held-out effect (after - before with its 95% interval) to
<runs>/study.json and <runs>/study.png, and the run ends with a plain summary of what moved.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataio  # noqa: E402
import errors  # noqa: E402
import plots  # noqa: E402

SFT = ["--toy-styles", "gsm8k,math,mc", "--max-steps", "250", "--eval-every", "0"]
# RLMT and its gate on the free-answer formats (gsm8k, math): on multiple choice most rewarded
# answers were lucky letters after a wrong scratchpad, and RLMT learned the letters while its
# arithmetic got worse (docs/study.md). Both sample at T 0.5 (rlmt.py's default is the paper's 0.7:
# RLMT's gain at 0.5 does not carry to it); 8 prompts x 8 samples, 100 steps at lr 3e-4.
WORD_PROBLEMS = [
    "--data",
    "toy-arithmetic",
    "--toy-styles",
    "gsm8k,math",
    "--thought-tokens",
    "128",
    "--temperature",
    "0.5",
]
GATE = ["--gate-prefixes", "128"]
RLMT = [
    *WORD_PROBLEMS,
    "--max-steps",
    "100",
    "--batch-size",
    "8",
    "--num-generations",
    "8",
    "--lr",
    "3e-4",
    "--no-gate-after",
]
ARMS = ("think_base", "think_phase3", "think_base_rlmt", "think_phase3_rlmt")
# each stage's wall time in the last measured run (2-core CPU): the estimate printed as it starts
SECONDS = {
    "phase3": 87,
    "sft_raw_base": 61,
    "sft_think_base": 89,
    "sft_think_phase3": 82,
    "rlmt_think_base": 158,
    "rlmt_think_phase3": 159,
    "gate": 102,
    "eval": 37,
    "grpo": 217,
    "grpo_continuation": 43,
    "gkd": 247,
    "karcher_merge": 51,
}
QUICK_SECONDS = {"sft_think": 150, "grpo": 515}
# the card's comparisons: (left, right) = right minus left
COMPARE = [
    ("think_base", "think_phase3"),
    ("think_base_rlmt", "think_phase3_rlmt"),
    ("think_base", "think_base_rlmt"),
    ("think_phase3", "think_phase3_rlmt"),
]


def stages(r: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, argv after `python`) for each stage; the run directory of stage `name` is r / name."""
    if quick:
        return [
            ("sft_think", ["sft_think.py"]),
            ("grpo", ["grpo.py", "--init-adapter", str(r / "sft_think")]),
        ]
    arm_dirs = {
        "think_base": r / "sft_think_base",
        "think_phase3": r / "sft_think_phase3",
        "think_base_rlmt": r / "rlmt_think_base",
        "think_phase3_rlmt": r / "rlmt_think_phase3",
    }
    arms = ",".join(f"{name}={d}" for name, d in arm_dirs.items())
    return [
        ("phase3", ["dpo_online.py", "--max-steps", "80"]),
        ("sft_raw_base", ["sft_think.py", "--no-think", *SFT]),
        ("sft_think_base", ["sft_think.py", *SFT]),
        ("sft_think_phase3", ["sft_think.py", "--init-adapter", str(r / "phase3"), *SFT]),
        ("rlmt_think_base", ["rlmt.py", "--init-adapter", str(r / "sft_think_base"), *RLMT]),
        ("rlmt_think_phase3", ["rlmt.py", "--init-adapter", str(r / "sft_think_phase3"), *RLMT]),
        ("gate", ["rlmt.py", *WORD_PROBLEMS, *GATE, "--gate", arms]),
        (
            "eval",
            [
                "eval_reasoning.py",
                "--arms",
                arms,
                "--limit",
                "32",
                "--compare",
                ",".join(f"{b}-{a}" for a, b in COMPARE),
            ],
        ),
        ("grpo", ["grpo.py", "--max-steps", "150"]),
        ("grpo_continuation", ["grpo.py", "--task", "continuation", "--max-steps", "25"]),
        ("gkd", ["gkd.py", "--max-steps", "700"]),
        ("karcher_merge", ["karcher_merge.py", "--prompts", "4"]),
    ]


def load(d: Path, name: str = "summary.json") -> dict:
    path = d / name
    if not path.is_file():
        raise errors.MissingError(f"{path}: not there (did the stage finish?)")
    return json.loads(path.read_text())


def f3(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def interval(lo, hi) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def mean_of(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def tables(r: Path, quick: bool, walls: dict[str, float]) -> str:
    out = []

    def section(title: str, rows: list[dict], note: str = "") -> None:
        out.append(
            f"### {title}\n\n{dataio.markdown_table(rows)}\n" + (f"\n{note}\n" if note else "")
        )

    if quick:
        rows = []
        for name in ("sft_think", "grpo"):
            s = load(r / name)
            h = s["heldout"]
            rows.append(
                {
                    "stage": f"{name}.py",
                    "held-out metric": f"{h['metric']} ({h.get('note', '')})",
                    "before": f3(h["before"]),
                    "after": f3(h["after"]),
                }
            )
        section("The tour: thinking SFT, then GRPO from its adapter", rows)
        return "\n".join(out)

    p3 = load(r / "phase3")["after"]
    section(
        "Phase 3: online DPO from the toy base",
        [
            {
                "model": "phase3 vs toy base",
                "win rate": f3(p3["win_rate_vs_base"]),
                "95% interval": f"[{p3['interval_low']:.3f}, {p3['interval_high']:.3f}]",
                "W / T / L": f"{p3['wins']} / {p3['ties']} / {p3['losses']}",
                "prefixes": p3["compared"],
            }
        ],
        "One continuation per held-out prefix from each model, judged in both orders by the toy "
        "continuation judge; "
        "a tie counts half.",
    )

    rows = []
    for arm in ("raw_base", "think_base", "think_phase3"):
        s = load(r / f"sft_{arm}")
        a, b = s["after"], s["before"]
        rows.append(
            {
                "arm": arm,
                "val loss": f3(a["val_loss"]),
                "raw val loss": f3(a["raw_val_loss"]),
                "rep 4-gram": f3(a.get("repetition_4gram")),
                "tokens seen": s["tokens_seen"],
                "tok/s": round(s["tokens_per_s"]),
                "peak MB": round(s["peak_memory_mb"]),
                "accuracy": f"{b['accuracy']:.3f} -> {a['accuracy']:.3f}",
            }
        )
    section(
        "SFT arms",
        rows,
        "Val loss: the held-out traces with their thoughts; raw val loss: the same answers "
        "without them. Accuracy: greedy, 200 held-out problems of levels 1-3 in the three answer "
        "formats "
        "(before -> after). Peak MB: the process's peak resident memory.",
    )

    rows = []
    for arm in ("think_base", "think_phase3"):
        d = r / f"rlmt_{arm}"
        s, steps = (
            load(d),
            [
                m
                for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "reward" in m
            ],
        )
        rows.append(
            {
                "arm": f"{arm} RLMT",
                "steps": len(steps),
                "avg reward": f3(mean_of(steps, "reward")),
                "final reward": f3(steps[-1]["reward"] if steps else None),
                **{
                    f"avg {k.replace('_', '-')}": f3(mean_of(steps, f"gate/{k}_groups"))
                    for k in ("mixed", "near_zero", "all_zero", "all_one")
                },
                "invalid judge": f3(mean_of(steps, "judge/invalid_rate")),
                "length drift": f3(steps[-1].get("length_drift") if steps else None),
                "artifact rate": f3(mean_of(steps, "artifact_rate")),
                "train s": round(s["train_seconds"]),
            }
        )
    section(
        "RLMT training",
        rows,
        "Per-step averages over the run; length drift: the mean response length of the "
        "last 5 steps against the first 5.",
    )

    g = load(r / "gate", "gate.json")
    section(
        "Reward gate over the four arms",
        [
            {
                "arm": k,
                "reward mean": f3(v["reward_mean"]),
                "reward std": f3(v["reward_std"]),
                "invalid": f3(v["invalid_rate"]),
                "mixed": f3(v["mixed_groups"]),
                "near-zero": f3(v["near_zero_groups"]),
                "any-success": f3(v["any_success_groups"]),
                "all-success": f3(v["all_success_groups"]),
                "new tokens": f"{v['avg_total_new_tokens']:.1f}",
                "closed think": f3(v["closed_think_rate"]),
            }
            for k, v in g["arms"].items()
        ],
    )
    rows = []
    for left, right in COMPARE:
        c = g["comparisons"][f"{right}_minus_{left}"]
        rows.append(
            {
                "comparison": f"{right} - {left}",
                "reward delta": f"{c['mean_reward_delta']:+.4f}",
                "paired 95% interval": interval(*c["delta_ci"]),
                "right better": f3(c["right_better"]),
                "left better": f3(c["left_better"]),
                "even": f3(c["tie"]),
                "prompts": c["shared_prefixes"],
            }
        )
    section(
        "Reward-gate comparisons",
        rows,
        "Go/no-go: "
        + ", ".join(f"{k} {g[k]}" for k in ("reward_validity_ok", "variance_ok", "separable"))
        + ".",
    )

    out.append(
        "### Reasoning evaluation over the four arms\n\n" + (r / "eval" / "tables.md").read_text()
    )

    rows = []
    for name in ("grpo", "grpo_continuation", "gkd", "karcher_merge"):
        s = load(r / name)
        if name == "karcher_merge":
            ev = {e["arm"]: e for e in s["eval"]}
            domains = [k.removesuffix("/nll") for k in ev["base"] if k.endswith("/nll")]
            nll = lambda arm: sum(ev[arm][f"{d}/nll"] for d in domains) / len(domains)  # noqa: E731
            rows.append(
                {
                    "stage": name,
                    "held-out metric": f"mean NLL over {', '.join(domains)} (lower is better)",
                    "before": f3(nll("base")),
                    "after": f3(nll("karcher")),
                }
            )
            continue
        h = s["heldout"]
        extra = (
            f"; teacher {h['teacher']:.3f}, gap closed {h['gap_closed']:.2f}"
            if "teacher" in h
            else ""
        )
        rows.append(
            {
                "stage": name,
                "held-out metric": f"{h['metric']} ({h.get('note', '')}{extra})",
                "before": f3(h["before"]),
                "after": f3(h["after"]),
            }
        )
        if name == "gkd":  # the divergence moves long before greedy accuracy does
            rows.append(
                {
                    "stage": name,
                    "held-out metric": "JSD to the teacher on the student's own samples "
                    "(lower is better)",
                    "before": f3(s["before"]["own/jsd"]),
                    "after": f3(s["after"]["own/jsd"]),
                }
            )
    section(
        "The other methods, one row each",
        rows,
        "Before: the starting model; karcher_merge: the toy base "
        "against the Karcher mean of the story, news and code adapters.",
    )
    section(
        "Wall time per stage",
        [{"stage": k, "seconds": round(v)} for k, v in walls.items()]
        + [{"stage": "total", "seconds": round(sum(walls.values()))}],
    )
    return "\n".join(out)


def effect(metric: str, before, after, interval, lower_is_better: bool = False) -> dict:
    """One stage's held-out result: metric, before, after, and the 95% interval of after - before
    (None where the stage measured none); `moved`: the interval excludes 0."""
    lo, hi = interval if interval else (None, None)
    moved = None if lo is None else bool(lo > 0 or hi < 0)
    return {
        "metric": metric,
        "before": before,
        "after": after,
        "interval": None if lo is None else [lo, hi],
        "moved": moved,
        "lower_is_better": lower_is_better,
    }


def heldout_effect(s: dict) -> dict:
    h = s["heldout"]
    metric = h["metric"] + (f" ({h['note']})" if h.get("note") else "")
    lower = h["metric"].endswith(("loss", "nll", "jsd", "rkl"))
    return effect(metric, h.get("before"), h.get("after"), h.get("diff_interval"), lower)


def effects(r: Path, quick: bool) -> dict[str, dict]:
    """Every finished stage's held-out effect (study.json): the trainers' summary "heldout" (after -
    before paired over held-out prompts), RLMT's from the reward gate (the SFT arm against its RLMT
    arm on the same prompts and draws), the card's question (Phase-3 arm minus base arm) from the
    gate and the reasoning evaluation, the merge's mean held-out NLL over domains."""
    out = {}
    for name, _ in stages(r, quick):
        d = r / name
        if name in ("gate", "eval") or name.startswith("rlmt_"):
            continue  # below, from the gate and the evaluation
        if (d / "summary.json").is_file() and name != "karcher_merge":
            out[name] = heldout_effect(load(d))
    if quick or not (r / "gate" / "gate.json").is_file():
        return out
    g = load(r / "gate", "gate.json")
    for name, (left, right) in (
        ("rlmt_think_base", ("think_base", "think_base_rlmt")),
        ("rlmt_think_phase3", ("think_phase3", "think_phase3_rlmt")),
        ("gate: phase3 arm - base arm", ("think_base", "think_phase3")),
    ):
        c = g["comparisons"][f"{right}_minus_{left}"]
        arms = g["arms"]
        out[name] = effect(
            f"gate reward ({left} -> {right})",
            arms[left]["reward_mean"],
            arms[right]["reward_mean"],
            c["delta_ci"],
        )
    if (r / "eval" / "summary.json").is_file():
        e = load(r / "eval")
        c = e["comparisons"]["think_phase3 vs think_base"]["macro"]
        res = e["results"]
        out["eval: phase3 arm - base arm"] = effect(
            "macro Mean@k over the toy benchmarks",
            res["think_base"]["macro"]["mean_at_k"],
            res["think_phase3"]["macro"]["mean_at_k"],
            c["mean_at_k_ci"],
        )
    if (r / "karcher_merge" / "summary.json").is_file():
        out["karcher_merge"] = merge_effect(load(r / "karcher_merge"))
    return out


def merge_effect(s: dict) -> dict:
    """The Karcher merge against the base: the mean held-out NLL over domains, its interval from
    the domains' paired differences (independent documents: SE = sqrt(sum SE_d^2) / D)."""
    ev = {e["arm"]: e for e in s["eval"]}
    per = s["vs_base"]["karcher"]
    domains = list(per)
    nll = lambda arm: sum(ev[arm][f"{d}/nll"] for d in domains) / len(domains)  # noqa: E731
    diff = sum(per[d]["nll"]["diff"] for d in domains) / len(domains)
    se = math.sqrt(sum(per[d]["nll"]["se"] ** 2 for d in domains)) / len(domains)
    interval = [diff - 1.96 * se, diff + 1.96 * se]
    return effect(
        f"mean NLL over {', '.join(domains)}", nll("base"), nll("karcher"), interval, True
    )


def story(found: dict[str, dict]) -> str:
    """The plain-language end of the run: which stages moved their metric, and the card's answer."""
    lines = []
    for name, e in found.items():
        b, a = e["before"], e["after"]
        if b is None or a is None:
            continue
        if e["interval"] is None:
            verdict = "no interval measured"
        elif e["moved"]:
            better = (a < b) == e["lower_is_better"]
            verdict = "moved" + ("" if better else " the wrong way")
        else:
            verdict = "no measurable change"
        where = (
            ""
            if e["interval"] is None
            else " (after - before: [{:+.3f}, {:+.3f}])".format(*e["interval"])
        )
        lines.append(f"- {name}: {e['metric']} {b:.3f} -> {a:.3f}, {verdict}{where}")
    card = ("gate: phase3 arm - base arm", "eval: phase3 arm - base arm")
    card = [found[k] for k in card if k in found and found[k]["interval"]]
    if card:
        answer = (
            "the Phase-3 arm differs from the base arm"
            if any(e["moved"] for e in card)
            else "no measurable difference between the Phase-3 arm and the base arm: at this "
            "budget the toy does not answer it"
        )
        lines.append(f"\nThe card's question (is Phase 3 a better substrate?): {answer}.")
    return "What moved:\n" + "\n".join(lines)


def run_stages(
    todo: list[tuple[str, list[str]]],
    r: Path,
    dry_run: bool = False,
    who: str = "study",
    done: int = 0,
    total: int = 0,
    seconds: dict | None = None,
) -> dict:
    """Run each stage's command (`python <argv> --out r/<name>`) in the repo root, printing it
    first (stage done + k of total, default len(todo); `seconds`: a stage's usual wall time); a
    failed stage ends the run. Returns each stage's wall seconds."""
    walls: dict[str, float] = {}
    for k, (name, argv_) in enumerate(todo, done + 1):
        cmd = [sys.executable, *argv_, "--out", str(r / name)]
        of = total or len(todo)
        usual = (seconds or {}).get(name)
        about = f" (about {max(1, round(usual / 60))} min)" if usual else ""
        print(f"\n==> stage {k} of {of}: {name}{about}\n$ python {shlex.join(cmd[1:])}", flush=True)
        if dry_run:
            continue
        t0 = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"{who}: stage {name} failed (its run directory: {r / name})")
        walls[name] = time.perf_counter() - t0
        print(f"==> {name}: {walls[name]:.0f} s", flush=True)
    return walls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the short tour: thinking SFT, then GRPO from its adapter",
    )
    p.add_argument(
        "--runs",
        default="",
        help="where the stages write (default runs/study, or runs with --quick)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument(
        "--tables-only",
        action="store_true",
        help="print the tables of finished stages, run nothing",
    )
    a = p.parse_args(argv)
    r = Path(a.runs or ("runs" if a.quick else "runs/study"))
    todo = [] if a.tables_only else stages(r, a.quick)
    walls = run_stages(todo, r, a.dry_run, seconds=QUICK_SECONDS if a.quick else SECONDS)
    if a.dry_run:
        return
    if a.tables_only:
        walls = {
            n: load(r / n).get("wall_seconds", 0.0)
            for n, _ in stages(r, a.quick)
            if (r / n / "summary.json").is_file()
        }
    text = tables(r, a.quick, walls)
    dataio.atomic_write_text(r / ("tour.md" if a.quick else "study.md"), text + "\n")
    print("\n" + text, flush=True)
    found = effects(r, a.quick)
    dataio.atomic_write_json(r / "study.json", found)
    plots.effect_chart(found, r / "study.png")
    print("\n" + story(found), flush=True)


if __name__ == "__main__":
    main()
