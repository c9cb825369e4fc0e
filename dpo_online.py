"""Self-improving pretraining: online DPO over K rollouts of each document prefix, judged
full-pairwise.

Self-Improving Pretraining (arXiv 2601.21343) continues pretraining a model on a stream of documents
cut into a prefix x and the suffix that follows it. For every prefix the policy writes K
continuations at T = 1.0, top-p 1.0 (sec. 1.1.1); with the original suffix they are K + 1
candidates. A judge compares every pair of candidates, each pair in both orders so position bias
cancels, and a candidate's score is its mean win rate (sec. 1.1.2: all pairs did better than judging
against one pivot; full_pairwise below). The update is DPO (Rafailov et al., arXiv 2305.18290) on
pairs of candidates, chosen y_c = the best scored and rejected y_r = the worst (the paper's choice;
`--pairs all` trains on every score-ordered pair, each prefix weighted equally):

    h = [log pi(y_c|x) - log pi(y_r|x)] - [log pi_ref(y_c|x) - log pi_ref(y_r|x)]
        (summed token log-probs)
    L = -log sigmoid(beta h)          --loss sigmoid (DPO, eq. 7)
        (h - 1 / (2 beta))^2          --loss ipo (IPO, arXiv 2310.12036, eq. 17)

pi_ref is the starting model: the same weights with LoRA switched off. Each candidate's policy and
reference log-probs are computed once (one sequence pass each) and indexed into its pairs. A prefix
whose candidates all score the same gives no pair and is dropped (counted). The model card
Jarrodbarnes/qwen3-0.6B-interleaved-thinking ran this with K = 16 on Qwen3-0.6B-Base; its trained
model beat the base on 81/128 held-out pairwise continuation comparisons (63.28%). The evaluation
here is that comparison: on held-out prefixes the trained policy and the starting model each write a
continuation, the judge compares the two in both orders (a tie counts 1/2), and the win rate comes
with a 95% interval.

Documents (`--data`): JSONL rows {"text", "domain"?} or a dataset id; 'toy' = the toy story / news /
code documents (tasks.document_windows; held out by the rule of every script).

Judges (`--judge`, judges.py): "toy" (checks every continuation line against the facts of the
prefix), an OpenAI-compatible URL (vLLM, SGLang, `transformers serve`) or a model run in this
process, asked the paper's quality prompt (fig. 2). A verdict that does not parse is invalid:
counted, and its pair left out, never scored 1/2. Replies are cached in <out>/judge_cache.jsonl,
so a rerun or --resume asks only what it has not asked before.

On the toy (`python dpo_online.py`: 150 steps of 4 prefixes x 8 rollouts of 128 tokens,
rollout-vs-rollout pairs) the trained policy beat the toy base on 0.646 of 128 held-out prefixes,
95% interval [0.588, 0.703] (docs/dpo_online.md: the variants tried, and the ways the policy learned
to game the toy judge before they were closed).

Run:
    python dpo_online.py                              # toy documents, toy judge, from the toy base
    python dpo_online.py --eval-only runs/dpo_online  # win rate of an adapter against its base
    python dpo_online.py --model Qwen/Qwen3-0.6B-Base --data docs.jsonl \\
        --judge http://127.0.0.1:8001 --judge-model Qwen/Qwen3-8B  # e.g. `vllm serve Qwen/Qwen3-8B`
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

import cli
import distributed
import errors
import judges
import lifecycle
import loading
import lora
import rewards
import sampling
import stats
import tasks
import toy

# ---------------------------------------------------------------------------------------------
# The DPO pieces with a formula each (tests import them)
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss: str
) -> torch.Tensor:
    """Per pair, from summed sequence log-probs [P]: h = (pi_c - pi_r) - (ref_c - ref_r);
    sigmoid: -log sigmoid(beta h) (DPO, arXiv 2305.18290, eq. 7); ipo: (h - 1/(2 beta))^2 (arXiv
    2310.12036, eq. 17; TRL divides the log-probs by the length first, the paper and this repo do
    not)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}: choose sigmoid or ipo")


