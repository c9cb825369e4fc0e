"""Pictures of a run, drawn with matplotlib (headless) when a run ends:

- `training_curves`: a trainer's curves.png beside its metrics.jsonl, one panel per quantity the run
  logged: the loss, the reward (or DPO's reward margin), the KL to the reference, and the held-out
  metric of summary.json (its before and after, and every --eval-every evaluation);
- `arm_chart`: eval_reasoning.py's arms.png, the arms side by side per benchmark, each with its
  95% interval;
- `effect_chart`: the study's study.png, every stage's after - before with its interval.

A picture is a convenience: a run whose metrics cannot be drawn still ends with its summary (the
failure is printed, never raised).
"""

from __future__ import annotations

import math
from pathlib import Path

import dataio

# one panel each: the first of these (metrics.jsonl key, title) that the run logged
PANELS = (
    (("loss", "loss"),),
    (("reward", "reward"), ("rewards/margins", "reward margin (chosen - rejected)")),
    (("kl", "KL to the reference"),),
)
SMOOTH = 10  # steps in the running mean drawn over a noisy per-step curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if _number(r.get(key)) and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def curve_panels(rows: list[dict], heldout: dict) -> list[tuple[str, str]]:
    """(title, key) of each panel training_curves draws for these metrics rows."""
    panels = []
    for choices in PANELS:
        key, title = next(((k, t) for k, t in choices if _series(rows, k)[0]), (None, ""))
        if key and any(v != 0 for v in _series(rows, key)[1]):  # a KL of 0 throughout: no --beta
            panels.append((title, key))
    metric = heldout.get("metric")
    if metric and (_series(rows, f"eval/{metric}")[0] or _number(heldout.get("after"))):
        panels.append((f"held-out {metric}", f"eval/{metric}"))
    return panels


def training_curves(out: Path, summary: dict, name: str = "curves.png") -> Path | None:
    """out/curves.png from out/metrics.jsonl and summary.json's "heldout"; None when nothing was
    logged or the drawing failed (printed)."""
    try:
        rows = dataio.read_jsonl(out / "metrics.jsonl")
        heldout = summary.get("heldout") or {}
        panels = curve_panels(rows, heldout)
        if not panels:
            return None
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
        last = max((r.get("step", 0) for r in rows), default=0)
        for ax, (title, key) in zip(axes[0], panels):
            steps, values = _series(rows, key)
            if key.startswith("eval/"):
                style = "o-"
                if not steps:  # only the summary's before and after: not measured in between
                    steps, values = [0, last], [heldout.get("before"), heldout.get("after")]
                    style = "o:"
                ax.plot(steps, values, style, color="tab:green")
            else:
                smooth = len(values) > SMOOTH
                ax.plot(steps, values, color="tab:blue", alpha=0.35 if smooth else 1, linewidth=1)
                if smooth:
                    ax.plot(steps, _running_mean(values, SMOOTH), color="tab:blue")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{summary.get('method', '')} ({out.name})", fontsize=9)
        fig.tight_layout()
        return _save(fig, plt, out / name)
    except Exception as e:  # noqa: BLE001  (a picture never costs a finished run)
        print(f"could not draw {out / name}: {type(e).__name__}: {e}", flush=True)
        return None


def arm_chart(results: dict, k: int, out: Path, names: dict | None = None) -> Path | None:
    """out/arms.png: eval_reasoning.py's Mean@k per benchmark, one bar per arm with its 95%
    interval as the error bar (`names`: how a benchmark is shown)."""
    try:
        benches = list(next(iter(results.values()))["benchmarks"])
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(benches), 3.2))
        width = 0.8 / len(results)
        for n, (arm, res) in enumerate(results.items()):
            rows = [res["benchmarks"][b] for b in benches]
            ys = [r["mean_at_k"] for r in rows]
            err = [[y - r["mean_at_k_ci"][0] for y, r in zip(ys, rows)]]
            err.append([r["mean_at_k_ci"][1] - y for y, r in zip(ys, rows)])
            xs = [i + n * width for i in range(len(benches))]
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=arm)
        ticks = [i + 0.4 - width / 2 for i in range(len(benches))]
        ax.set_xticks(ticks, [(names or {}).get(b, b) for b in benches])
        ax.set_ylabel(f"Mean@{k} (95% CI)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return _save(fig, plt, out / "arms.png")
    except Exception as e:  # noqa: BLE001  (a picture never costs a finished run)
        print(f"could not draw {out / 'arms.png'}: {type(e).__name__}: {e}", flush=True)
        return None


def _save(fig, plt, path: Path) -> Path:
    dataio.atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def effect_chart(effects: dict[str, dict], path: Path) -> Path | None:
    """The study's figure: one row per stage, after - before of its held-out metric as a dot with
    its 95% interval as a bar and the line of no change; each row on its own scale (accuracies,
    rewards and NLLs differ by orders of magnitude), labelled with before -> after."""
    try:
        rows = [(n, e) for n, e in effects.items() if None not in (e["before"], e["after"])]
        if not rows:
            return None
        plt = _pyplot()
        fig, axes = plt.subplots(len(rows), 1, figsize=(7, 0.9 * len(rows) + 0.6), squeeze=False)
        for ax, (name, e) in zip(axes[:, 0], rows):
            diff = e["after"] - e["before"]
            lo, hi = e["interval"] or (diff, diff)
            better = (diff < 0) == e["lower_is_better"]
            color = "tab:gray" if not e["moved"] else "tab:green" if better else "tab:red"
            ax.errorbar([diff], [0], xerr=[[diff - lo], [hi - diff]], fmt="o", color=color)
            ax.axvline(0, color="black", linewidth=0.8)
            span = max(abs(lo), abs(hi)) * 1.3 or 0.05  # an interval of width 0: a fixed scale
            ax.set_xlim(-span, span)
            ax.set_yticks([])
            ax.set_title(
                f"{name}: {e['metric']}  {e['before']:.3f} -> {e['after']:.3f}",
                fontsize=8,
                loc="left",
            )
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(
            "after - before, 95% interval (green: better, red: worse, gray: no change)", fontsize=9
        )
        fig.tight_layout()
        return _save(fig, plt, path)
    except Exception as e:  # noqa: BLE001  (a picture never costs a finished run)
        print(f"could not draw {path}: {type(e).__name__}: {e}", flush=True)
        return None
