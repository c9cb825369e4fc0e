"""RLMT: reinforcement learning with model-rewarded thinking (Bhaskar, Ye, Chen, arXiv 2509.20357).

The policy writes a thought z, then a response y; a judge scores the response only, r = J(x, y), and
a GRPO update trains the thought and the response tokens alike. For every prompt x the policy
samples a group of G (thought, response) pairs; with the group's rewards r_1..r_G

    A_i   = (r_i - mean_j r_j) / (std_j r_j + 1e-4)
    rho_t = exp(logp_t - logp_old_t)                        (= 1 with one update per batch: the gradient is A)
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * k3_t
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (reference = the starting model: LoRA off)
    L     = sum_t m_t L_t / sum_t m_t                        (token mean over the batch)

m_t is 1 on the tokens the policy sampled. Two ways to get (z, y) (`--boundary`):

- external (default; the model card Jarrodbarnes/qwen3-0.6B-interleaved-thinking): stage 1 samples
  the thought
  after `<think>` for at most --thought-tokens (it ends early where the policy writes `</think>` or ends its
  turn; that token is dropped), the script inserts the boundary `</think>` itself, and stage 2 samples the
  response. The inserted tokens are not policy samples: m_t = 0 on them. Every sample has a response.
- model (the paper's): one stage; the policy writes `</think>` itself and the response is the text
  after the
  first `</think>`, the same rule in training and in the gate. A sample without it gets --missing-reward and
  is counted (`missing_think_close`).

Tasks (`--task`): chat, the paper's (prompts are requests; the toy default: toy instructions such as
"Reverse the letters of: paper", judged by the toy answer judge: 1 for the exact answer, partial
credit for near misses) and continuation, the card's (a document prefix; the response is its
continuation, judged against the original continuation in both orders: win 1, tie 0.5, loss 0;
`--judging pointwise` rates it alone, the original shown to the judge as a reference). Judges
(`--judge`): "toy", an OpenAI-compatible URL (vLLM, SGLang, `transformers serve`; replies cached in
<out>/judge_cache.jsonl), or a model run in this process, by default its verdict read from the
next-token probabilities (--judge-verdict: the expected score). The judge never sees the thought.

The reward gate (the card's): every arm samples the same held-out prompts with the same seeded draws
(--gate-prefixes x --num-generations), and per arm and per pair of arms the tables below are printed
and written to gate.json. Training ends with the gate of the starting model against the trained one
(summary.json "heldout").

Run:
    python rlmt.py                                    # toy instructions, from the shipped toy thinking-SFT adapter
    python rlmt.py --task continuation                # toy documents, pairwise against the original continuation
    python rlmt.py --gate base=,sft=toy/sft_instruct,rlmt=toy/sft_instruct+runs/rlmt   # the reward gate only
    vllm serve Qwen/Qwen3-8B --port 8001 &            # a judge server, then on one GPU:
    python rlmt.py --model Qwen/Qwen3-0.6B-Base --init-adapter runs/sft_think_qwen --data prompts.jsonl \\
        --judge http://127.0.0.1:8001 --judge-model Qwen/Qwen3-8B
    torchrun --nproc_per_node 4 rlmt.py --model Qwen/Qwen3-1.7B-Base --data prompts.jsonl --judge http://...
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

import chat
import cli
import dataio
import distributed
import errors
import judges
import lifecycle
import loading
import lora
import rewards
import sampling
import stats
import toy

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ARTIFACTS = (THINK_OPEN, THINK_CLOSE, "<|im_start|>", "<|im_end|>", "<|endoftext|>")


@dataclass
class Args:
    model: str = "toy"
    """hub id or local dir of a causal LM; 'toy' = the toy base"""
    task: Literal["chat", "continuation"] = "chat"
    """chat: requests, the judge scores the response; continuation: document prefixes, the response
    is judged against the original continuation"""
    boundary: Literal["external", "model"] = "external"
    """external: sample the thought, insert </think>, sample the response (two stages); model: the
    policy writes </think> itself"""
    data: str = "toy"
    """JSONL {'prompt': str|messages} (chat) or {'prompt', 'reference'} (continuation); 'toy' = toy
    instructions / toy document prefixes; 'toy-arithmetic' = toy word problems (chat) in three
    answer formats, judged on the final answer"""
    toy_styles: str = "gsm8k,math,mc"
    """toy-arithmetic: answer formats, comma-separated, of gsm8k, math, mc (taken in turn)"""
    eval_data: str = ""
    """held-out JSONL of the same schema, the gate's prompts (default: the toy test split, or the
    last rows of --data)"""
    init_adapter: str = "auto"
    """PEFT adapter merged into the model before a fresh LoRA (the reference and the gate's starting
    arm are then the merged model); 'auto' = toy/sft_instruct (the shipped toy thinking SFT on toy
    instructions) for toy chat, toy/sft_formats for toy-arithmetic, none otherwise; '' = none"""
    judge: str = "toy"
    """'toy', an OpenAI-compatible URL, or a model dir / hub id"""
    judge_model: str = ""
    """model name sent to the judge server"""
    judge_concurrency: int = 16
    """judge requests in flight"""
    judge_timeout: float = 120.0
    """seconds per judge request before a retry"""
    judge_retries: int = 3
    """retries of a failed judge request (with backoff)"""
    judge_max_tokens: int = 512
    """verdict length limit"""
    judge_verdict: Literal["auto", "logprobs", "generate"] = "auto"
    """how a model judge run in this process gives its verdict: logprobs (read from the next-token
    probabilities after 'Conclusion: Option ' or 'Score: ', one forward pass, no explanation) or
    generate (an explanation, then the verdict line, parsed); auto: logprobs in process, generate
    for a server"""
    judge_cache: str = "auto"
    """JSONL cache of judge replies; 'auto' = <out>/judge_cache.jsonl, '' = off"""
    judging: Literal["pairwise", "pointwise"] = "pairwise"
    """continuation: against the original continuation in both orders, or the response rated alone
    with the original as the judge's reference"""
    out: str = "runs/rlmt"
    """run directory"""
    seed: int = 0
    """random seed (data order, LoRA init, sampling)"""
    lr: float | None = None
    """AdamW learning rate; default 1e-7 hub model on CUDA (the card; the paper 1e-6), 1e-4 on a
    CPU, 3e-4 toy"""
    max_steps: int | None = None
    """optimizer steps (default 200, the card's; toy 150)"""
    batch_size: int | None = None
    """prompts per step per device (default 2, the card; 4 toy)"""
    num_generations: int = 16
    """G: samples per prompt (the card's K=16; paper 8)"""
    micro_batch_size: int = 32
    """rows per forward/backward"""
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
    max_grad_norm: float | None = None
    """gradient clipping (default 0.1, the card; 1.0 toy)"""
    missing_reward: float = 0.0
    """--boundary model: reward of a sample that never writes </think>"""
    lora_r: int | None = None
    """LoRA rank (default 64 hub model on CUDA, else 16)"""
    lora_alpha: float | None = None
    """LoRA alpha (default 2 x rank)"""
    load_in_4bit: bool | None = None
    """QLoRA NF4 base (default: hub model on CUDA)"""
    gradient_checkpointing: bool | None = None
    """default: on for a hub model on CUDA"""
    max_prompt_length: int = 1024
    """longest prompt in tokens; longer is an error"""
    toy_train_size: int = 4000
    """toy training prompts"""
    gate: str = ""
    """only run the reward gate over arms 'name=spec,...': spec '' = --model alone, a model dir /
    hub id, or adapters merged onto --model in order ('a+b')"""
    gate_prefixes: int = 64
    """held-out prompts of the gate (the card's 64)"""
    gate_after: bool = True
    """after training, gate the starting model against the trained one (summary.json 'heldout')"""
    drift_alert: float = 0.5
    """alert when the mean response length moves by more than this share: mean of the last 5 steps
    against the first 5"""
    log_completions: int = 1
    """groups per step written to samples.jsonl"""
    save_every: int = 25
    """checkpoint every N steps (for --resume)"""
    resume: bool = False
    """continue from <out>/checkpoint"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    report_to: str = ""
    """also log to wandb or trackio"""


def resolve_defaults(args: Args) -> Args:
    toy_run = args.model == "toy"
    card = {
        "lr": 1e-7,
        "lora_r": 64,
        "load_in_4bit": True,
        "gradient_checkpointing": True,
    }  # on CUDA; CPU: lighter
    toy_setup = {"lr": 3e-4, "lora_r": 16, "load_in_4bit": False, "gradient_checkpointing": False}
    setup = (
        toy_setup
        if toy_run
        else lora.hub_defaults(args.model, distributed.pick_device(args.device), card, vars(args))
    )
    vars(args).update(
        {k: v if getattr(args, k) is None else getattr(args, k) for k, v in setup.items()}
    )
    for name, hub, small in (
        ("max_steps", 200, 150),
        ("batch_size", 2, 4),
        ("thought_tokens", 48, 96),
        ("answer_tokens", 128, 32),
        ("max_grad_norm", 0.1, 1.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if toy_run else hub)
    args.lora_alpha = args.lora_alpha or 2.0 * args.lora_r
    if args.init_adapter == "auto":
        args.init_adapter = (
            ""
            if not toy_run or args.task != "chat"
            else str(toy.SFT_FORMATS_DIR if args.data == "toy-arithmetic" else toy.SFT_INSTRUCT_DIR)
        )
    if args.judge_cache == "auto":
        args.judge_cache = (
            str(Path(args.out) / "judge_cache.jsonl") if args.judge.startswith("http") else ""
        )
    if not set(args.toy_styles.split(",")) <= set(toy.STYLES):
        raise errors.ConfigError(
            f"--toy-styles {args.toy_styles}: each must be one of {', '.join(toy.STYLES)}"
        )
    if args.num_generations < 2:
        raise errors.ConfigError(
            "--num-generations must be >= 2: a group of one has no relative advantage"
        )
    for name in (
        "batch_size",
        "micro_batch_size",
        "max_steps",
        "thought_tokens",
        "answer_tokens",
        "gate_prefixes",
    ):
        if getattr(args, name) < 1:
            raise errors.ConfigError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
            )
    return args


# ---------------------------------------------------------------------------------------------
# Prompts: each row becomes {"ids", "prompt" (text the judge sees), + "reference" for continuation}
# ---------------------------------------------------------------------------------------------


def load_prompts(
    tokenizer,
    *,
    data: str,
    eval_data: str,
    task: str,
    seed: int,
    n_eval: int,
    toy_train_size: int,
    max_prompt_length: int,
    styles: str = "gsm8k,math,mc",
):
    """Training and held-out prompts. The policy's prompt ends in `<think>\\n`: the chat template's
    assistant header (chat) or the document prefix (continuation), then the opened thought."""
    if data in ("toy", "toy-arithmetic"):

        def as_chat(rows):
            return [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]

        def arithmetic(
            split, n
        ):  # levels 1-3, the three answer formats in turn (eval_reasoning's toy benchmarks)
            kinds = styles.split(",")
            per = [
                toy.arithmetic(split, -(-n // len(kinds)), seed=seed, difficulty=[1, 2, 3], style=s)
                for s in kinds
            ]
            return [r for group in zip(*per) for r in group][:n]

        if task == "continuation" and data == "toy-arithmetic":
            raise errors.ConfigError(
                "--data toy-arithmetic is a chat task: drop --task continuation"
            )
        make = (
            (lambda split, n: toy.continuations(split, n, seed=seed))
            if task == "continuation"
            else (lambda split, n: as_chat(arithmetic(split, n)))
            if data == "toy-arithmetic"
            else (lambda split, n: as_chat(toy.instructions(split, n, seed=seed)))
        )
        parts = [(data, make("train", toy_train_size)), (data, make("test", n_eval))]
    else:
        rows = [{**r, "_line": i + 1} for i, r in enumerate(dataio.load_rows(data))]
        held = (
            [{**r, "_line": i + 1} for i, r in enumerate(dataio.load_rows(eval_data, split="test"))]
            if eval_data
            else rows[-n_eval:]
        )
        if not eval_data:
            if len(rows) <= n_eval:
                raise errors.DataError(
                    f"{data}: {len(rows)} rows; need more than --gate-prefixes {n_eval} to hold "
                    f"some out (or pass --eval-data)"
                )
            rows = rows[:-n_eval]
        parts = [(data, rows), (eval_data or data, held[:n_eval])]
    chat.marker_ids(
        tokenizer, THINK_CLOSE, warn="rlmt.py"
    )  # one line on stderr when it is several tokens
    out = []
    for source, rows in parts:
        for i, r in enumerate(rows):
            if task == "continuation" and not isinstance(r.get("reference"), str):
                raise errors.DataError(
                    f"{source}:{r.get('_line', i + 1)}: field 'reference': missing or not a "
                    f"string; the continuation task judges against it"
                )
        enc = sampling.encode_prompts(rows, tokenizer, source, max_prompt_length)
        opened = tokenizer(THINK_OPEN + "\n", add_special_tokens=False)["input_ids"]
        # the judge sees the request (chat) or the document prefix (continuation), never the opened
        # thought
        out.append(
            [
                {**e, "judge_prompt": r["prompt"], "ids": e["ids"] + opened}
                for e, r in zip(enc, rows)
            ]
        )
    return out[0], out[1]


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
    closed: list[
        bool
    ]  # the policy closed its thought itself (wrote </think> or ended the thought stage)
    has_answer: list[bool]  # model boundary: a </think> was found


def _stack(
    prompts: list[list[int]],
    parts: list[list[tuple[list[int], int]]],
    finished: list[bool],
    group,
    pad: int,
    device,
) -> tuple[sampling.Rollout, torch.Tensor]:
    """Rows of (token ids, in-loss flag) pieces as one Rollout (left-padded prompts, right-padded
    completions)."""
    P = max(len(p) for p in prompts)
    seqs = [[t for ids, _ in row for t in ids] for row in parts]
    flags = [[f for ids, f in row for _ in ids] for row in parts]
    C = max(1, max(len(s) for s in seqs))
    pid = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)
    pm = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    cid = torch.tensor([s + [pad] * (C - len(s)) for s in seqs], device=device)
    cm = torch.tensor([[1] * len(s) + [0] * (C - len(s)) for s in seqs], device=device)
    lm = torch.tensor([f + [0] * (C - len(f)) for f in flags], device=device)
    roll = sampling.Rollout(pid, pm, cid, cm, torch.tensor(finished, device=device), group)
    return roll, lm


def sample_thought_then_answer(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    G: int,
    boundary: str,
    thought_tokens: int,
    answer_tokens: int,
    temperature: float,
    top_p: float,
    generator,
    batch_size: int | None = None,
) -> Samples:
    """G (thought, response) samples per prompt, rows grouped by prompt (row i*G+j is sample j of
    prompt i). `</think>` is found by its id where it is one token (Qwen3), else in the decoded text
    (SmolLM2: 3 pieces)."""
    close = chat.marker_ids(tokenizer, THINK_CLOSE)
    eos = sampling.stop_token_ids(model, tokenizer)
    ends = [tokenizer.decode([i]) for i in eos]  # where a response ends, as text
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(G)]
    kw = dict(temperature=temperature, top_p=top_p, generator=generator, batch_size=batch_size)
    if (
        boundary == "model"
    ):  # the response: the text after the first </think> (the RLMT code's training rule)
        roll = sampling.sample(
            model, tokenizer, prompts, n=G, max_new_tokens=thought_tokens + answer_tokens, **kw
        )
        toks = [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]
        cut = [chat.marker_span(tokenizer, t, THINK_CLOSE) for t in toks]
        answers = [
            _visible(tokenizer.decode(t, skip_special_tokens=False).split(THINK_CLOSE, 1)[1], ends)
            if c is not None
            else ""
            for t, c in zip(toks, cut)
        ]
        return Samples(
            roll,
            roll.completion_mask.clone(),
            answers,
            [len(t) if c is None else c[0] for t, c in zip(toks, cut)],
            [0 if c is None else len(t) - c[1] for t, c in zip(toks, cut)],
            [c is not None for c in cut],
            [c is not None for c in cut],
        )
    # Stage 1: the thought, ended by the policy (</think> or an end-of-turn token, dropped) or by
    # the budget.
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
    for ids, m, done in zip(
        stage1.completion_ids, stage1.completion_mask, stage1.finished.tolist()
    ):
        t = ids[m.bool()].tolist()
        span = (
            chat.marker_span(tokenizer, t, THINK_CLOSE)
            if done and not single and t[-1] not in eos
            else None
        )
        thoughts.append(t[: span[0]] if span else t[:-1] if done else t)
        closed.append(bool(done))

    # The boundary, inserted by us: "\n</think>\n\n" as the chat template renders it (no "\n"
    # twice).
    def boundary_ids(thought):
        text = (
            ("" if tokenizer.decode(thought[-1:]).endswith("\n") else "\n") + THINK_CLOSE + "\n\n"
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bounds = [boundary_ids(t) for t in thoughts]
    # Stage 2: the response, from prompt + thought + boundary (one sample each: the group is already
    # there).
    stage2 = sampling.sample(
        model,
        tokenizer,
        [p + t + b for p, t, b in zip(rows, thoughts, bounds)],
        n=1,
        max_new_tokens=answer_tokens,
        **kw,
    )
    answer_ids = [
        ids[m.bool()].tolist() for ids, m in zip(stage2.completion_ids, stage2.completion_mask)
    ]
    roll, loss_mask = _stack(
        rows,
        [[(t, 1), (b, 0), (a, 1)] for t, b, a in zip(thoughts, bounds, answer_ids)],
        stage2.finished.tolist(),
        torch.arange(len(prompts), device=device).repeat_interleave(G),
        pad,
        device,
    )
    answers = [_visible(tokenizer.decode(a, skip_special_tokens=False), ends) for a in answer_ids]
    return Samples(
        roll,
        loss_mask,
        answers,
        [len(t) for t in thoughts],
        [len(a) for a in answer_ids],
        closed,
        [True] * len(rows),
    )


def _visible(text: str, ends: list[str]) -> str:
    """The response as a judge should read it: up to the end of the turn (the first of `ends`, the
    stop tokens)."""
    for end in filter(None, ends):
        text = text.split(end)[0]
    return text.strip()


def artifact_rate(answers: list[str], has_answer: list[bool]) -> float:
    """Share of responses with template debris: a `<think>` / `</think>` or a role token inside the
    response, or an empty response (missing ones of --boundary model included)."""
    bad = [
        not h or not a.strip() or any(x in a for x in ARTIFACTS)
        for a, h in zip(answers, has_answer)
    ]
    return sum(bad) / max(len(bad), 1)


def judge_responses(
    judge,
    task: str,
    judging: str,
    rows: list[dict],
    answers: list[str],
    has_answer: list[bool],
    missing_reward: float,
) -> tuple[list[float], int]:
    """Rewards in [0, 1] (an invalid verdict scores 0 and is counted) and the number of invalid
    verdicts. Only the response goes to the judge."""
    ask = [i for i, h in enumerate(has_answer) if h]
    prompts = [rows[i]["judge_prompt"] for i in ask]
    if task == "chat":
        verdicts = judge.score(prompts, [answers[i] for i in ask])
    elif (
        judging == "pointwise"
    ):  # the suffix rated alone, the original continuation shown as a reference
        verdicts = judge.score(
            prompts, [answers[i] for i in ask], references=[rows[i]["reference"] for i in ask]
        )
    else:  # win 1 / tie 0.5 / loss 0 against the original continuation, asked in both orders
        refs, mine = [rows[i]["reference"] for i in ask], [answers[i] for i in ask]
        order = getattr(judge, "prefer_ordered", None) or judge.prefer
        both = order(prompts * 2, mine + refs, refs + mine)
        verdicts = []
        for first, second in zip(both[: len(ask)], both[len(ask) :]):
            if first is None or second is None:
                verdicts.append(None)
            else:
                votes = {
                    (first > 0.5) - (first < 0.5),
                    (second < 0.5) - (second > 0.5),
                }  # +1: ours better
                verdicts.append(1.0 if votes == {1} else 0.0 if votes == {-1} else 0.5)
    out = [missing_reward] * len(answers)
    for i, v in zip(ask, verdicts):
        out[i] = 0.0 if v is None else float(v)
    return out, sum(v is None for v in verdicts)


def rollout_metrics(s: Samples, r: list[float], G: int, invalid: int) -> dict:
    ans = torch.tensor(s.answer_len, dtype=torch.float32)
    rt = torch.tensor(r)
    corr = (
        float(torch.corrcoef(torch.stack([rt, ans]))[0, 1])
        if rt.std() > 0 and ans.std() > 0
        else 0.0
    )
    return {
        "reward": rt.mean().item(),
        "reward_std": rt.std().item() if len(r) > 1 else 0.0,
        **rewards.reward_gate(rt, G),
        "judge/invalid_rate": invalid / max(len(r), 1),
        "closed_think_rate": sum(s.closed) / len(s.closed),
        "missing_think_close": s.has_answer.count(False),
        "artifact_rate": artifact_rate(s.answers, s.has_answer),
        "thought_length": statistics.mean(s.thought_len),
        "answer_length": ans.mean().item(),
        "reward_length_corr": corr,
    }


# ---------------------------------------------------------------------------------------------
# 2. Update: group advantages, the clipped surrogate with k3 KL, token mean over the batch
# ---------------------------------------------------------------------------------------------


def group_advantages(r: torch.Tensor, G: int) -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + 1e-4); exactly 0 in a group of equal rewards."""
    g = r.view(-1, G)
    adv = (g - g.mean(1, keepdim=True)).masked_fill((g == g[:, :1]).all(1, keepdim=True), 0.0)
    return (adv / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)


