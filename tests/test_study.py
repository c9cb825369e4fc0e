"""scripts/study.py (what `bash run.sh` runs): every stage's command is one its script accepts, the
lineages chain through the run directories, and the dry run prints every command."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script
from test_plots import png_size

import cli
import plots

sys.path.insert(0, str(ROOT / "scripts"))
import study  # noqa: E402


@pytest.mark.parametrize("quick", [False, True])
def test_every_stage_parses_with_its_scripts_args(tmp_path, quick):
    r = tmp_path / "study"
    seen = []
    for name, argv in study.stages(r, quick):
        module = importlib.import_module(Path(argv[0]).stem)
        args = cli.parse_args(module.Args, [*argv[1:], "--out", str(r / name)])
        assert args.out == str(r / name)
        seen.append((name, args))
    by = dict(seen)
    if quick:
        assert list(by) == ["sft_think", "grpo"] and by["grpo"].init_adapter == str(r / "sft_think")
        return
    assert list(by)[:8] == [
        "phase3",
        "sft_raw_base",
        "sft_think_base",
        "sft_think_phase3",
        "rlmt_think_base",
        "rlmt_think_phase3",
        "gate",
        "eval",
    ]
    assert by["sft_raw_base"].no_think and not by["sft_think_base"].no_think
    assert by["sft_think_phase3"].init_adapter == str(
        r / "phase3"
    )  # Phase 3 merged before thinking SFT
    assert by["rlmt_think_phase3"].init_adapter == str(
        r / "sft_think_phase3"
    )  # SFT merged before RLMT
    assert by["rlmt_think_base"].data == by["gate"].data == "toy-arithmetic"
    gate_arms = dict(item.split("=") for item in by["gate"].gate.split(","))
    assert gate_arms == dict(item.split("=") for item in by["eval"].arms.split(",")) and list(
        gate_arms
    ) == list(study.ARMS)
    assert {"grpo", "grpo_continuation", "gkd", "karcher_merge"} <= set(by)
    assert by["grpo_continuation"].task == "continuation"


def test_dry_run_prints_every_command(tmp_path):
    proc = run_script("scripts/study.py", "--dry-run", "--runs", tmp_path / "s")
    names = [n for n, _ in study.stages(tmp_path / "s", False)]
    assert proc.stdout.count("\n$ python ") == len(names)
    for k, n in enumerate(names, 1):
        assert (
            f"==> stage {k} of {len(names)}: {n} (about " in proc.stdout
            and f"--out {tmp_path / 's' / n}" in proc.stdout
        )
    assert not (tmp_path / "s").exists()


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _finished_study(r):
    """The summaries a finished study leaves, with known figures."""

    def heldout(metric, before, after, lo, hi, **extra):
        h = {"metric": metric, "before": before, "after": after, "diff_interval": [lo, hi]}
        return {"heldout": {**h, **extra}}

    _write(r / "phase3/summary.json", heldout("win_rate_vs_base", 0.5, 0.64, 0.09, 0.19))
    for name, after in (
        ("sft_raw_base", 0.07),
        ("sft_think_base", 0.51),
        ("sft_think_phase3", 0.52),
    ):
        _write(
            r / name / "summary.json", heldout("accuracy", 0.07, after, after - 0.12, after - 0.02)
        )
    _write(r / "grpo/summary.json", heldout("accuracy", 0.60, 0.62, -0.01, 0.05))
    _write(r / "grpo_continuation/summary.json", heldout("mean_reward", 0.61, 0.63, 0.01, 0.03))
    _write(r / "gkd/summary.json", heldout("accuracy", 0.0, 0.3, 0.2, 0.4))
    arms = {a: {"reward_mean": 0.2 + 0.01 * i} for i, a in enumerate(study.ARMS)}
    comparisons = {
        f"{right}_minus_{left}": {"delta_ci": [-0.02, 0.03]} for left, right in study.COMPARE
    }
    _write(r / "gate/gate.json", {"arms": arms, "comparisons": comparisons})
    macro = {"mean_at_k_delta": 0.002, "mean_at_k_ci": [-0.02, 0.024]}
    results = {a: {"macro": {"mean_at_k": 0.5}} for a in study.ARMS}
    _write(
        r / "eval/summary.json",
        {"results": results, "comparisons": {"think_phase3 vs think_base": {"macro": macro}}},
    )
    per = {"nll": {"diff": -0.01, "se": 0.003}}
    _write(
        r / "karcher_merge/summary.json",
        {
            "eval": [
                {"arm": "base", "story/nll": 0.24, "news/nll": 0.22},
                {"arm": "karcher", "story/nll": 0.23, "news/nll": 0.21},
            ],
            "vs_base": {"karcher": {"story": per, "news": per}},
        },
    )


def test_study_json_figure_and_story(tmp_path):
    r = tmp_path / "study"
    _finished_study(r)
    found = study.effects(r, quick=False)
    # every stage, the gate and the evaluation as the card's question
    names = {n for n, _ in study.stages(r, quick=False)} - {"gate", "eval"}
    assert set(found) == names | {"gate: phase3 arm - base arm", "eval: phase3 arm - base arm"}
    for e in found.values():
        assert {"metric", "before", "after", "interval"} <= set(e)
    assert found["phase3"]["interval"] == [0.09, 0.19] and found["phase3"]["moved"]
    assert not found["grpo"]["moved"] and found["grpo_continuation"]["moved"]
    # the merge: two domains, each -0.01 with SE 0.003: SE of the mean sqrt(2) x 0.003 / 2
    half = 1.96 * math.sqrt(2) * 0.003 / 2
    assert found["karcher_merge"]["interval"] == pytest.approx([-0.01 - half, -0.01 + half])
    assert found["karcher_merge"]["lower_is_better"] and found["karcher_merge"]["moved"]
    card = found["gate: phase3 arm - base arm"]
    assert (card["before"], card["after"]) == pytest.approx((0.2, 0.21)) and not card["moved"]
    text = study.story(found)
    assert "- gkd: accuracy 0.000 -> 0.300, moved (after - before: [+0.200, +0.400])" in text
    assert "- grpo: accuracy 0.600 -> 0.620, no measurable change" in text
    assert "no measurable difference between the Phase-3 arm and the base arm" in text
    # the figure: one row per stage
    path = plots.effect_chart(found, r / "study.png")
    assert png_size(path)[1] == round(100 * (0.9 * len(found) + 0.6))
