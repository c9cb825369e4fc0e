"""scripts/style_karcher.py: every stage is a command its script accepts, and the pipeline runs end
to end on the toy at a tiny budget (the real model: tests/test_real_model.py)."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

import cli

sys.path.insert(0, str(ROOT / "scripts"))
import style_karcher  # noqa: E402

TINY = [
    *("--max-steps", "2", "--train-size", "8", "--eval-size", "4", "--grpo-eval-size", "2"),
    *("--prompts", "2", "--samples", "2", "--max-new-tokens", "8"),
    "--grpo-flags=--batch-size 2 --num-generations 2 --eval-samples 2 --prefix-tokens 16 "
    "--continuation-tokens 8",
]


def test_dry_run_stages_parse_with_their_scripts_args(tmp_path, capsys):
    style_karcher.main(["--dry-run", "--out", str(tmp_path / "sk"), *TINY])
    out = capsys.readouterr().out
    commands = [line[len("$ python ") :] for line in out.splitlines() if line.startswith("$ ")]
    assert (
        len(commands) == 3 + 3 + 2 + 1
    )  # GRPO without and with MARA per domain, 2 merges, lambada
    parsed = []
    for command in commands:
        argv = command.split()
        module = importlib.import_module(Path(argv[0]).stem)
        parsed.append(cli.parse_args(module.Args, argv[1:]))
    grpo_runs, merges, lam = parsed[:6], parsed[6:8], parsed[8]
    assert all(a.reward == "proxy_nll" and a.task == "continuation" for a in grpo_runs)
    assert [a.proxy_model for a in grpo_runs[:3]] == ["toy/story", "toy/news", "toy/code"]
    assert [a.mara_tau is None for a in grpo_runs] == [True] * 3 + [False] * 3
    assert all(a.beta > 0 and a.max_steps == 2 and a.batch_size == 2 for a in grpo_runs)
    assert [len(m.adapters) for m in merges] == [3, 3]
    assert lam.likelihood_tasks == "toy_lambada" and lam.suite == "likelihood"


def test_proxy_per_domain():
    args = style_karcher.argparse.Namespace(proxy="story=a,news=b", model="m")
    assert style_karcher.proxies(args, ["story", "news"]) == {"story": "a", "news": "b"}
    with pytest.raises(style_karcher.errors.ConfigError, match="code"):
        style_karcher.proxies(args, ["story", "code"])
    args.proxy = "story=a,b"
    with pytest.raises(style_karcher.errors.ConfigError, match="domain=spec"):
        style_karcher.proxies(args, ["story"])
    args.proxy = "auto"
    with pytest.raises(style_karcher.errors.ConfigError, match="--proxy"):
        style_karcher.proxies(args, ["story"])


@pytest.mark.slow
def test_toy_pipeline_end_to_end(tmp_path):
    out = tmp_path / "sk"
    proc = run_script("scripts/style_karcher.py", *TINY, "--out", out, timeout=1800)
    s = json.loads((out / "summary.json").read_text())
    h = s["heldout"]
    assert h["metric"] == "nll" and math.isfinite(h["before"]) and math.isfinite(h["after"])
    assert s["domains"] == ["story", "news", "code"]
    for arm in ("no_mara", "mara"):
        eval_arms = {r["arm"] for r in s["table"][arm]["eval"]}
        assert {"base", "story", "news", "code", "karcher", "linear"} <= eval_arms
        diff = s["table"][arm]["vs_base"]["karcher"]["story"]
        assert set(diff) == {"nll", "distinct1", "pairwise"}
        lo, hi = diff["nll"]["interval"]
        assert lo <= diff["nll"]["diff"] <= hi
    # the MARA runs were anchored at the base's held-out proxy reward of their domain
    for d in s["domains"]:
        mara_args = json.loads((out / "mara" / d / "args.json").read_text())
        assert mara_args["mara_tau"] == pytest.approx(s["mara_tau"][d], abs=1e-4)
        assert s["mara_tau"][d] < 0  # a mean log-likelihood
    assert all(0 < c["reward_s"] < c["step_s"] for c in s["proxy_cost"].values())
    assert set(s["likelihood"]) == {"base", "no_mara", "mara"}
    assert "### story" in (out / "style_karcher.md").read_text()
    assert "Mean held-out NLL" in proc.stdout