def select_pairs(
    scores: list[float | None], mode: str, rng: random.Random
) -> list[tuple[int, int, float]]:
    """(chosen, rejected, weight) pairs from one prefix's candidate scores; weights sum to 1 (or no
    pair).

    best-worst: the highest score against the lowest, ties broken at random (so the original suffix,
    candidate 0, is not favoured); all: every (i, j) with score_i > score_j. Candidates without a
    score (no valid verdict) are left out; a prefix whose scores are all equal has no pair."""
    valid = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(valid) < 2 or max(valid)[0] == min(valid)[0]:
        return []
    if mode == "best-worst":
        top, bottom = max(valid)[0], min(valid)[0]
        chosen = rng.choice([i for s, i in valid if s == top])
        rejected = rng.choice([i for s, i in valid if s == bottom])
        return [(chosen, rejected, 1.0)]
    pairs = [(i, j) for si, i in valid for sj, j in valid if si > sj]
    return [(i, j, 1.0 / len(pairs)) for i, j in pairs]


def summed_logprobs(model, roll: sampling.Rollout) -> torch.Tensor:
    """[R] log pi(completion | prompt): the completion's token log-probs summed (T = 1), one pass
    over the rows."""
    ids, attn, K = sampling.micro_batch(roll, slice(None))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        logp = sampling.sequence_logprobs(model, ids, attn, K, group=roll.group)
    return (logp * roll.completion_mask[:, :K]).sum(-1)


# ---------------------------------------------------------------------------------------------
# 1. Rollout and judging: K + 1 candidates per prefix, full-pairwise scores, the training pairs
# ---------------------------------------------------------------------------------------------


@dataclass
class PairwiseResult:
    """What full_pairwise found for one prefix."""

    # each candidate's mean win rate over the pairs it was judged in (None: no pair)
    scores: list[float | None]
    pairs: int  # unordered pairs, each asked in both orders
    invalid_pairs: int  # pairs left out: the verdict of at least one order did not parse
    consistent_pairs: int  # valid pairs whose two orders named the same winner
    tied_pairs: int  # valid pairs judged even (the two orders disagree, or the judge said 0.5)


def full_pairwise(
    judge, prefixes: Sequence[str], candidates: Sequence[Sequence[str]]
) -> list[PairwiseResult]:
    """Every pair (i, j) of each prefix's candidates judged in both orders (Self-Improving
    Pretraining, arXiv 2601.21343, sec. 1.1.2: all pairs beat a single pivot; both orders cancel
    position bias).

    p_ij = the mean of P(i better) shown first and shown second: 1 or 0 when the orders agree, 0.5
    (a tie) when they disagree. Candidate i's score = the mean of p_ij over its pairs, its win rate
    (K candidates' scores sum to K/2). A pair with an unusable verdict in either order is left out
    and counted, never guessed. One judge batch for all prefixes (an HTTP judge keeps `concurrency`
    requests in flight). Uses judge.prefer_ordered when it exists, else asks judge.prefer in both
    orders (judges.both_orders).
    """
    jobs = [
        (n, i, j)
        for n, cands in enumerate(candidates)
        for i in range(len(cands))
        for j in range(i + 1, len(cands))
    ]
    verdicts = judges.both_orders(
        judge,
        [prefixes[n] for n, _, _ in jobs],
        [candidates[n][i] for n, i, _ in jobs],
        [candidates[n][j] for n, _, j in jobs],
    )
    results = [PairwiseResult([None] * len(c), 0, 0, 0, 0) for c in candidates]
    wins = [[0.0] * len(c) for c in candidates]
    counts = [[0] * len(c) for c in candidates]
    for (n, i, j), (shown_first, shown_second) in zip(jobs, verdicts):
        res = results[n]
        res.pairs += 1
        if shown_first is None or shown_second is None:
            res.invalid_pairs += 1
            continue
        v1, v2 = float(shown_first), 1.0 - float(shown_second)  # both: P(i better)
        if not (0.0 <= v1 <= 1.0 and 0.0 <= v2 <= 1.0):
            raise rewards.RewardError(
                f"judge returned {shown_first}, {shown_second} for candidates ({i}, {j}); "
                f"expected probabilities in [0, 1]"
            )
        p = (v1 + v2) / 2
        res.consistent_pairs += (v1 - 0.5) * (v2 - 0.5) > 0 or v1 == v2 == 0.5
        res.tied_pairs += p == 0.5
        wins[n][i] += p
        wins[n][j] += 1.0 - p
        counts[n][i] += 1
        counts[n][j] += 1
    for res, w, c in zip(results, wins, counts):
        res.scores = [x / k if k else None for x, k in zip(w, c)]
    return results