def logprobs_no_grad(model, roll, micro_batch_size: int, temperature: float) -> torch.Tensor:
    full = torch.zeros(roll.completion_ids.shape, device=roll.completion_ids.device)
    with torch.no_grad():
        for s in range(0, full.shape[0], micro_batch_size):
            ids, attn, K = sampling.micro_batch(roll, slice(s, s + micro_batch_size))
            full[s : s + micro_batch_size, :K] = sampling.sequence_logprobs(
                model, ids, attn, K, temperature=temperature
            )
    return full


def update(
    model,
    s: Samples,
    adv: torch.Tensor,
    ref_logp,
    *,
    temperature: float,
    eps: float,
    beta: float,
    micro_batch_size: int,
    world: int,
) -> dict:
    """Backward of L over micro-batches (gradients accumulate; the optimizer step is the caller's)."""
    R = s.roll.completion_ids.shape[0]
    global_tokens = float(distributed.all_reduce_sum(s.loss_mask.sum().float().cpu()))
    sums = {"loss": 0.0, "kl": 0.0, "tokens": 0.0}
    for a in range(0, R, micro_batch_size):
        rows = slice(a, a + micro_batch_size)
        ids, attn, K = sampling.micro_batch(s.roll, rows)
        m = s.loss_mask[rows, :K].float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
            logp = sampling.sequence_logprobs(model, ids, attn, K, temperature=temperature)
        logp = torch.where(m.bool(), logp.float(), 0.0)
        ratio = torch.exp(
            logp - logp.detach()
        )  # one update per batch: old = current, rho = 1, d rho = d logp
        A = adv[rows, None]
        loss_t = -torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        kl = torch.zeros_like(logp)
        if beta > 0:
            d = torch.where(m.bool(), ref_logp[rows, :K], 0.0) - logp
            kl = torch.exp(d) - d - 1.0
            loss_t = loss_t + beta * kl
        loss = (
            (loss_t * m).sum() * world / max(global_tokens, 1.0)
        )  # x world: the all-reduce averages over ranks
        loss.backward()
        sums["loss"] += float(loss.detach())
        sums["kl"] += float((kl.detach() * m).sum())
        sums["tokens"] += float(m.sum())
    total = dict(
        zip(
            sums,
            distributed.all_reduce_sum(
                torch.tensor(list(sums.values()), dtype=torch.float64)
            ).tolist(),
        )
    )
    return {"loss": total["loss"] / world, "kl": total["kl"] / max(total["tokens"], 1.0)}


