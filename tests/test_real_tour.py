"""scripts/real_tour.py (`bash run.sh real`): every stage's command parses with its script's Args,
the lineage runs SFT -> GRPO, and the tables count the think format and accuracy per problem with
bounded intervals."""

import importlib
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import cli

sys.path.insert(0, str(ROOT / "scripts"))
import make_word_problems  # noqa: E402
import real_tour  # noqa: E402


def test_every_stage_parses_with_its_scripts_args(tmp_path):
    by = {}
    for name, argv in real_tour.stages(tmp_path, "smollm2"):
        module = importlib.import_module(Path(argv[0]).stem)
        by[name] = cli.parse_args(module.Args, [*argv[1:], "--out", str(tmp_path / name)])
    assert list(by) == ["sft_think", "grpo", "eval"]
    assert by["grpo"].init_adapter == str(tmp_path / "sft_think")
    assert by["eval"].arms == f"base=,sft={tmp_path / 'sft_think'},grpo={tmp_path / 'grpo'}"
    assert all(getattr(a, "model", "smollm2") == "smollm2" for a in by.values())


def test_shipped_problems_are_what_the_generator_writes():
    train, test = make_word_problems.make(800, 128, 0)
    for name, rows in (("train", train), ("test", test)):
        shipped = (ROOT / "data" / "word_problems" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in shipped] == rows
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for r in train[
        :50
    ]:  # the worked answer ends in its value, and the thinking trace closes before it
        value = r["answer"].rsplit("#### ", 1)[1]
        assert (
            r["messages"][1]["content"].endswith(f"#### {value}")
            and "</think>" in r["messages"][1]["content"]
        )


def test_tables_count_format_and_accuracy_per_problem(tmp_path):
    good, plain = "<think>\n2 + 3 = 5.\n</think>\n\n2 + 3 = 5.\n#### 5", "It is 5.\n#### 5"
    rows = []
    for p in ("0", "1"):
        for s in range(2):
            rows.append(
                {
                    "arm": "base",
                    "problem": p,
                    "sample": s,
                    "gold": "5",
                    "correct": s == 0,
                    "text": plain,
                }
            )
            rows.append(
                {
                    "arm": "sft",
                    "problem": p,
                    "sample": s,
                    "gold": "5",
                    "correct": True,
                    "text": good,
                }
            )
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, out = real_tour.tables(tmp_path, {"eval": 1.0})
    assert (
        out["arms"]["base"]["format rate"]["mean"] == 0.0
        and out["arms"]["sft"]["format rate"]["mean"] == 1.0
    )
    assert out["arms"]["base"]["accuracy"]["mean"] == 0.5
    cmp = out["comparisons"]["sft-base/accuracy"]
    assert (cmp["before"], cmp["after"]) == (0.5, 1.0)
    assert -1.0 <= cmp["interval"][0] <= 0.5 <= cmp["interval"][1] <= 1.0  # holds the difference
    for arm in out["arms"].values():
        for metric in arm.values():
            assert 0.0 <= metric["interval"][0] <= metric["interval"][1] <= 1.0
    assert "base (right)" in text and "sft (right)" in text


@pytest.mark.parametrize(
    "text,ok",
    [
        ("<think>x</think>\n#### 12", True),
        ("<think>x</think>\n#### 1,200", True),
        ("#### 12", False),
        ("<think>x\n#### 12", False),
        ("<think>x</think> so #### 12", False),
    ],
)
def test_format_rule(text, ok):
    assert bool(real_tour.FORMAT.search(text)) is ok