def pairwise_metrics(results: Sequence[PairwiseResult], calls: int, invalid: int) -> dict:
    """The judge's columns of a step's metrics from full_pairwise's `results`: `calls` verdicts
    asked for them, `invalid` of which did not parse (the growth of judge.calls and judge.invalid),
    the share of valid pairs whose two orders agree (position consistency) or that are even, and
    the pairs left out."""
    valid = sum(r.pairs - r.invalid_pairs for r in results)
    return {
        "judge/calls": calls,
        "judge/invalid_rate": invalid / max(calls, 1),
        "judge/position_consistency": sum(r.consistent_pairs for r in results) / max(valid, 1),
        "judge/tie_rate": sum(r.tied_pairs for r in results) / max(valid, 1),
        "judge/invalid_pairs": sum(r.invalid_pairs for r in results),
    }


@dataclass
class Judged:
    """One step's prefixes, their candidates (token ids and texts), and the pairs it trains on."""

    windows: list[dict]
    candidates: list[list[list[int]]]  # per prefix, per candidate: token ids
    texts: list[list[str]]
    pairs: list[list[tuple[int, int, float]]]
    metrics: dict
    samples: list[dict]
    num_tokens: int


def rollout_and_judge(
    model, tokenizer, windows: list[dict], judge, generator, rng: random.Random, args: Args
) -> Judged:
    """K = --num-rollouts rollouts per prefix (plus the original suffix as candidate 0 with
    --include-original), every pair of candidates judged in both orders (full_pairwise:
    score = mean win rate), and each prefix's training pairs (select_pairs, ties broken by `rng`);
    the first --log-completions prefixes as samples."""
    K, include_original = args.num_rollouts, args.include_original
    roll = sampling.sample(
        model,
        tokenizer,
        [w["prefix_ids"] for w in windows],
        n=K,
        max_new_tokens=args.suffix_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=generator,
        eos_token_ids=None if args.stop_at_eos else [],
    )
    t_judge = time.perf_counter()
    rows = roll.tokens()
    texts = roll.texts(tokenizer)
    first = 1 if include_original else 0  # candidate 0 is the original suffix when it is included
    cands = [
        ([w["continuation_ids"]] if include_original else []) + rows[b * K : (b + 1) * K]
        for b, w in enumerate(windows)
    ]
    cand_texts = [
        ([w["continuation"]] if include_original else []) + texts[b * K : (b + 1) * K]
        for b, w in enumerate(windows)
    ]
    calls, invalid = judge.calls, judge.invalid
    results = full_pairwise(judge, [w["prefix"] for w in windows], cand_texts)
    chosen = [select_pairs(r.scores, args.pairs, rng) for r in results]
    with_pairs = [(r, p) for r, p in zip(results, chosen) if p]
    best = [_best_candidate(r.scores) for r, _ in with_pairs]
    metrics = {
        **pairwise_metrics(results, judge.calls - calls, judge.invalid - invalid),
        "pairs/prefixes_dropped": len(windows) - len(with_pairs),
        "pairs/count": sum(len(p) for p in chosen),
        "score/spread": sum(_spread(r.scores) for r, _ in with_pairs) / max(len(with_pairs), 1),
        "score/rollouts": _mean([s for r in results for s in r.scores[first:] if s is not None]),
        **roll.length_metrics(),
        "timing/judge": time.perf_counter() - t_judge,
    }
    if include_original:
        # the paper's fig. 8: the share of chosen candidates that are rollouts grows as the policy
        # improves
        metrics["chosen/original_share"] = sum(b == 0 for b in best) / max(len(best), 1)
        metrics["chosen/rollout_share"] = sum(b != 0 for b in best) / max(len(best), 1)
        metrics["score/original"] = _mean([r.scores[0] for r in results if r.scores[0] is not None])
    samples = [
        {
            "prefix": w["prefix"],
            "candidates": [
                {"text": t, "score": s, "original": include_original and i == 0}
                for i, (t, s) in enumerate(zip(ct, r.scores))
            ],
            "pairs": [[c, rj] for c, rj, _ in p],
        }
        for w, ct, r, p in list(zip(windows, cand_texts, results, chosen))[: args.log_completions]
    ]
    return Judged(
        windows=windows,
        candidates=cands,
        texts=cand_texts,
        pairs=chosen,
        metrics=metrics,
        samples=samples,
        num_tokens=int(roll.attention_mask.sum()),
    )


