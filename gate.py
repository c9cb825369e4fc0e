"""Does a judge separate two policies? The reward gate of the model card
Jarrodbarnes/qwen3-0.6B-interleaved-thinking (its RLMT_RESULTS.md), run before trusting a judge as a
reward.

Every arm (a policy) samples the same held-out prefixes with the same seeded draws, G samples each,
and the judge scores them. Per arm: the mean reward, the share of invalid verdicts and the group
statistics of rewards.reward_gate; per pair of arms: the paired difference of the prefixes' mean
rewards with its 95% interval. The card's go/no-go: the verdicts parse (invalid rate <= 5%), the
groups carry a signal (>= 25% mixed groups) and some pair of arms is told apart (an interval that
excludes 0). The per-group statistics every group-sampling script logs stay in rewards.reward_gate.

The card also watches a run as it trains, and so does rlmt.py: template debris in the responses
(`artifact_rate`), the response length drifting (`length_drift`), and alerts that are logged and
never stop the run (`step_alerts`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import dataio
import judges
import loading
import lora
import rewards
import stats
import tasks
from answers import THINK_CLOSE, THINK_OPEN

ARTIFACTS = (THINK_OPEN, THINK_CLOSE, "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def arm_row(reward: Sequence[float], G: int, invalid_rate: float, **columns) -> dict:
    """One arm's row from its rewards (groups of G consecutive samples, one group per prefix): mean
    and std, `invalid_rate`, the card's group shares (rewards.reward_gate), the script's own
    `columns` (lengths, samples, the arm's spec), and "per_prefix", each prefix's mean reward."""
    rt = torch.tensor(reward)
    shares = rewards.reward_gate(rt, G)
    return {
        "reward_mean": rt.mean().item(),
        "reward_std": rt.std().item(),
        "invalid_rate": invalid_rate,
        "mixed_groups": shares["gate/mixed_groups"],
        "near_zero_groups": shares["gate/near_zero_groups"],
        "any_success_groups": shares["gate/any_success_groups"],
        "all_success_groups": shares["gate/all_one_groups"],
        **columns,
        "per_prefix": rt.view(-1, G).mean(1).tolist(),
    }


def sample_arm(rollout, model, tokenizer, judge, heldout: list[dict], a, **columns) -> dict:
    """One arm's row: `rollout` (rlmt.rollout) samples --num-generations (thought, response) pairs
    of every held-out prompt with a fixed generator (every arm draws the same random numbers), the
    judge scores the responses, and arm_row makes them a row, with the lengths, the artifact rate
    and a few samples."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(a.seed + 12345)
    calls, bad = judge.calls, judge.invalid
    s, rows, r, _ = rollout(model, tokenizer, judge, heldout, a, gen, batch_size=256)
    r = [0.0 if x is None else x for x in r]  # the card's gate: an invalid verdict fails
    return arm_row(
        r,
        a.num_generations,
        (judge.invalid - bad) / max(judge.calls - calls, 1),
        avg_total_new_tokens=statistics.mean(t + n for t, n in zip(s.thought_len, s.answer_len)),
        avg_suffix_words=statistics.mean(len(x.split()) for x in s.answers),
        closed_think_rate=sum(s.closed) / len(s.closed),
        artifact_rate=artifact_rate(s.answers, s.has_answer),
        _samples=[
            {"prompt": rows[i]["judge_prompt"], "answer": s.answers[i], "reward": r[i]}
            for i in range(0, len(rows), a.num_generations)
        ][:8],
        **columns,
    )


def run_arms(rollout, a, run) -> dict:
    """rlmt.py --gate: each arm 'name=spec' (lora.resolve_arms) loaded (lora.load_arm) with its
    own tokenizer and gated on the same held-out prompts (tasks.thinking_prompts); the report
    written to gate.json and printed."""
    arms = lora.resolve_arms(a.gate, a.model, flag="--gate")
    judge = judges.from_args(a, pairwise=a.task == "continuation")
    results = {}
    for name, spec in arms.items():
        model, tok_source = lora.load_arm(
            spec, a.model, run.device, a.load_in_4bit, flag="--gate arm"
        )
        tokenizer = loading.load_tokenizer(tok_source)
        _, heldout = tasks.thinking_prompts(tokenizer, a, toy_train_size=1)
        results[name] = sample_arm(rollout, model.eval(), tokenizer, judge, heldout, a, spec=spec)
        del model
    return write(results, run.out, reward_span(a.missing_reward))


def comparison(left: Sequence[float], right: Sequence[float], span: float = 1.0) -> dict:
    """Two arms of the reward gate on the same prefixes (`left`, `right`: each prefix's mean
    reward): right - left, the mean delta with a paired 95% interval (normal, over prefixes, within
    +-span, span the rewards' range) and the shares of prefixes where the right arm is better,
    worse, even."""
    mean, _, ci = stats.paired_interval(left, right, span)
    d = [b - a for a, b in zip(left, right)]
    n = len(d)
    return {
        "mean_reward_delta": mean,
        # one prefix says nothing about the spread: the whole range
        "delta_ci": ci if n > 1 else [-span, span],
        "right_better": sum(x > 1e-9 for x in d) / n,
        "left_better": sum(x < -1e-9 for x in d) / n,
        "tie": sum(abs(x) <= 1e-9 for x in d) / n,
        "shared_prefixes": n,
    }


def report(arms: dict[str, dict], span: float = 1.0) -> dict:
    """The reward gate over arms sampled on the same prefixes ({name: row}, a row with the arm's
    "per_prefix" mean rewards, "invalid_rate" and "mixed_groups"): the rows (less "per_prefix" and
    "_samples"), every pair of arms compared (comparison, "<later>_minus_<earlier>") and the card's
    go/no-go fields."""
    names = list(arms)
    pairs = {
        f"{right}_minus_{left}": comparison(
            arms[left]["per_prefix"], arms[right]["per_prefix"], span
        )
        for i, left in enumerate(names)
        for right in names[i + 1 :]
    }
    return {
        "arms": {
            k: {c: v for c, v in a.items() if c not in ("per_prefix", "_samples")}
            for k, a in arms.items()
        },
        "per_prefix": {k: a["per_prefix"] for k, a in arms.items()},
        "comparisons": pairs,
        # go/no-go, as the card's fields: verdicts parse, groups carry a signal, some pair is told
        # apart
        "reward_validity_ok": all(a["invalid_rate"] <= 0.05 for a in arms.values()),
        "variance_ok": all(a["mixed_groups"] >= 0.25 for a in arms.values()),
        "separable": any(p["delta_ci"][0] > 0 or p["delta_ci"][1] < 0 for p in pairs.values()),
    }


def tables(gate_report: dict) -> str:
    """A report as two Markdown tables: the arms, then the comparisons."""
    comparisons = [
        {
            "comparison": k,
            **{c: v for c, v in p.items() if c != "delta_ci"},
            "95% interval": f"[{p['delta_ci'][0]:.4f}, {p['delta_ci'][1]:.4f}]",
        }
        for k, p in gate_report["comparisons"].items()
    ]
    arms = [{"arm": k, **v} for k, v in gate_report["arms"].items()]
    return dataio.markdown_table(arms) + "\n\n" + dataio.markdown_table(comparisons)


def write(arms: dict[str, dict], out: Path, span: float = 1.0) -> dict:
    """The report over `arms`, written to out/gate.json and printed as its tables."""
    gate_report = report(arms, span)
    dataio.atomic_write_json(Path(out) / "gate.json", gate_report)
    print("\n" + tables(gate_report), flush=True)
    return gate_report


def artifact_rate(answers: list[str], has_answer: list[bool]) -> float:
    """Share of responses with template debris: a `<think>` / `</think>` or a role token inside the
    response, or an empty response (missing ones of --boundary model included)."""
    bad = [
        not h or not a.strip() or any(x in a for x in ARTIFACTS)
        for a, h in zip(answers, has_answer)
    ]
    return sum(bad) / max(len(bad), 1)


def length_drift(state: dict, answer_length: float) -> float:
    """Mean response length of the last 5 steps over that of the first 5, minus 1 (the card's drift
    watch); the two windows live in the checkpointed `state`."""
    early = state.setdefault("early_lengths", [])
    if len(early) < 5:
        early.append(answer_length)
    state["recent_lengths"] = (state.get("recent_lengths", []) + [answer_length])[-5:]
    return statistics.mean(state["recent_lengths"]) / max(statistics.mean(early), 1e-9) - 1.0


def step_alerts(m: dict, drift_alert: float, step: int) -> list[str]:
    """The card's alerts, logged and never stopping the run: every group at 0, half the groups all
    at 1 (nothing left to learn there), the response length drifting by more than --drift-alert."""
    hits = {
        "reward_collapse": m["gate/all_zero_groups"] == 1.0,
        "all_one_groups": m["gate/all_one_groups"] >= 0.5,
        "length_drift": abs(m["length_drift"]) > drift_alert,
    }
    names = [name for name, hit in hits.items() if hit]
    for name in names:
        tqdm.write(
            f"alert at step {step}: {name} ({m['reward']:.3f} reward, drift "
            f"{m['length_drift']:+.2f})"
        )
    return names


def reward_span(missing_reward: float) -> float:
    """The range of a reward: a judge's is [0, 1], a missing response gets --missing-reward."""
    return max(1.0, missing_reward) - min(0.0, missing_reward)
