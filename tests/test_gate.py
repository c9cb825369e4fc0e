"""gate.py: the reward gate over arms (per-arm rows, paired comparisons, the card's go/no-go, the
tables and gate.json)."""

import json
import statistics

import pytest
import torch

import gate


def test_arm_row_groups_per_prefix_and_shares():
    # two prefixes x G=2: one mixed group, one all-one group
    row = gate.arm_row([1.0, 0.0, 1.0, 1.0], 2, 0.25, spec="x")
    assert row["reward_mean"] == pytest.approx(0.75)
    assert row["reward_std"] == pytest.approx(torch.tensor([1.0, 0.0, 1.0, 1.0]).std().item())
    assert row["per_prefix"] == [0.5, 1.0] and row["invalid_rate"] == 0.25
    assert (row["mixed_groups"], row["all_success_groups"], row["any_success_groups"]) == (
        0.5,
        0.5,
        1.0,
    )
    assert list(row)[:3] == ["reward_mean", "reward_std", "invalid_rate"]
    assert list(row)[-2:] == ["spec", "per_prefix"]


def test_write_gives_gate_json_and_prints_the_tables(tmp_path, capsys):
    arms = {
        "a": gate.arm_row([0.0, 0.0, 1.0, 0.0], 2, 0.0),
        "b": gate.arm_row([1.0, 1.0, 1.0, 0.0], 2, 0.0),
    }
    written = gate.write(arms, tmp_path, span=2.0)
    assert json.loads((tmp_path / "gate.json").read_text()) == json.loads(json.dumps(written))
    # per prefix b - a = [1.0, 0.0]: mean 0.5, standard error 0.5, inside [-span, span]
    assert written["comparisons"]["b_minus_a"]["delta_ci"] == pytest.approx([-0.48, 1.48])
    out = capsys.readouterr().out
    assert "| arm | reward_mean | reward_std | invalid_rate | mixed_groups |" in out
    assert "| b_minus_a |" in out


def test_comparison_report_and_tables():
    left, right = [0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.5, 0.3]
    c = gate.comparison(left, right)
    d = [0.1, 0.0, 0.2, -0.1]
    half = 1.96 * statistics.stdev(d) / 2
    assert c["mean_reward_delta"] == pytest.approx(0.05) and c["delta_ci"] == pytest.approx(
        [0.05 - half, 0.05 + half]
    )
    assert (c["right_better"], c["left_better"], c["tie"], c["shared_prefixes"]) == (
        0.5,
        0.25,
        0.25,
        4,
    )
    # a difference of rewards in [0, 1] lies in [-1, 1], and so does its interval (width 2 with a -1
    # missing reward); one prefix says nothing about the spread: the whole range
    wide = gate.comparison([0.0, 0.0, 1.0], [1.0, 1.0, 0.0])["delta_ci"]
    assert wide[1] == 1.0 and -1.0 < wide[0] < 0.0
    assert gate.comparison([0.5], [1.0], span=2.0)["delta_ci"] == [-2.0, 2.0]

    def arm(per_prefix, invalid_rate=0.0, mixed_groups=0.5):
        return {
            "reward_mean": sum(per_prefix) / len(per_prefix),
            "invalid_rate": invalid_rate,
            "mixed_groups": mixed_groups,
            "per_prefix": per_prefix,
            "_samples": [{"answer": "x"}],
        }

    arms = {"base": arm([0.0, 0.1, 0.0]), "sft": arm([0.5, 0.6, 0.5]), "rl": arm([1.0, 0.9, 1.0])}
    report = gate.report(arms)
    assert list(report["comparisons"]) == ["sft_minus_base", "rl_minus_base", "rl_minus_sft"]
    assert report["arms"]["rl"] == {
        "reward_mean": pytest.approx(29 / 30),
        "invalid_rate": 0.0,
        "mixed_groups": 0.5,
    }
    assert report["per_prefix"]["sft"] == [0.5, 0.6, 0.5]
    assert report["reward_validity_ok"] and report["variance_ok"] and report["separable"]
    flat = gate.report({"a": arm([0.2, 0.3], 0.1, 0.1), "b": arm([0.3, 0.2])})
    assert not (flat["reward_validity_ok"] or flat["variance_ok"] or flat["separable"])
    arms_table, comparisons_table = gate.tables(report).split("\n\n")
    assert arms_table.splitlines()[0] == "| arm | reward_mean | invalid_rate | mixed_groups |"
    assert len(arms_table.splitlines()) == 5 and "| rl_minus_sft |" in comparisons_table
    assert "95% interval" in comparisons_table and "delta_ci" not in comparisons_table