def _best_candidate(scores: list[float | None]) -> int:
    """The highest-scored candidate (unscored ones count -1), the first one on a tie."""
    return -max((s if s is not None else -1.0, -i) for i, s in enumerate(scores))[1]


def _spread(scores: list[float | None]) -> float:
    """Highest minus lowest score of one prefix's scored candidates."""
    valid = [s for s in scores if s is not None]
    return max(valid) - min(valid)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# 2. Update: DPO over micro-batches of whole prefixes (the optimizer step is the caller's)
# ---------------------------------------------------------------------------------------------


def _micro_batches(pairs: list[list[tuple[int, int, float]]], size: int) -> list[list[int]]:
    """Prefixes with pairs, grouped whole: at most `size` candidate rows per group (at least one
    prefix)."""
    groups, cur, rows = [], [], 0
    for b in [b for b, p in enumerate(pairs) if p]:
        need = len({i for c, r, _ in pairs[b] for i in (c, r)})
        if cur and rows + need > size:
            groups.append(cur)
            cur, rows = [], 0
        cur.append(b)
        rows += need
    if cur:
        groups.append(cur)
    return groups


def update(model, judged: Judged, args: Args, pad_id: int, world: int) -> dict:
    """Accumulate the gradient of mean over prefixes (of all ranks) of sum_pairs weight x L (--loss,
    --beta), over micro-batches of at most --micro-batch-size candidates. Only candidates in a pair
    are scored: one reference pass (LoRA off, no gradient) and one policy pass each, whatever the
    number of pairs they are in. A prefix's candidates share a micro-batch, so its loss is complete
    there and backward runs at once."""
    device = next(model.parameters()).device
    jobs = sum(1 for p in judged.pairs if p)
    n_global = float(distributed.all_reduce_sum(torch.tensor(float(jobs), dtype=torch.float64)))
    sums = dict.fromkeys(("loss", "chosen", "rejected", "acc", "logp_c", "logp_r", "n"), 0.0)
    beta = args.beta
    for group in _micro_batches(judged.pairs, args.micro_batch_size):
        index, prompts, comps = {}, [], []
        for b in group:
            for i in sorted({i for c, r, _ in judged.pairs[b] for i in (c, r)}):
                index[(b, i)] = len(prompts)
                prompts.append(judged.windows[b]["prefix_ids"])
                comps.append(judged.candidates[b][i])
        roll = sampling.rollout_from_tokens(prompts, comps, pad_id, device)
        with torch.no_grad(), lora.disabled(model):
            ref = summed_logprobs(model, roll)
        pol = summed_logprobs(model, roll)
        flat = [(index[(b, c)], index[(b, r)], w) for b in group for c, r, w in judged.pairs[b]]
        ci, ri = (torch.tensor([f[k] for f in flat], device=device) for k in (0, 1))
        w = torch.tensor([f[2] for f in flat], device=device)
        per_pair = dpo_loss(pol[ci], pol[ri], ref[ci], ref[ri], beta, args.loss)
        # the gradient all-reduce averages over ranks: x world makes it the mean over every rank's
        # prefixes
        loss = (w * per_pair).sum() * world / max(n_global, 1.0)
        loss.backward()
        with torch.no_grad():
            # DPO's implicit rewards: beta (log pi - log pi_ref)
            r_c, r_r = beta * (pol[ci] - ref[ci]), beta * (pol[ri] - ref[ri])
            for key, value in (
                ("loss", (w * per_pair).sum()),
                ("chosen", r_c.sum()),
                ("rejected", r_r.sum()),
                ("acc", (r_c > r_r).float().sum()),
                ("logp_c", pol[ci].sum()),
                ("logp_r", pol[ri].sum()),
                ("n", torch.tensor(float(len(flat)))),
            ):
                sums[key] += float(value)
    reduced = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
    total = dict(zip(sums, reduced.tolist()))
    n = max(total["n"], 1.0)
    return {
        "loss": total["loss"] / max(n_global, 1.0),
        "rewards/chosen": total["chosen"] / n,
        "rewards/rejected": total["rejected"] / n,
        "rewards/margins": (total["chosen"] - total["rejected"]) / n,
        "rewards/accuracies": total["acc"] / n,
        "logps/chosen": total["logp_c"] / n,
        "logps/rejected": total["logp_r"] / n,
    }