# ---------------------------------------------------------------------------------------------
# 3. The reward gate: arms on the same prompts with the same draws; per arm and per pair of arms
# ---------------------------------------------------------------------------------------------


def gate_arm(model, tokenizer, judge, heldout, a: Args, **kw) -> dict:
    """One arm's gate samples (fixed generator: every arm draws the same random numbers)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(a.seed + 12345)
    calls, bad = judge.calls, judge.invalid
    with torch.no_grad():
        s = sample_thought_then_answer(
            model,
            tokenizer,
            [h["ids"] for h in heldout],
            G=a.num_generations,
            boundary=a.boundary,
            thought_tokens=a.thought_tokens,
            answer_tokens=a.answer_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            generator=gen,
            batch_size=256,
        )
    rows = [h for h in heldout for _ in range(a.num_generations)]
    r, _ = judge_responses(
        judge, a.task, a.judging, rows, s.answers, s.has_answer, a.missing_reward
    )
    G, rt = a.num_generations, torch.tensor(r)
    gate = rewards.reward_gate(rt, G)
    return {
        "reward_mean": rt.mean().item(),
        "reward_std": rt.std().item(),
        "invalid_rate": (judge.invalid - bad) / max(judge.calls - calls, 1),
        "mixed_groups": gate["gate/mixed_groups"],
        "near_zero_groups": gate["gate/near_zero_groups"],
        "any_success_groups": gate["gate/any_success_groups"],
        "all_success_groups": gate["gate/all_one_groups"],
        "avg_total_new_tokens": statistics.mean(t + n for t, n in zip(s.thought_len, s.answer_len)),
        "avg_suffix_words": statistics.mean(len(x.split()) for x in s.answers),
        "closed_think_rate": sum(s.closed) / len(s.closed),
        "artifact_rate": artifact_rate(s.answers, s.has_answer),
        "per_prefix": rt.view(-1, G).mean(1).tolist(),
        "_samples": [
            {"prompt": rows[i]["judge_prompt"], "answer": s.answers[i], "reward": r[i]}
            for i in range(0, len(rows), G)
        ][:8],
        **kw,
    }


def compare(left: dict, right: dict, span: float = 1.0) -> dict:
    """right - left over the shared prefixes: mean reward delta with a paired 95% interval (normal,
    over prefixes, within +-span, span the rewards' range) and the shares of prefixes where the
    right arm is better, worse, even."""
    d = [b - a for a, b in zip(left["per_prefix"], right["per_prefix"])]
    mean = statistics.mean(d)
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    n = len(d)
    return {
        "mean_reward_delta": mean,
        "delta_ci": stats.bounded_interval(mean, half, -span, span),
        "right_better": sum(x > 1e-9 for x in d) / n,
        "left_better": sum(x < -1e-9 for x in d) / n,
        "tie": sum(abs(x) <= 1e-9 for x in d) / n,
        "shared_prefixes": n,
    }


def gate_report(arms: dict[str, dict], out: Path, missing_reward: float = 0.0) -> dict:
    names, span = (
        list(arms),
        max(1.0, missing_reward) - min(0.0, missing_reward),
    )  # judge rewards are in [0, 1]
    pairs = {
        f"{r}_minus_{l}": compare(arms[l], arms[r], span)
        for i, l in enumerate(names)
        for r in names[i + 1 :]
    }
    report = {
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
    dataio.atomic_write_json(out / "gate.json", report)
    print("\n" + dataio.markdown_table([{"arm": k, **v} for k, v in report["arms"].items()]))
    print(
        "\n"
        + dataio.markdown_table(
            [
                {
                    "comparison": k,
                    **{c: v for c, v in p.items() if c != "delta_ci"},
                    "95% interval": f"[{p['delta_ci'][0]:.4f}, {p['delta_ci'][1]:.4f}]",
                }
                for k, p in pairs.items()
            ]
        ),
        flush=True,
    )
    return report


def run_gate(a: Args, run) -> dict:
    arms = {}
    for item in a.gate.split(","):
        name, eq, spec = item.partition("=")
        if not eq or not name:
            raise errors.ConfigError(f"--gate {a.gate!r}: each arm is name=spec, got {item!r}")
        arms[name.strip()] = spec.strip()
    judge = make_judge(a)
    results, tokenizer = {}, None
    for name, spec in arms.items():
        model, tok_source = lora.load_arm(
            spec, a.model, run.device, a.load_in_4bit, flag="--gate arm"
        )
        tokenizer = loading.load_tokenizer(tok_source)
        _, heldout = load_prompts(
            tokenizer,
            data=a.data,
            eval_data=a.eval_data,
            task=a.task,
            seed=a.seed,
            n_eval=a.gate_prefixes,
            toy_train_size=1,
            max_prompt_length=a.max_prompt_length,
            styles=a.toy_styles,
        )
        results[name] = gate_arm(model.eval(), tokenizer, judge, heldout, a, spec=spec)
        del model
    return gate_report(results, run.out, a.missing_reward)


def make_judge(a: Args):
    # the toy judge of documents (toy.ContinuationJudge: prefer and score) for either kind of
    # continuation judging
    return judges.make_judge(
        a.judge,
        pairwise=a.task == "continuation",
        verdict=a.judge_verdict,
        model=a.judge_model or None,
        cache=a.judge_cache,
        max_tokens=a.judge_max_tokens,
        concurrency=a.judge_concurrency,
        timeout=a.judge_timeout,
        retries=a.judge_retries,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    args = resolve_defaults(args)
    run = lifecycle.start_run(args.out, args, args.seed, args.device, args.resume)
    if args.gate:
        return run_gate(args, run)
    tokenizer = loading.load_tokenizer(args.model)
    train, heldout = load_prompts(
        tokenizer,
        data=args.data,
        eval_data=args.eval_data,
        task=args.task,
        seed=args.seed,
        n_eval=args.gate_prefixes,
        toy_train_size=args.toy_train_size,
        max_prompt_length=args.max_prompt_length,
        styles=args.toy_styles,
    )
    judge = make_judge(args)
    model = loading.load_model(
        args.model,
        device=run.device,
        load_in_4bit=args.load_in_4bit,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    lora.merge_adapters(
        model, args.init_adapter
    )  # with the adapters it was trained on, oldest first
    lora.add_lora(model, r=args.lora_r, alpha=args.lora_alpha)
    params = lora.lora_parameters(model)
    distributed.broadcast_parameters(params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = lifecycle.cosine_schedule(
        optimizer, 0, args.max_steps, min_ratio=1.0
    )  # constant, as the card
    optimizer_step = lifecycle.OptimizerStep(params, optimizer, scheduler, args.max_grad_norm)
    logger = lifecycle.MetricsLogger(run.out, report_to=args.report_to or None)

    def gate_now():
        model.eval()
        with lora.disabled(model) if gate_now.start else contextlib.nullcontext():
            row = gate_arm(model, tokenizer, judge, heldout, args)
        model.train()
        return row

    gate_now.start = True
    start, data_state = lifecycle.resume_or_evaluate(
        run, args.resume, model, optimizer, scheduler, gate_now if args.gate_after else dict, logger
    )
    optimizer_step.load_state_dict(data_state)
    early, recent = data_state.get("early_lengths", []), data_state.get("recent_lengths", [])

    model.train()
    t_train, last, alerts = 0.0, {}, []
    bar = tqdm(
        range(start, args.max_steps),
        initial=start,
        total=args.max_steps,
        desc="rlmt",
        disable=not distributed.is_main(),
    )
    for step in bar:
        t0 = time.perf_counter()
        rows = [
            train[i]
            for i in dataio.epoch_indices(
                len(train), args.batch_size * run.world, step, args.seed, run.rank, run.world
            )
        ]
        gen = torch.Generator(device=run.device).manual_seed(
            args.seed * 100003 + step * run.world + run.rank
        )
        with torch.no_grad():
            s = sample_thought_then_answer(
                model,
                tokenizer,
                [r["ids"] for r in rows],
                G=args.num_generations,
                boundary=args.boundary,
                thought_tokens=args.thought_tokens,
                answer_tokens=args.answer_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                generator=gen,
            )
        grouped = [r for r in rows for _ in range(args.num_generations)]
        r, invalid = judge_responses(
            judge, args.task, args.judging, grouped, s.answers, s.has_answer, args.missing_reward
        )
        t_rollout = time.perf_counter() - t0
        adv = group_advantages(torch.tensor(r), args.num_generations).to(run.device)
        ref = None
        if args.beta > 0:
            with lora.disabled(model):
                ref = logprobs_no_grad(model, s.roll, args.micro_batch_size, args.temperature)
        stats = update(
            model,
            s,
            adv,
            ref,
            temperature=args.temperature,
            eps=args.epsilon,
            beta=args.beta,
            micro_batch_size=args.micro_batch_size,
            world=run.world,
        )
        stats.update(
            optimizer_step(stats["loss"], step + 1)
        )  # a non-finite loss skips the step (3 in a row: stop)
        t_train += time.perf_counter() - t0
        m = rollout_metrics(s, r, args.num_generations, invalid)
        early += [m["answer_length"]] if len(early) < 5 else []
        recent = (recent + [m["answer_length"]])[
            -5:
        ]  # running mean of the last 5 steps against the first 5
        m["length_drift"] = statistics.mean(recent) / max(statistics.mean(early), 1e-9) - 1.0
        # alerts are logged, never stop the run (the card): every group at 0, half the groups all at
        # 1 (nothing left to learn there), the response length drifting by more than --drift-alert
        step_alerts = [
            name
            for name, hit in (
                ("reward_collapse", m["gate/all_zero_groups"] == 1.0),
                ("all_one_groups", m["gate/all_one_groups"] >= 0.5),
                ("length_drift", abs(m["length_drift"]) > args.drift_alert),
            )
            if hit
        ]
        for name in step_alerts:
            alerts.append({"step": step + 1, "alert": name})
            tqdm.write(
                f"alert at step {step + 1}: {name} ({m['reward']:.3f} reward, drift "
                f"{m['length_drift']:+.2f})"
            )
        last = {
            **m,
            **stats,
            "alerts": step_alerts,
            "learning_rate": scheduler.get_last_lr()[0],
            "step_time": time.perf_counter() - t0,
            "timing/rollout": t_rollout,
        }
        logger.log(step + 1, last)
        for i in (
            range(min(len(grouped), args.log_completions * args.num_generations))
            if distributed.is_main()
            else []
        ):
            dataio.append_jsonl(
                run.out / "samples.jsonl",
                {
                    "split": "train",
                    "step": step + 1,
                    "prompt": grouped[i]["judge_prompt"],
                    "answer": s.answers[i],
                    "thought": tokenizer.decode(s.roll.completion_ids[i, : s.thought_len[i]]),
                    "reward": r[i],
                },
            )
        bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{stats['kl']:.3g}")
        if (
            args.save_every
            and (step + 1) % args.save_every == 0
            and step + 1 < args.max_steps
            and optimizer_step.streak == 0
        ):
            lifecycle.save_checkpoint(
                run.out,
                step + 1,
                model,
                optimizer,
                scheduler,
                data_state={
                    **data_state,
                    **optimizer_step.state_dict(),
                    "early_lengths": early,
                    "recent_lengths": recent,
                },
            )

    summary = {}
    if distributed.is_main():
        lora.save_adapter(
            model, str(run.out), base_model_name_or_path=None if args.model == "toy" else args.model
        )
        heldout_row = {}
        if args.gate_after:
            gate_now.start = False
            before = data_state["before"]
            after = lifecycle.log_eval(run, logger, args.max_steps, "after", gate_now())
            report = gate_report({"start": before, "rlmt": after}, run.out, args.missing_reward)
            c = report["comparisons"]["rlmt_minus_start"]
            heldout_row = {
                "metric": "gate_mean_reward",
                "before": before["reward_mean"],
                "after": after["reward_mean"],
                "delta_ci": c["delta_ci"],
                "note": f"{len(heldout)} held-out prompts x "
                f"{args.num_generations} samples, T={args.temperature}",
            }
        summary = lifecycle.finish_run(
            run,
            {
                "method": "rlmt",
                "task": args.task,
                "boundary": args.boundary,
                "init_adapter": args.init_adapter or None,
                "heldout": heldout_row,
                "final": last,
                "alerts": alerts,
                "train_seconds": t_train,
                "skipped_steps": optimizer_step.skipped,
                "judge_calls": judge.calls,
                "judge_invalid": judge.invalid,
                "args": asdict(args),
            },
            table={
                "task": args.task,
                "boundary": args.boundary,
                "gate before": heldout_row.get("before"),
                "gate after": heldout_row.get("after"),
                "train s": round(t_train),
            },
        )
    logger.close()
    distributed.cleanup_distributed()
    return summary


if __name__ == "__main__":
    cli.run_cli(main, Args)
