"""RLMT: reinforcement learning with model-rewarded thinking (Bhaskar, Ye, Chen, "Language Models
that Think, Chat Better", arXiv 2509.20357).

The policy writes a thought z, then a response y; a judge scores the response only, r = J(x, y), and
a GRPO update trains the thought and the response tokens alike. For every prompt x the policy
samples a group of G (thought, response) pairs; with the group's rewards r_1..r_G

    A_i   = (r_i - mean_j r_j) / (std_j r_j + 1e-4)
    rho_t = exp(logp_t - logp_old_t)                 (= 1 with one update per batch: gradient A)
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * k3_t
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (reference = the starting model: LoRA off)
    L     = sum_t m_t L_t / sum_t m_t                 (token mean over the batch)

m_t is 1 on the tokens the policy sampled. Two ways to get (z, y) (`--boundary`):

- external (default; the model card Jarrodbarnes/qwen3-0.6B-interleaved-thinking): stage 1 samples
  the thought after `<think>` for at most --thought-tokens (it ends early where the policy writes
  `</think>` or ends its turn; that token is dropped), the script inserts the boundary `</think>`
  itself, and stage 2 samples the response. The inserted tokens are not policy samples: m_t = 0 on
  them. Every sample has a response.
- model (the paper's): one stage; the policy writes `</think>` itself and the response is the text
  after the first `</think>`, the same rule in training and in the gate. A sample without it gets
  --missing-reward and is counted (`missing_think_close`).

Tasks (`--task`): chat, the paper's (requests; the toy: instructions such as "Reverse the letters
of: paper", judged by the toy answer judge, with partial credit for near misses), and continuation,
the card's (a document prefix, the response judged against the original continuation in both
orders: win 1, tie 0.5, loss 0; `--judging pointwise` rates it alone). --data: JSONL of {"prompt":
str | messages} (chat) or {"prompt", "reference"} (continuation), read by tasks.thinking_prompts;
"toy-arithmetic" = toy word problems in the answer formats of --toy-styles. --init-adapter "auto"
starts the toy chat tasks from the shipped toy thinking SFT. Judges (`--judge`, judges.py): "toy",
an OpenAI-compatible URL, or a model run in this process; the judge never sees the thought. An
invalid verdict is no score: the sample is left out of its group's advantage and of the loss.

The reward gate (the card's, gate.py): every arm samples the same held-out prompts with the same
seeded draws (--gate-prefixes x --num-generations); per arm and per pair of arms its tables are
printed and written to gate.json. Training ends with the gate of the starting model against the
trained one (summary.json "heldout").

Run:
    python rlmt.py                      # toy instructions, from the shipped toy thinking SFT
    python rlmt.py --task continuation  # toy documents, pairwise against the original continuation
    python rlmt.py --gate base=,sft=toy/sft_instruct,rlmt=toy/sft_instruct+runs/rlmt  # gate only
    python rlmt.py --model Qwen/Qwen3-0.6B-Base --init-adapter runs/sft_think_qwen \\
        --data prompts.jsonl --judge http://127.0.0.1:8001 --judge-model Qwen/Qwen3-8B
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch

import chat
import cli
import distributed
import gate
import judges
import lifecycle
import loading
import lora
import rewards
import sampling
import tasks
import toy
from answers import THINK_CLOSE

# ---------------------------------------------------------------------------------------------
# 1. Rollout: thought, boundary, response; the loss mask is 0 on the inserted boundary
# ---------------------------------------------------------------------------------------------


@dataclass
class Samples:
    roll: sampling.Rollout  # prompt | thought + boundary + response, as one completion per row
    loss_mask: torch.Tensor  # [R, C] 1 on policy-sampled tokens, 0 on the boundary and padding
    answers: list[str]  # the response text (what the judge sees)
    thought_len: list[int]  # tokens
    answer_len: list[int]
    # the policy closed its thought itself (wrote </think> or ended the thought stage)
    closed: list[bool]
    has_answer: list[bool]  # model boundary: a </think> was found


def sample_thought_then_answer(
    model, tokenizer, prompts: list[list[int]], a: Args, generator, batch_size=None
) -> Samples:
    """G = --num-generations (thought, response) samples per prompt by --boundary, at most
    --thought-tokens and --answer-tokens at --temperature / --top-p, rows grouped by prompt (row
    i*G+j is sample j of prompt i). `</think>` is found by its id where it is one token (Qwen3),
    else in the decoded text (SmolLM2: 3 pieces)."""
    G, thought_tokens, answer_tokens = a.num_generations, a.thought_tokens, a.answer_tokens
    eos = sampling.stop_token_ids(model, tokenizer)
    ends = [tokenizer.decode([i]) for i in eos]  # where a response ends, as text
    kw = dict(temperature=a.temperature, top_p=a.top_p, generator=generator, batch_size=batch_size)
    if a.boundary == "model":
        roll = sampling.sample(
            model, tokenizer, prompts, n=G, max_new_tokens=thought_tokens + answer_tokens, **kw
        )
        return split_at_model_boundary(tokenizer, roll, ends)

    # Stage 1: the thought, ended by the policy (</think> or an end-of-turn token, dropped) or by
    # the budget.
    close = chat.marker_ids(tokenizer, THINK_CLOSE)
    single = len(close) == 1
    stage1 = sampling.sample(
        model,
        tokenizer,
        prompts,
        n=G,
        max_new_tokens=thought_tokens,
        stop=None if single else THINK_CLOSE,
        eos_token_ids=sorted({*close, *eos}) if single else eos,
        **kw,
    )
    thoughts, closed = [], []
    for t, done in zip(stage1.tokens(), stage1.finished.tolist()):
        if not done:  # cut by the budget: all of it is thought
            thoughts.append(t)
        elif single or t[-1] in eos:  # its last token (</think> or end of turn) is dropped
            thoughts.append(t[:-1])
        else:  # stopped by the text "</think>" of several tokens: cut where it begins
            span = chat.marker_span(tokenizer, t, THINK_CLOSE)
            thoughts.append(t[: span[0]] if span else t[:-1])
        closed.append(bool(done))

    # Stage 2: the response, from prompt + thought + boundary (one sample each: the group is
    # already there).
    rows = [p for p in prompts for _ in range(G)]
    bounds = [boundary_ids(tokenizer, t) for t in thoughts]
    stage2 = sampling.sample(
        model,
        tokenizer,
        [p + t + b for p, t, b in zip(rows, thoughts, bounds)],
        n=1,
        max_new_tokens=answer_tokens,
        **kw,
    )
    answer_ids = stage2.tokens()

    # One rollout of prompt | thought + boundary + response; the loss skips the boundary.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    roll = sampling.rollout_from_tokens(
        rows,
        [t + b + a for t, b, a in zip(thoughts, bounds, answer_ids)],
        pad,
        device,
        finished=stage2.finished.tolist(),
        group=torch.arange(len(prompts), device=device).repeat_interleave(G),
    )
    width = roll.completion_ids.shape[1]
    loss_mask = torch.tensor(
        [
            [1] * len(t) + [0] * len(b) + [1] * len(a) + [0] * (width - len(t + b + a))
            for t, b, a in zip(thoughts, bounds, answer_ids)
        ],
        device=device,
    )
    return Samples(
        roll=roll,
        loss_mask=loss_mask,
        answers=[
            _visible(tokenizer.decode(a, skip_special_tokens=False), ends) for a in answer_ids
        ],
        thought_len=[len(t) for t in thoughts],
        answer_len=[len(a) for a in answer_ids],
        closed=closed,
        has_answer=[True] * len(rows),
    )


def split_at_model_boundary(tokenizer, roll: sampling.Rollout, ends: list[str]) -> Samples:
    """--boundary model: the policy wrote thought and response in one go; the response is the text
    after the first </think> (the RLMT code's training rule), and a sample without one has none."""
    toks = roll.tokens()
    cut = [chat.marker_span(tokenizer, t, THINK_CLOSE) for t in toks]
    answers = [
        _visible(tokenizer.decode(t, skip_special_tokens=False).split(THINK_CLOSE, 1)[1], ends)
        if c is not None
        else ""
        for t, c in zip(toks, cut)
    ]
    return Samples(
        roll=roll,
        loss_mask=roll.completion_mask.clone(),
        answers=answers,
        thought_len=[len(t) if c is None else c[0] for t, c in zip(toks, cut)],
        answer_len=[0 if c is None else len(t) - c[1] for t, c in zip(toks, cut)],
        closed=[c is not None for c in cut],
        has_answer=[c is not None for c in cut],
    )


def boundary_ids(tokenizer, thought: list[int]) -> list[int]:
    """The boundary we insert after a thought: "\\n</think>\\n\\n" as the chat template renders it
    (no "\\n" twice where the thought already ends in one)."""
    newline = "" if tokenizer.decode(thought[-1:]).endswith("\n") else "\n"
    return tokenizer(newline + THINK_CLOSE + "\n\n", add_special_tokens=False)["input_ids"]


def _visible(text: str, ends: list[str]) -> str:
    """The response as a judge should read it: up to the end of the turn (the first of `ends`, the
    stop tokens)."""
    for end in filter(None, ends):
        text = text.split(end)[0]
    return text.strip()


def judge_responses(
    judge,
    task: str,
    judging: str,
    rows: list[dict],
    answers: list[str],
    has_answer: list[bool],
    missing_reward: float,
) -> tuple[list[float | None], int]:
    """Rewards in [0, 1] (None where the verdict is invalid: never a score; counted) and the
    number of invalid verdicts. Only the response goes to the judge."""
    ask = [i for i, h in enumerate(has_answer) if h]
    prompts = [rows[i]["judge_prompt"] for i in ask]
    if task == "chat":
        verdicts = judge.score(prompts, [answers[i] for i in ask])
    elif judging == "pointwise":
        # the suffix rated alone, the original continuation shown as a reference
        verdicts = judge.score(
            prompts, [answers[i] for i in ask], references=[rows[i]["reference"] for i in ask]
        )
    else:  # win 1 / tie 0.5 / loss 0 against the original continuation, asked in both orders
        refs = [rows[i]["reference"] for i in ask]
        verdicts = judges.win_tie_loss(judge, prompts, [answers[i] for i in ask], refs)
    out = [missing_reward] * len(answers)
    for i, v in zip(ask, verdicts):
        out[i] = None if v is None else float(v)
    return out, sum(v is None for v in verdicts)


def rollout(model, tokenizer, judge, prompts: list[dict], a: Args, generator, batch_size=None):
    """(samples, their prompt rows, rewards, invalid verdicts): --num-generations (thought,
    response) samples of each prompt, the responses judged."""
    with torch.no_grad():
        s = sample_thought_then_answer(
            model, tokenizer, [p["ids"] for p in prompts], a, generator, batch_size
        )
    rows = [p for p in prompts for _ in range(a.num_generations)]
    r, invalid = judge_responses(
        judge, a.task, a.judging, rows, s.answers, s.has_answer, a.missing_reward
    )
    return s, rows, r, invalid


def rollout_metrics(s: Samples, r: list[float | None], G: int, invalid: int) -> dict:
    """The step's columns; "reward" is the mean of the scored samples, the group shares
    (rewards.reward_gate) count an invalid verdict as 0, as the gate does."""
    ans = torch.tensor(s.answer_len, dtype=torch.float32)
    scored = torch.tensor([x for x in r if x is not None])
    rt = torch.tensor([0.0 if x is None else x for x in r])
    corr = (
        float(torch.corrcoef(torch.stack([rt, ans]))[0, 1])
        if rt.std() > 0 and ans.std() > 0
        else 0.0
    )
    return {
        "reward": scored.mean().item(),
        "reward_std": scored.std().item() if len(scored) > 1 else 0.0,
        **rewards.reward_gate(rt, G),
        "judge/invalid_rate": invalid / max(len(r), 1),
        "closed_think_rate": sum(s.closed) / len(s.closed),
        "missing_think_close": s.has_answer.count(False),
        "artifact_rate": gate.artifact_rate(s.answers, s.has_answer),
        "thought_length": statistics.mean(s.thought_len),
        "answer_length": ans.mean().item(),
        "reward_length_corr": corr,
    }


def sample_row(tokenizer, rows: list[dict], s: Samples, r: list[float], i: int) -> dict:
    """Sample i as samples.jsonl shows it: the judge's prompt, the response, the thought, the
    reward."""
    return {
        "prompt": rows[i]["judge_prompt"],
        "answer": s.answers[i],
        "thought": tokenizer.decode(s.roll.completion_ids[i, : s.thought_len[i]]),
        "reward": r[i],
    }


# ---------------------------------------------------------------------------------------------
# 2. Update: group advantages, the clipped surrogate with k3 KL, token mean over the batch
# ---------------------------------------------------------------------------------------------


def group_advantages(r: torch.Tensor, G: int) -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + 1e-4); exactly 0 in a group of equal rewards. A
    NaN reward (no valid verdict) is left out of its group's mean and std, and its A is 0."""
    g = r.view(-1, G)
    if torch.isnan(g).any():
        n = (~torch.isnan(g)).sum(1, keepdim=True)
        dev = (g - g.nansum(1, keepdim=True) / n.clamp(min=1)).nan_to_num(0.0)
        std = (dev.pow(2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        top, bottom = g.nan_to_num(-math.inf).amax(1, True), g.nan_to_num(math.inf).amin(1, True)
        return (dev.masked_fill(top <= bottom, 0.0) / (std + 1e-4)).reshape(-1)
    adv = (g - g.mean(1, keepdim=True)).masked_fill((g == g[:, :1]).all(1, keepdim=True), 0.0)
    return (adv / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)


def update(model, s: Samples, adv: torch.Tensor, ref_logp, a: Args, world: int) -> dict:
    """Backward of L (--temperature, clip --epsilon, --beta) over micro-batches of at most
    --micro-batch-size rows (gradients accumulate; the optimizer step is the caller's)."""
    R, micro_batch_size = s.roll.completion_ids.shape[0], a.micro_batch_size
    temperature, eps, beta = a.temperature, a.epsilon, a.beta
    global_tokens = float(distributed.all_reduce_sum(s.loss_mask.sum().float().cpu()))
    sums = {"loss": 0.0, "kl": 0.0, "tokens": 0.0}
    for a in range(0, R, micro_batch_size):
        rows = slice(a, a + micro_batch_size)
        ids, attn, K = sampling.micro_batch(s.roll, rows)
        m = s.loss_mask[rows, :K].float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
            logp = sampling.sequence_logprobs(
                model, ids, attn, K, temperature=temperature, group=s.roll.group[rows]
            )
        logp = torch.where(m.bool(), logp.float(), 0.0)
        # one update per batch: old = current, so rho = 1 and d rho = d logp
        ratio = torch.exp(logp - logp.detach())
        A = adv[rows, None]
        loss_t = -torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        kl = torch.zeros_like(logp)
        if beta > 0:
            d = torch.where(m.bool(), ref_logp[rows, :K], 0.0) - logp
            kl = torch.exp(d) - d - 1.0
            loss_t = loss_t + beta * kl
        # x world: the all-reduce of the gradients averages over ranks
        loss = (loss_t * m).sum() * world / max(global_tokens, 1.0)
        loss.backward()
        sums["loss"] += float(loss.detach())
        sums["kl"] += float((kl.detach() * m).sum())
        sums["tokens"] += float(m.sum())
    reduced = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
    total = dict(zip(sums, reduced.tolist()))
    return {"loss": total["loss"] / world, "kl": total["kl"] / max(total["tokens"], 1.0)}


def train_on(model, s: Samples, r: list[float | None], opt, a: Args, run, step: int) -> dict:
    """One optimizer step on the samples: advantages, the reference log-probs (LoRA off; none with
    beta = 0), the backward of L, the step (a non-finite loss skips it; 3 in a row stop the run).
    A sample without a valid verdict is left out: out of its group's advantage and out of the
    loss."""
    rt = torch.tensor([math.nan if x is None else x for x in r])
    adv = group_advantages(rt, a.num_generations).to(run.device)
    s.loss_mask[torch.isnan(rt).to(s.loss_mask.device)] = 0
    ref = None
    if a.beta > 0:
        with lora.disabled(model):
            ref = sampling.rollout_logprobs(model, s.roll, a.micro_batch_size, a.temperature)
    out = update(model, s, adv, ref, a, run.world)
    out.update(opt(out["loss"], step))
    return out


# ---------------------------------------------------------------------------------------------
# 3. The reward gate: arms on the same prompts with the same draws; per arm and per pair of arms
# ---------------------------------------------------------------------------------------------


def gate_policy(model, tokenizer, judge, heldout, a: Args, start: bool) -> dict:
    """The gate arm of the policy in training: its starting model (LoRA off) or as trained now."""
    model.eval()
    with lora.disabled(model) if start else contextlib.nullcontext():
        row = gate.sample_arm(rollout, model, tokenizer, judge, heldout, a)
    model.train()
    return row


# ---------------------------------------------------------------------------------------------
# Flags, defaults, training
# ---------------------------------------------------------------------------------------------


@dataclass
class Args(judges.JudgeArgs, cli.TrainArgs):
    judge: str = "toy"
    """'toy', an OpenAI-compatible URL, or a model dir / hub id"""
    init_adapter: str = "auto"
    out: str = "runs/rlmt"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 1.0
    max_steps: int | None = None
    batch_size: int | None = None
    max_grad_norm: float | None = None
    log_completions: int = 1
    """groups per step written to samples.jsonl (thoughts and answers, rewards)"""
    save_every: int = 25
    task: Literal["chat", "continuation"] = "chat"
    """chat: requests, the judge scores the response; continuation: document prefixes, the response
    is judged against the original continuation"""
    boundary: Literal["external", "model"] = "external"
    """external: sample the thought, insert </think>, sample the response (two stages); model: the
    policy writes </think> itself"""
    toy_styles: str = "gsm8k,math,mc"
    """toy-arithmetic: answer formats, comma-separated, of gsm8k, math, mc (taken in turn)"""
    judging: Literal["pairwise", "pointwise"] = "pairwise"
    """continuation: against the original continuation in both orders, or the response rated alone
    with the original as the judge's reference"""
    num_generations: int = 16
    """G: samples per prompt (the card's K=16; paper 8)"""
    thought_tokens: int | None = None
    """thought budget (default 48, the card; 96 toy, whose tokens are characters)"""
    answer_tokens: int | None = None
    """response budget (default 128; 32 toy)"""
    temperature: float = 0.7
    """sampling temperature (the paper's 0.7); log-probs use the same T"""
    top_p: float = 1.0
    """nucleus sampling"""
    beta: float = 0.02
    """k3 KL coefficient to the reference (the card 0.02, the paper 0.001); 0 skips the reference
    pass"""
    epsilon: float = 0.2
    """PPO clip range"""
    missing_reward: float = 0.0
    """--boundary model: reward of a sample that never writes </think>"""
    max_prompt_length: int = 1024
    """longest prompt in tokens; longer is an error"""
    gate: str = ""
    """only run the reward gate over arms 'name=spec,...': spec '' = --model alone, a model dir /
    hub id, or adapters merged onto --model in order ('a+b'); 'auto' = eval_reasoning's arms"""
    gate_prefixes: int = 64
    """held-out prompts of the gate (the card's 64)"""
    gate_after: bool = True
    """after training, gate the starting model against the trained one (summary.json 'heldout')"""
    drift_alert: float = 0.5
    """alert when the mean response length moves by more than this share: mean of the last 5 steps
    against the first 5"""


# {field: (toy, real model on one CUDA GPU)}: the card Jarrodbarnes/qwen3-0.6B-interleaved-thinking
# (lr 1e-7; the paper's 1e-6), QLoRA r=64; on a CPU a real model gets lora.SMALL_DEVICE_SETUP
DEFAULTS = {
    "lr": (3e-4, 1e-7),
    "lora_r": (16, 64),
    "load_in_4bit": (False, True),
    "gradient_checkpointing": (False, True),
    "max_steps": (150, 200),
    "batch_size": (4, 2),
    "thought_tokens": (96, 48),
    "answer_tokens": (32, 128),
    "max_grad_norm": (1.0, 0.1),
}


def resolve_defaults(args: Args) -> Args:
    lora.fill_defaults(args, DEFAULTS)
    if args.init_adapter == "auto":
        toy_chat = args.model == "toy" and args.task == "chat"
        sft = toy.SFT_FORMATS_DIR if args.data == "toy-arithmetic" else toy.SFT_INSTRUCT_DIR
        args.init_adapter = str(sft) if toy_chat else ""
    return args


def report(args: Args, judge, alerts: list, n_prompts: int, train_seconds: float, before, after):
    """(RLMT's fields of summary.json, the results table). "heldout": the gate of the trained
    policy (`after`) against its start (`before`), also written to gate.json; {} without
    --gate-after."""
    heldout = {}
    if after is not None:
        span = gate.reward_span(args.missing_reward)
        report = gate.write({"start": before, "rlmt": after}, args.out, span)
        heldout = {
            "metric": "gate_mean_reward",
            "before": before["reward_mean"],
            "after": after["reward_mean"],
            "delta_ci": report["comparisons"]["rlmt_minus_start"]["delta_ci"],
            "note": f"{n_prompts} held-out prompts x {args.num_generations} samples, "
            f"T={args.temperature}",
        }
    fields = {
        "method": "rlmt",
        "task": args.task,
        "boundary": args.boundary,
        "heldout": heldout,
        "alerts": alerts,
        "judge_calls": judge.calls,
        "judge_invalid": judge.invalid,
    }
    table = {
        "task": args.task,
        "boundary": args.boundary,
        "gate before": heldout.get("before"),
        "gate after": heldout.get("after"),
        "train s": round(train_seconds),
    }
    return fields, table


def main(args: Args):
    args = resolve_defaults(args)
    # the gate alone logs no metrics: no tracker run for it
    report_to = "" if args.gate else args.report_to
    run = lifecycle.start_run(args, args.resume, report_to)
    if args.gate:
        return gate.run_arms(rollout, args, run)
    tokenizer = loading.load_tokenizer(args.model)
    train, heldout = tasks.thinking_prompts(tokenizer, args)
    # the toy judge of documents (toy.ContinuationJudge: prefer and score) for either kind of
    # continuation judging
    judge = judges.from_args(args, pairwise=args.task == "continuation")
    # --init-adapter merged in (the reference and the gate's starting arm), a fresh LoRA on top
    model = lora.load_policy(args, run.device)
    opt = lifecycle.adamw(lora.lora_parameters(model), args)
    policy_gate = functools.partial(gate_policy, model, tokenizer, judge, heldout, args)
    evaluate = functools.partial(policy_gate, start=True) if args.gate_after else dict
    start, state = lifecycle.begin_training(run, model, opt, evaluate, args.resume)
    state.setdefault("tokens_seen", 0)
    model.train()
    t_train, last, alerts = 0.0, {}, []
    for step in lifecycle.training_steps(run, start, args, "rlmt"):
        t0 = time.perf_counter()
        prompts, generator = lifecycle.step_batch(run, train, args, step)
        s, grouped, r, invalid = rollout(model, tokenizer, judge, prompts, args, generator)
        t_rollout = time.perf_counter() - t0
        state["tokens_seen"] += int(s.roll.attention_mask.sum()) * run.world
        out = train_on(model, s, r, opt, args, run, step + 1)
        t_train += time.perf_counter() - t0
        m = rollout_metrics(s, r, args.num_generations, invalid)
        m["length_drift"] = gate.length_drift(state, m["answer_length"])
        names = gate.step_alerts(m, args.drift_alert, step + 1)
        alerts += [{"step": step + 1, "alert": name} for name in names]
        last = {
            **m,
            **out,
            "alerts": names,
            "learning_rate": opt.scheduler.get_last_lr()[0],
            "step_time": time.perf_counter() - t0,
            "timing/rollout": t_rollout,
        }
        shown = range(min(len(grouped), args.log_completions * args.num_generations))
        lifecycle.log_samples(
            run, step + 1, [sample_row(tokenizer, grouped, s, r, i) for i in shown]
        )
        show = {"reward": ".3f", "kl": ".3g"}
        lifecycle.end_step(run, step + 1, last, model, opt, state, args, show=show)
    return lifecycle.finish_training(
        run,
        args,
        model,
        tokenizer,
        opt,
        state,
        last,
        t_train,
        evaluate=functools.partial(policy_gate, start=False) if args.gate_after else None,
        report=functools.partial(
            report, args, judge, alerts, len(heldout), t_train, state.get("before")
        ),
    )


if __name__ == "__main__":
    cli.run_cli(main, Args)