# ---------------------------------------------------------------------------------------------
# 3. Held-out evaluation: the win rate against the starting model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, heldout: list[dict], judge, args: Args, baseline=None) -> dict:
    """The policy and the starting model (`baseline`, or the policy with LoRA off) each continue
    every held-out prefix once as the rollouts do (--suffix-tokens, --temperature, --top-p,
    --stop-at-eos; fixed generators); the judge compares each pair in both orders. Win rate = mean
    over prefixes of 1 (win), 1/2 (tie, or orders that disagree), 0 (loss); a pair with an invalid
    verdict is left out and counted. 95% interval: mean +- 1.96 sd / sqrt(n) over the prefixes."""
    device = next(model.parameters()).device
    ids = [w["prefix_ids"] for w in heldout]
    kw = dict(
        n=1,
        max_new_tokens=args.suffix_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=64,
        eos_token_ids=None if args.stop_at_eos else [],
    )
    seed = args.seed
    policy = sampling.sample(
        model, tokenizer, ids, generator=torch.Generator(device=device).manual_seed(seed + 1), **kw
    )
    with lora.disabled(model):  # the starting model: `baseline`, else the policy with LoRA off
        base = sampling.sample(
            model if baseline is None else baseline,
            tokenizer,
            ids,
            generator=torch.Generator(device=device).manual_seed(seed + 2),
            **kw,
        )
    p_texts, b_texts = policy.texts(tokenizer), base.texts(tokenizer)
    calls, invalid = judge.calls, judge.invalid
    results = full_pairwise(
        judge, [w["prefix"] for w in heldout], [[p, b] for p, b in zip(p_texts, b_texts)]
    )
    outcomes = [r.scores[0] for r in results if r.scores[0] is not None]
    if not outcomes:
        raise judges.JudgeError(
            f"judge {getattr(judge, 'url', '')}: no held-out comparison got a valid verdict in "
            f"both orders ({judge.invalid - invalid} of {judge.calls - calls} verdicts invalid)"
        )
    row = stats.win_rate(outcomes)
    return {
        "win_rate_vs_base": row.pop("win_rate"),
        **row,
        "invalid_pairs": len(results) - len(outcomes),
        "judge_invalid_rate": (judge.invalid - invalid) / max(judge.calls - calls, 1),
        "policy_mean_length": float(policy.completion_mask.sum(1).float().mean()),
        "base_mean_length": float(base.completion_mask.sum(1).float().mean()),
        "_samples": [
            {"prompt": w["prefix"], "completion": p, "base": b, "win": r.scores[0]}
            for w, p, b, r in list(zip(heldout, p_texts, b_texts, results))[:10]
        ],
    }


def starting_win_rate() -> dict:
    """Before training the policy is the starting model (LoRA B = 0): its win rate against it is
    1/2 by construction, so there is nothing to measure."""
    return {"win_rate_vs_base": 0.5}


# ---------------------------------------------------------------------------------------------
# Flags, defaults, main
# ---------------------------------------------------------------------------------------------


