"""scripts/study.py (what `bash run.sh` runs): every stage's command is one its script accepts, the
lineages chain through the run directories, and the dry run prints every command."""

import importlib
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

import cli

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
            f"==> stage {k} of {len(names)}: {n}\n" in proc.stdout
            and f"--out {tmp_path / 's' / n}" in proc.stdout
        )
    assert not (tmp_path / "s").exists()