@dataclass
class Args(judges.JudgeArgs, cli.TrainArgs):
    out: str = "runs/dpo_online"
    max_steps: int | None = None
    batch_size: int = 4
    load_in_4bit: bool = False
    log_completions: int = 1
    """prefixes per step written to samples.jsonl (candidates, scores, the chosen pair)"""
    prefix_tokens: int | None = None
    """tokens of a document shown as the prefix (default 192 toy, 384 hub model)"""
    suffix_tokens: int = 128
    """tokens of the original suffix, and new tokens per rollout (the paper: 128)"""
    skip_short_documents: bool = False
    """skip (and count) documents shorter than prefix + suffix instead of stopping (always on for
    the toy documents)"""
    num_rollouts: int | None = None
    """K: policy rollouts per prefix, besides the original suffix (default 8 toy, 16 hub model)"""
    temperature: float = 1.0
    """rollout sampling temperature (the paper: 1.0)"""
    stop_at_eos: bool = False
    """end a rollout at an end-of-text token; by default every rollout is --suffix-tokens long, the
    length of the original suffix (on the toy, stopping early let the policy win by writing less)"""
    top_p: float = 1.0
    """rollout nucleus sampling (the paper: 1.0)"""
    include_original: bool | None = None
    """the original suffix is a candidate (default: on for a hub model, as in the paper; off for the
    toy, whose original suffix is consistent by construction and so is always the chosen one: every
    pair is then original-vs-rollout, which moved the toy's win rate far less; docs/dpo_online.md)
    """
    pairs: Literal["best-worst", "all"] = "best-worst"
    """best-worst: one pair per prefix, highest vs lowest score (the paper); all: every pair with
    different scores, weighted 1 / pairs per prefix"""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss"""
    beta: float = 0.1
    """DPO beta (the paper does not state it; TRL's default 0.1)"""
    eval_size: int = 128
    """held-out prefixes for the win rate"""
    eval_every: int = 0
    """evaluate every N steps (0 = at the end only)"""
    eval_only: str = ""
    """evaluate this adapter (or full model dir) against --model (+ --init-adapter) and exit"""


# {field: (toy, real model on one CUDA GPU)}. K = 16 is the model card's
# (Jarrodbarnes/qwen3-0.6B-interleaved-thinking), 128-token suffixes the paper's (sec. 1.1.1); on a
# CPU a real model gets lora.SMALL_DEVICE_SETUP's lr, rank and checkpointing.
DEFAULTS = {
    "lr": (1e-3, 5e-6),
    "lora_r": (16, 64),
    "gradient_checkpointing": (False, True),
    "prefix_tokens": (192, 384),
    "num_rollouts": (8, 16),
    "max_steps": (150, 500),
}


def resolve_defaults(args: Args) -> Args:
    """DEFAULTS for the fields left unset, then the settings derived from them, checked."""
    lora.fill_defaults(args, DEFAULTS)
    hub = args.model != "toy"
    if args.include_original is None:
        args.include_original = hub
    if not args.judge:
        if args.data != "toy":
            raise errors.ConfigError(
                "--judge: documents other than the toy ones need a judge: an OpenAI-compatible "
                "URL (vLLM, SGLang, transformers serve) or a model directory / hub id"
            )
        args.judge = "toy"
    if args.data == "toy":  # toy documents run 200-840 characters: keep those long enough
        args.skip_short_documents = True
    if args.num_rollouts + args.include_original < 2:
        raise errors.ConfigError(
            "--num-rollouts: at least two candidates per prefix are needed for a pair"
        )
    if args.beta <= 0:
        raise errors.ConfigError(f"--beta {args.beta}: must be > 0")
    return args


def build_judge(args: Args, device, train: list[dict]):
    """The pairwise judge of --judge; the toy one only for toy documents."""
    if args.judge == "toy" and all(toy.detect_domain(w["prefix"]) is None for w in train[:16]):
        raise errors.ConfigError(
            f"--judge toy judges toy documents only; {args.data} is not one (pass --judge)"
        )
    return judges.from_args(args, pairwise=True, device=device)


def eval_only(args: Args, run, tokenizer, heldout, judge) -> dict:
    """--eval-only PATH: an adapter on top of the starting model, or a full model against it."""
    # the starting model: --model with --init-adapter (and the adapters it was trained on) merged
    model = loading.load_model(args.model, device=run.device, load_in_4bit=args.load_in_4bit)
    lora.merge_adapters(model, args.init_adapter)
    path, baseline = Path(args.eval_only), None
    if (path / lora.WEIGHTS_NAME).is_file():
        lora.load_adapter(model, str(path))
    elif (path / "config.json").is_file():
        baseline = model
        model = loading.load_model(str(path), device=run.device, load_in_4bit=args.load_in_4bit)
    else:
        raise errors.MissingError(
            f"--eval-only {path}: neither an adapter ({lora.WEIGHTS_NAME}) nor a model "
            f"(config.json) there"
        )
    after = evaluate(model, tokenizer, heldout, judge, args, baseline=baseline)
    after.pop("_samples")
    fields, table = report(args, 0, {}, 0.0, after)
    summary = {**fields, "eval_only": str(path), "after": after, "args": asdict(args)}
    summary = lifecycle.finish_run(run, summary, {"evaluated": str(path), **table})
    lifecycle.end_run(run)
    return summary


def report(args: Args, skipped: int, last: dict, train_seconds: float, after: dict):
    """(online DPO's fields of summary.json, the results table): the held-out win rate against
    the starting model (1/2 before training, by construction)."""
    heldout = {
        "metric": "win_rate_vs_base",
        "before": 0.5,
        "after": after["win_rate_vs_base"],
        "interval": [after["interval_low"], after["interval_high"]],
        # after - before: the win rate against the starting model, whose own is 1/2
        "diff": after["win_rate_vs_base"] - 0.5,
        "diff_interval": [after["interval_low"] - 0.5, after["interval_high"] - 0.5],
        "note": f"{after['compared']} held-out prefixes, one continuation each, both orders",
    }
    fields = {"method": "dpo_online", "judge": args.judge, "heldout": heldout}
    table = {
        "win rate vs base": round(after["win_rate_vs_base"], 3),
        "95% interval": f"[{after['interval_low']:.3f}, {after['interval_high']:.3f}]",
        "W/T/L": f"{after['wins']}/{after['ties']}/{after['losses']}",
    }
    if args.eval_only:
        return fields, table
    table["rollout share of chosen (last step)"] = last.get("chosen/rollout_share")
    table["train s"] = round(train_seconds)
    return {**fields, "short_documents_skipped": skipped}, table


def main(args: Args):
    args = resolve_defaults(args)
    run = lifecycle.start_run(args, args.resume, args.report_to)
    tokenizer = loading.load_tokenizer(args.model)
    train, heldout, skipped = tasks.document_windows(tokenizer, args)
    judge = build_judge(args, run.device, train)
    if args.eval_only:
        return eval_only(args, run, tokenizer, heldout, judge)
    # with LoRA off the policy is the starting model: the reference
    model = lora.load_policy(args, run.device)
    opt = lifecycle.adamw(lora.lora_parameters(model), args)
    heldout_eval = functools.partial(evaluate, model, tokenizer, heldout, judge, args)
    start, state = lifecycle.begin_training(run, model, opt, starting_win_rate, args.resume)
    state.setdefault("tokens_seen", 0)
    model.train()
    t_train, last = 0.0, {}
    for step in lifecycle.training_steps(run, start, args, "dpo_online"):
        t0 = time.perf_counter()
        # the step's prefixes and rollout generator; the pairs' ties broken by a seeded rng
        windows, generator = lifecycle.step_batch(run, train, args, step)
        rng = random.Random(args.seed * 7919 + step)
        judged = rollout_and_judge(model, tokenizer, windows, judge, generator, rng, args)
        lifecycle.log_samples(run, step + 1, judged.samples)
        state["tokens_seen"] += judged.num_tokens * run.world
        t1 = time.perf_counter()
        # loading.load_tokenizer gives every tokenizer a pad id (EOS where it has none)
        losses = update(model, judged, args, tokenizer.pad_token_id, run.world)
        losses.update(opt(losses["loss"], step + 1))
        t_train += time.perf_counter() - t0
        last = {
            **judged.metrics,
            **losses,
            "learning_rate": opt.scheduler.get_last_lr()[0],
            "num_tokens": state["tokens_seen"],
            "step_time": time.perf_counter() - t0,
            "timing/rollout_and_judge": t1 - t0,
            "timing/update": time.perf_counter() - t1,
        }
        shown = {
            "rewards/margins": ".3f",
            "rewards/accuracies": ".2f",
            "chosen/rollout_share": ".2f",
        }
        lifecycle.end_step(
            run, step + 1, last, model, opt, state, args, show=shown, evaluate=heldout_eval
        )
    return lifecycle.finish_training(
        run,
        args,
        model,
        tokenizer,
        opt,
        state,
        last,
        t_train,
        evaluate=heldout_eval,
        report=functools.partial(report, args, skipped, last, t_train),
    )


if __name__ == "__main__":
    cli.run_cli(main, Args)
