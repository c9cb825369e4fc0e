"""GKD: generalized knowledge distillation, on-policy (Agarwal et al., ICLR 2024, arXiv 2306.13649).

A frozen teacher pi_T and a student pi_S that share a tokenizer. On every completion token the
student's next-token distribution Q is pulled towards the teacher's P, on a mix of sequences from
the data and sequences the student writes itself (the student learns where its own mistakes take it:
no train/test mismatch):

    L(theta) = (1 - lambda) E_{(x, y) ~ data}[ D(x, y) ] + lambda E_{x ~ data, y ~ pi_S(.|x)}[ D(x, y) ]
    D(x, y)  = 1/|y| sum_t JSD_beta( pi_T(.|x, y_<t) || pi_S(.|x, y_<t) )                  (paper, eq. 2 and 4)
    JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

beta 0 is the forward KL(P || Q) and beta 1 the reverse KL(Q || P), exactly (as TRL's GKD trainer
special-cases them). No gradient flows through the student's sampling. A step holds --batch-size
prompts, a lambda share of which the student answers (stochastically rounded, seeded: the mixture is
exact in expectation, not a coin per batch); every row counts with the mean of D over its tokens,
rows with equal weight.

- `--seq-kd`: the data targets y are written by the teacher instead (sequence-level KD, Kim and Rush
  2016,
  arXiv 1606.07947); `--seq-kd --loss sft --lmbda 0` is plain SFT on the teacher's outputs.
- `--loss reverse-kl-pg`: on-policy distillation as policy gradient (the Thinking Machines
  "On-Policy
  Distillation" post, tinker-cookbook): the student samples, each sampled token gets the advantage
  A_t = -(log pi_S(y_t) - log pi_T(y_t)) (a per-token reward, discount 0) and the loss is -A_t log pi_S(y_t).
- `--temperature` is the sampling temperature, `--loss-temperature` the one both softmaxes take in
  the loss.
  Both are 1.0 by default (as in TRL's newer distillation trainer and tinker-cookbook); TRL's GKD trainer samples
  at 0.9 and computes the loss at 1.0 (`--temperature 0.9` does the same here); a warning says when they differ.

Both models' final hidden states go through `vocab_kernels.linear_generalized_jsd`, which never
holds [N, V] logits of either model. Heads are cut to the tokenizer's rows: Qwen3 checkpoints differ
in embedding rows (151,936 vs 152,064) while sharing one tokenizer of 151,669 tokens, and a row past
the tokenizer must get probability 0 (-inf logit), not a padded 0 logit.

Run:
    python gkd.py                       # toy: teacher = toy base + toy/sft_think, student = toy/student
    python gkd.py --lmbda 0             # supervised KD on the data; --lmbda 1: fully on-policy
    python gkd.py --seq-kd --lmbda 0 --loss sft        # SFT on the teacher's outputs
    python gkd.py --loss reverse-kl-pg  # on-policy distillation with the reverse KL as a per-token reward
    python gkd.py --model Qwen/Qwen3-0.6B-Base --teacher Qwen/Qwen3-4B --data chats.jsonl   # one GPU, LoRA r=128
    torchrun --nproc_per_node 4 gkd.py --model Qwen/Qwen3-1.7B-Base --teacher Qwen/Qwen3-4B --data chats.jsonl
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm import tqdm

import cli
import dataio
import distributed
import errors
import lifecycle
import loading
import lora
import rewards
import sampling
import toy
from vocab_kernels import linear_generalized_jsd, linear_token_logprobs


@dataclass
class Args:
    model: str = "toy"
    """the student: hub id or local dir; 'toy' = toy/student"""
    teacher: str = "auto"
    """the teacher: hub id or local dir ('auto' = the toy base for the toy student; required
    otherwise)"""
    teacher_adapter: str = "auto"
    """PEFT adapter dir(s), joined by '+', merged into the teacher; 'auto' = toy/sft_think for the
    toy teacher, none otherwise"""
    init_adapter: str = ""
    """PEFT adapter dir(s), joined by '+', merged into the student before its fresh LoRA (an SFT'd
    student)"""
    data: str = "toy"
    """JSONL: {'messages': [...]} (the last turn, the assistant's, is the target), {'prompt',
    'completion'?}, optional 'answer' for accuracy; 'toy' = toy arithmetic with its scratchpads"""
    eval_data: str = ""
    """held-out JSONL of the same schema (default: toy test split, or the last --eval-size rows of
    --data)"""
    out: str = "runs/gkd"
    """run directory"""
    seed: int = 0
    """random seed (data order, on-policy rows, sampling)"""
    loss: Literal["jsd", "sft", "reverse-kl-pg"] = "jsd"
    """jsd: generalized JSD (GKD); sft: cross-entropy on the targets; reverse-kl-pg: on-policy
    distillation, reverse KL as a per-token reward (every row on-policy)"""
    beta: float = 0.5
    """JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher) (TRL's
    default 0.5)"""
    lmbda: float = 0.5
    """share of rows the student writes itself (on-policy); TRL's default 0.5"""
    seq_kd: bool = False
    """off-policy rows use teacher-written targets instead of the data's"""
    temperature: float = 1.0
    """sampling temperature of the student (and the teacher with --seq-kd); TRL's GKD trainer: 0.9
    """
    loss_temperature: float = 1.0
    """softmax temperature of both models in the loss"""
    top_p: float = 1.0
    """nucleus sampling"""
    max_new_tokens: int = 160
    """longest sampled completion (also for evaluation)"""
    max_prompt_length: int = 1024
    """longest prompt in tokens; longer is an error"""
    max_length: int = 2048
    """longest data target in tokens; longer is an error"""
    lr: float | None = None
    """peak learning rate (AdamW); default 1.5e-3 toy (full), 1e-4 hub model (LoRA, as
    tinker-cookbook; also on a CPU)"""
    warmup_ratio: float = 0.05
    """share of steps with linear warmup"""
    min_lr_ratio: float = 0.1
    """after warmup, cosine decay to this share of the peak"""
    max_steps: int = 1400
    """optimizer steps"""
    batch_size: int = 16
    """prompts per optimizer step per device"""
    micro_batch_size: int = 16
    """rows per forward/backward (gradients accumulate)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 = off)"""
    full: bool | None = None
    """full fine-tuning of the student instead of LoRA (default: on for the toy, off for a hub
    model)"""
    lora_r: int | None = None
    """LoRA rank (default 128, tinker-cookbook's distillation recipe; 16 for a hub model on a CPU)
    """
    lora_alpha: float | None = None
    """LoRA alpha (default 2 x rank)"""
    lora_dropout: float = 0.0
    """dropout on the LoRA input"""
    load_in_4bit: bool = False
    """QLoRA: the student's base in NF4"""
    teacher_load_in_4bit: bool = False
    """the frozen teacher in NF4 (else bf16 on CUDA, fp32 on CPU)"""
    gradient_checkpointing: bool = False
    """recompute the student's activations"""
    toy_difficulty: str = "1,2,3"
    """toy arithmetic level(s), comma-separated, for training and held-out accuracy"""
    toy_train_size: int = 4000
    """toy training prompts"""
    eval_size: int = 200
    """held-out prompts"""
    eval_every: int = 0
    """evaluate every N steps (0 = before and after only)"""
    log_completions: int = 2
    """on-policy rows per step written to samples.jsonl"""
    save_every: int = 100
    """checkpoint every N steps (for --resume)"""
    resume: bool = False
    """continue from <out>/checkpoint"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    report_to: str = ""
    """also log to wandb or trackio"""


def resolve_defaults(args: Args) -> Args:
    toy_student = args.model == "toy"
    if args.teacher == "auto":
        if not toy_student:
            raise errors.ConfigError(
                "--teacher: required with a --model other than 'toy' (a larger model with the "
                "same tokenizer, e.g. --teacher Qwen/Qwen3-4B)"
            )
        args.teacher = "toy"
    if args.teacher_adapter == "auto":
        args.teacher_adapter = str(toy.SFT_ADAPTER_DIR) if args.teacher == "toy" else ""
    if args.full is None:
        args.full = toy_student
    if not toy_student:  # the recipe's LoRA on CUDA, a smaller rank on a CPU (lora.hub_defaults)
        card = {"lr": 1e-4, "lora_r": 128}
        vars(args).update(
            lora.hub_defaults(args.model, distributed.pick_device(args.device), card, vars(args))
        )
    if args.lr is None:
        args.lr = 1.5e-3
    if args.lora_r is None:
        args.lora_r = 128
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_r
    if not 0.0 <= args.beta <= 1.0:
        raise errors.ConfigError(
            f"--beta {args.beta}: must lie in [0, 1] (0 forward KL, 1 reverse KL)"
        )
    if not 0.0 <= args.lmbda <= 1.0:
        raise errors.ConfigError(f"--lmbda {args.lmbda}: the on-policy share must lie in [0, 1]")
    if args.loss == "reverse-kl-pg" and (args.lmbda != 1.0 or args.seq_kd):
        if args.lmbda != Args.lmbda or args.seq_kd:
            raise errors.ConfigError(
                "--loss reverse-kl-pg trains on the student's own samples only: drop --lmbda "
                "and --seq-kd"
            )
        args.lmbda = 1.0
    for name in ("temperature", "loss_temperature"):
        if getattr(args, name) <= 0:
            raise errors.ConfigError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0"
            )
    for name in ("batch_size", "micro_batch_size", "max_steps", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise errors.ConfigError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
            )
    samples = args.lmbda > 0 or args.seq_kd
    if samples and args.temperature != args.loss_temperature:
        warnings.warn(
            f"gkd: sampling at --temperature {args.temperature} but the loss compares the models "
            "at "
            f"--loss-temperature {args.loss_temperature} (as TRL's GKD trainer does); pass both "
            "equal to "
            f"distill the distribution you sample from",
            UserWarning,
            stacklevel=2,
        )
    return args


# ---------------------------------------------------------------------------------------------
# Data: each row becomes {"ids": prompt ids, "target": completion ids or None, "prompt": text, +
# columns}
# ---------------------------------------------------------------------------------------------


def split_conversation(row: dict, tokenizer, where: str) -> tuple[list | str, str | None]:
    """(prompt, target text) of a row: {'messages'} = the turns before the last (an assistant turn)
    and that turn as the chat template renders it after the generation prompt (thought included);
    {'prompt', 'completion'?}."""
    if "messages" in row:
        msgs = row["messages"]
        if (
            not isinstance(msgs, list)
            or len(msgs) < 2
            or not isinstance(msgs[-1], dict)
            or msgs[-1].get("role") != "assistant"
        ):
            raise errors.DataError(
                f"{where}: field 'messages': expected a list ending with an assistant turn"
            )
        prompt_text = sampling.render_prompt(msgs[:-1], tokenizer)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt_text):
            raise errors.DataError(
                f"{where}: field 'messages': the chat template renders the conversation with a "
                f"different start than its prompt; pass {{'prompt', 'completion'}} rows instead"
            )
        eos = tokenizer.eos_token or ""
        target = full[len(prompt_text) :]
        target = (
            target[: target.rindex(eos) + len(eos)] if eos and eos in target else target.rstrip()
        )
        return msgs[:-1], target
    if "prompt" not in row:
        raise errors.DataError(
            f"{where}: expected 'messages' or 'prompt' (present: "
            f"{', '.join(sorted(row)) or 'none'})"
        )
    completion = row.get("completion")
    if completion is not None and not isinstance(completion, str):
        raise errors.DataError(
            f"{where}: field 'completion': expected str, got {type(completion).__name__}"
        )
    if (
        completion is not None
        and tokenizer.eos_token
        and not completion.endswith(tokenizer.eos_token)
    ):
        completion += tokenizer.eos_token  # the student learns to stop where the target stops
    return row["prompt"], completion


def encode_examples(
    rows: list[dict], tokenizer, source: str, max_prompt_length: int, max_length: int
) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        prompt, target = split_conversation(row, tokenizer, where)
        enc = sampling.encode_prompts(
            [{**row, "prompt": prompt, "_line": row.get("_line", i + 1)}],
            tokenizer,
            source,
            max_prompt_length,
        )[0]
        ids = (
            tokenizer(target, add_special_tokens=False)["input_ids"] if target is not None else None
        )
        if ids is not None and not 1 <= len(ids) <= max_length:
            raise errors.DataError(
                f"{where}: target: {len(ids)} tokens (allowed 1..{max_length}, --max-length)"
            )
        enc.pop("messages", None)
        out.append({**enc, "target": ids})
    return out


def load_examples(
    tokenizer,
    *,
    data: str,
    eval_data: str,
    seed: int,
    eval_size: int,
    toy_difficulty: str,
    toy_train_size: int,
    max_prompt_length: int,
    max_length: int,
):
    if data == "toy":
        levels = toy.parse_levels(toy_difficulty)
        parts = [
            ("toy", toy.arithmetic("train", toy_train_size, seed=seed, difficulty=levels)),
            ("toy", toy.arithmetic("test", eval_size, seed=seed, difficulty=levels)),
        ]
        parts = [
            (
                s,
                [
                    {"messages": r["messages"], "answer": r["answer"], "style": r["style"]}
                    for r in rows
                ],
            )
            for s, rows in parts
        ]
    else:
        parts = dataio.train_and_heldout(data, eval_data, eval_size)
    return [encode_examples(r, tokenizer, s, max_prompt_length, max_length) for s, r in parts]


def shared_vocab(tokenizer, teacher_tokenizer, student, teacher) -> int:
    """How many LM-head rows are tokens: len(tokenizer), after checking that teacher and student
    share it and both heads have that many rows. Rows past it (checkpoint padding) are cut from the
    heads in the loss, which is the same as giving them a -inf logit."""
    n = len(tokenizer)
    if teacher_tokenizer is not None and len(teacher_tokenizer) != n:
        raise errors.ConfigError(
            f"--teacher: its tokenizer has {len(teacher_tokenizer)} tokens, the student's {n}: "
            f"GKD compares next-token distributions, so both need one tokenizer"
        )
    if teacher_tokenizer is not None:
        mine, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if mine != theirs:
            tok = next(t for t in mine if theirs.get(t) != mine[t])
            raise errors.ConfigError(
                f"--teacher: the tokenizers differ (token {tok!r} is id {mine[tok]} for the "
                f"student, {theirs.get(tok)} for the teacher): GKD needs one tokenizer"
            )
    for name, m in (("--model", student), ("--teacher", teacher)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise errors.ConfigError(
                f"{name}: its LM head has {rows} rows but the tokenizer {n} tokens"
            )
    return n


def as_rollout(
    prompt_ids: list[list[int]], targets: list[list[int]], pad_id: int, device
) -> sampling.Rollout:
    """Prompts with given completions in the sampler's layout (left-padded prompts, right-padded
    completions)."""
    P, C = max(map(len, prompt_ids)), max(map(len, targets))
    t = lambda rows, w, left, v: torch.tensor(
        [
            ([v] * (w - len(r)) + r) if left else (r + [v] * (w - len(r)))  # noqa
            for r in rows
        ],
        dtype=torch.long,
        device=device,
    )
    return sampling.Rollout(
        prompt_ids=t(prompt_ids, P, True, pad_id),
        prompt_mask=t([[1] * len(r) for r in prompt_ids], P, True, 0),
        completion_ids=t(targets, C, False, pad_id),
        completion_mask=t([[1] * len(r) for r in targets], C, False, 0),
        finished=torch.ones(len(targets), dtype=torch.bool, device=device),
        group=torch.arange(len(targets), device=device),
    )


# ---------------------------------------------------------------------------------------------
# The loss: per-token divergence from both models' hidden states, per-row mean, rows averaged
# ---------------------------------------------------------------------------------------------


def token_losses(
    student,
    teacher,
    roll: sampling.Rollout,
    rows,
    vocab: int,
    *,
    loss: str,
    beta: float,
    temperature: float,
    chunk_size: int | None = None,
):
    """Per completion token of some rollout rows: (the loss term, the divergence to log, row index),
    flat [N].

    jsd: generalized JSD_beta(P_T || Q_S) at `temperature`; sft: -log Q_S(y_t); reverse-kl-pg: -A_t
    log Q_S(y_t) with A_t = -(log Q_S(y_t) - log P_T(y_t)) detached (the logged divergence is that
    sample's log-ratio, an
    unbiased estimate of the reverse KL). The heads are cut to `vocab` rows; no [N, V] logits are ever held."""
    ids, attn, K = sampling.micro_batch(roll, rows)
    m = roll.completion_mask[rows, :K].bool()
    targets = ids[:, -K:][m]
    with torch.no_grad():
        h_t, head_t = sampling.completion_hidden(teacher, ids, attn, K)
        h_t = h_t[m]
    h_s, head_s = sampling.completion_hidden(student, ids, attn, K)
    h_s, w_s, w_t = h_s[m], head_s.weight[:vocab], head_t.weight[:vocab]
    row = torch.arange(m.shape[0], device=m.device)[:, None].expand_as(m)[m]
    if loss == "jsd":
        d = linear_generalized_jsd(
            h_s, w_s, h_t, w_t, beta=beta, temperature=temperature, chunk_size=chunk_size
        )
        return d, d.detach(), row
    logp_s = linear_token_logprobs(
        h_s, w_s, targets, temperature=temperature, chunk_size=chunk_size
    )
    if loss == "sft":
        return -logp_s, -logp_s.detach(), row
    with torch.no_grad():
        logp_t = linear_token_logprobs(
            h_t, w_t, targets, temperature=temperature, chunk_size=chunk_size
        )
    log_ratio = logp_s.detach() - logp_t
    return log_ratio * logp_s, log_ratio, row  # -A_t log Q_S(y_t) with A_t = -log_ratio


def per_row_mean(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows]: the mean of `values` over each row's tokens (D averaged over the sequence)."""
    sums = torch.zeros(n_rows, device=values.device, dtype=values.dtype).index_add(0, row, values)
    counts = torch.zeros(n_rows, device=values.device).index_add(0, row, torch.ones_like(values))
    return sums / counts.clamp(min=1.0)


def on_policy_rows(batch_size: int, lmbda: float, step: int, seed: int) -> int:
    """How many of the step's rows the student writes: lambda x batch, stochastically rounded with a
    seeded draw (exact in expectation, the same on a resumed run)."""
    whole, frac = divmod(lmbda * batch_size, 1.0)
    draw = torch.rand((), generator=torch.Generator().manual_seed(seed * 7919 + step)).item()
    return int(whole) + int(draw < frac)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation: greedy accuracy and per-token divergences
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def divergences(
    student, teacher, roll: sampling.Rollout, vocab: int, temperature: float, micro_batch_size: int
):
    """Mean per-token forward KL(P||Q), reverse KL(Q||P) and JSD_0.5 between teacher P and student Q
    on a rollout's completion tokens."""
    sums, n = {"fkl": 0.0, "rkl": 0.0, "jsd": 0.0}, 0
    for s in range(0, roll.completion_ids.shape[0], micro_batch_size):
        rows = slice(s, s + micro_batch_size)
        for key, beta in (("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.5)):
            d, _, _ = token_losses(
                student, teacher, roll, rows, vocab, loss="jsd", beta=beta, temperature=temperature
            )
            sums[key] += float(d.sum())
        n += int(roll.completion_mask[rows].sum())
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    heldout: list[dict],
    *,
    teacher=None,
    vocab: int | None = None,
    max_new_tokens: int,
    temperature: float,
    micro_batch_size: int,
) -> dict:
    """Greedy completions of the held-out prompts: accuracy (rows with an 'answer'), mean length;
    with a teacher, the per-token divergences on the data targets (`data/...`) and on these greedy
    completions (`own/...`)."""
    was_training = model.training
    model.eval()
    roll = sampling.sample(
        model,
        tokenizer,
        [p["ids"] for p in heldout],
        n=1,
        max_new_tokens=max_new_tokens,
        greedy=True,
        batch_size=128,
    )
    texts = roll.texts(tokenizer)
    row = {
        "mean_length": float(roll.completion_mask.sum(1).float().mean()),
        "clipped_ratio": float((~roll.finished).float().mean()),
    }
    cols = rewards.reward_columns(heldout, 1)
    if "answer" in cols:
        graded = [
            v for v in rewards.correct(texts, cols["answer"], cols.get("style")) if v is not None
        ]
        if graded:
            row["accuracy"] = sum(graded) / len(graded)
    if teacher is not None:
        with_target = [p for p in heldout if p["target"] is not None]
        if with_target:
            data = as_rollout(
                [p["ids"] for p in with_target],
                [p["target"] for p in with_target],
                tokenizer.pad_token_id,
                roll.prompt_ids.device,
            )
            row.update(
                {
                    f"data/{k}": v
                    for k, v in divergences(
                        model, teacher, data, vocab, temperature, micro_batch_size
                    ).items()
                }
            )
        row.update(
            {
                f"own/{k}": v
                for k, v in divergences(
                    model, teacher, roll, vocab, temperature, micro_batch_size
                ).items()
            }
        )
    row["_samples"] = [
        {"prompt": p["prompt"], "completion": t} for p, t in zip(heldout[:10], texts[:10])
    ]
    model.train(was_training)
    return row


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def load_student(
    name: str,
    device,
    full: bool,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    load_in_4bit: bool,
    gradient_checkpointing: bool,
    init_adapter: str = "",
):
    model = loading.load_model(
        toy.student_model_dir() if name == "toy" else name,
        device=device,
        load_in_4bit=load_in_4bit,
        gradient_checkpointing=gradient_checkpointing,
    )
    lora.merge_adapters(model, init_adapter)  # with the adapters it was trained on, oldest first
    if full:
        if load_in_4bit:
            raise errors.ConfigError(
                "--full cannot train 4-bit weights; use LoRA (drop --full) with --load-in-4bit"
            )
        return model, [p for p in model.parameters() if p.requires_grad]
    lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    return model, lora.lora_parameters(model)


def load_teacher(name: str, adapters: str, device, load_in_4bit: bool):
    """The frozen teacher: `name` with each adapter of `adapters` ('a+b') merged in, in eval mode,
    no gradients."""
    for a in (p for p in adapters.split("+") if p):
        lora.require_adapter(
            a, "--teacher-adapter", "Pass the directory `sft_think.py --out` wrote."
        )
    model, _ = lora.load_arm(
        adapters,
        str(toy.base_model_dir()) if name == "toy" else name,
        device=device,
        load_in_4bit=load_in_4bit,
        flag="--teacher-adapter",
    )
    return model.eval().requires_grad_(False)


def main(args: Args):
    args = resolve_defaults(args)
    run = lifecycle.start_run(args.out, args, args.seed, args.device, args.resume)
    tokenizer = loading.load_tokenizer(args.model)
    teacher_tokenizer = loading.load_tokenizer(args.teacher) if args.teacher != args.model else None
    train, heldout = load_examples(
        tokenizer,
        data=args.data,
        eval_data=args.eval_data,
        seed=args.seed,
        eval_size=args.eval_size,
        toy_difficulty=args.toy_difficulty,
        toy_train_size=args.toy_train_size,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
    )
    if args.lmbda < 1 and not args.seq_kd and args.loss != "reverse-kl-pg":
        missing = next((i for i, r in enumerate(train) if r["target"] is None), None)
        if missing is not None:
            raise errors.DataError(
                f"{args.data}:{missing + 1}: no target (field 'completion' or an assistant turn), "
                f"which --lmbda {args.lmbda} < 1 trains on; pass --lmbda 1 or --seq-kd"
            )
    teacher = load_teacher(
        args.teacher, args.teacher_adapter, run.device, args.teacher_load_in_4bit
    )
    student, params = load_student(
        args.model,
        run.device,
        args.full,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        args.load_in_4bit,
        args.gradient_checkpointing,
        args.init_adapter,
    )
    vocab = shared_vocab(tokenizer, teacher_tokenizer, student, teacher)
    pad_id = tokenizer.pad_token_id
    distributed.broadcast_parameters(params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = lifecycle.cosine_schedule(
        optimizer,
        int(args.warmup_ratio * args.max_steps),
        args.max_steps,
        min_ratio=args.min_lr_ratio,
    )
    optimizer_step = lifecycle.OptimizerStep(params, optimizer, scheduler, args.max_grad_norm)
    logger = lifecycle.MetricsLogger(run.out, report_to=args.report_to or None)
    heldout_eval = lambda model, t=teacher: evaluate(  # noqa: E731
        model,
        tokenizer,
        heldout,
        teacher=t,
        vocab=vocab,
        max_new_tokens=args.max_new_tokens,
        temperature=args.loss_temperature,
        micro_batch_size=args.micro_batch_size,
    )
    start, data_state = lifecycle.resume_or_evaluate(
        run, args.resume, student, optimizer, scheduler, lambda: heldout_eval(student), logger
    )
    optimizer_step.load_state_dict(data_state)
    if (
        distributed.is_main() and "teacher" not in data_state
    ):  # measured once; a resumed run reads it back
        data_state["teacher"] = {
            k: v for k, v in heldout_eval(teacher, None).items() if k != "_samples"
        }
    tokens_seen = data_state.get("tokens_seen", 0)

    student.train()
    t_train, last = 0.0, {}
    bar = tqdm(
        range(start, args.max_steps),
        initial=start,
        total=args.max_steps,
        desc="gkd",
        disable=not distributed.is_main(),
    )
    for step in bar:
        t0 = time.perf_counter()
        batch = [
            train[i]
            for i in dataio.epoch_indices(
                len(train), args.batch_size * run.world, step, args.seed, run.rank, run.world
            )
        ]
        gen = torch.Generator(device=run.device).manual_seed(
            args.seed * 100003 + step * run.world + run.rank
        )
        # 1. Targets. The first n_on rows: the student writes them (on-policy); the rest: the
        #    data's, or the teacher's with --seq-kd. Sampling runs without gradients (none flows
        #    through it).
        n_on = on_policy_rows(len(batch), args.lmbda, step, args.seed + run.rank)
        parts = []
        if n_on:
            parts.append(
                (
                    "policy",
                    sampling.sample(
                        student,
                        tokenizer,
                        [b["ids"] for b in batch[:n_on]],
                        n=1,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature,
                        top_p=args.top_p,
                        generator=gen,
                    ),
                )
            )
        if n_on < len(batch):
            off = batch[n_on:]
            parts.append(
                (
                    "teacher" if args.seq_kd else "data",
                    sampling.sample(
                        teacher,
                        tokenizer,
                        [b["ids"] for b in off],
                        n=1,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature,
                        top_p=args.top_p,
                        generator=gen,
                    )
                    if args.seq_kd
                    else as_rollout(
                        [b["ids"] for b in off], [b["target"] for b in off], pad_id, run.device
                    ),
                )
            )
        t_sample = time.perf_counter() - t0

        # 2. Loss: every row counts with the mean of its per-token terms, the batch's rows averaged;
        #    the gradient accumulates over micro-batches (the optimizer step is OptimizerStep's).
        loss_total, sums, n_tok = 0.0, {}, 0
        for name, roll in parts:
            R = roll.completion_ids.shape[0]
            for s in range(0, R, args.micro_batch_size):
                rows = slice(s, s + args.micro_batch_size)
                with torch.autocast(
                    "cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda"
                ):
                    term, div, row = token_losses(
                        student,
                        teacher,
                        roll,
                        rows,
                        vocab,
                        loss=args.loss,
                        beta=args.beta,
                        temperature=args.loss_temperature,
                    )
                n_rows = roll.completion_ids[rows].shape[0]
                per_row = per_row_mean(term.float(), row, n_rows)
                (per_row.sum() / len(batch)).backward()
                per_row = (
                    per_row.detach()
                )  # logged only from here: a float() of a tensor that needs grad warns
                loss_total += float(per_row.sum()) / len(batch)
                for key, v in (
                    (f"loss/{name}", per_row.sum()),
                    (f"divergence/{name}", per_row_mean(div.float(), row, n_rows).sum()),
                ):
                    sums[key] = sums.get(key, 0.0) + float(v) / R  # means over the part's rows
                n_tok += int(row.numel())
        stats = optimizer_step(loss_total, step + 1)
        t_train += time.perf_counter() - t0
        tokens_seen += sum(int(r.attention_mask.sum()) for _, r in parts) * run.world

        # 3. Log, evaluate, checkpoint.
        last = {
            "loss": loss_total,
            **sums,
            **stats,
            "on_policy_rows": n_on,
            "completion_tokens": n_tok,
            "learning_rate": scheduler.get_last_lr()[0],
            "num_tokens": tokens_seen,
            "step_time": time.perf_counter() - t0,
            "timing/sample": t_sample,
        }
        if n_on:
            roll = parts[0][1]
            texts = roll.texts(tokenizer)
            cols = rewards.reward_columns(batch[:n_on], 1)
            if "answer" in cols:
                graded = [
                    v
                    for v in rewards.correct(texts, cols["answer"], cols.get("style"))
                    if v is not None
                ]
                last["policy/accuracy"] = sum(graded) / max(len(graded), 1)
            last["completions/mean_length"] = float(roll.completion_mask.sum(1).float().mean())
            last["completions/clipped_ratio"] = float((~roll.finished).float().mean())
            for b, t in (
                list(zip(batch, texts))[: args.log_completions] if distributed.is_main() else []
            ):
                dataio.append_jsonl(
                    run.out / "samples.jsonl",
                    {"split": "train", "step": step + 1, "prompt": b["prompt"], "completion": t},
                )
        if (
            args.eval_every
            and (step + 1) % args.eval_every == 0
            and step + 1 < args.max_steps
            and distributed.is_main()
        ):
            last.update(
                {f"eval/{k}": v for k, v in heldout_eval(student).items() if k != "_samples"}
            )
        logger.log(step + 1, last)
        bar.set_postfix(
            loss=f"{loss_total:.4f}",
            **({"acc": f"{last['eval/accuracy']:.3f}"} if "eval/accuracy" in last else {}),
        )
        if (
            args.save_every
            and (step + 1) % args.save_every == 0
            and step + 1 < args.max_steps
            and optimizer_step.streak == 0
        ):
            lifecycle.save_checkpoint(
                run.out,
                step + 1,
                student,
                optimizer,
                scheduler,
                data_state={
                    **data_state,
                    **optimizer_step.state_dict(),
                    "tokens_seen": tokens_seen,
                },
            )

    rank_diff = distributed.max_param_difference_across_ranks(params)
    summary = {}
    if distributed.is_main():
        before = data_state["before"]
        after = lifecycle.log_eval(run, logger, args.max_steps, "after", heldout_eval(student))
        if args.full:
            student.save_pretrained(run.out / "model")
            tokenizer.save_pretrained(run.out / "model")
        else:
            lora.save_adapter(
                student,
                str(run.out),
                base_model_name_or_path=None if args.model == "toy" else args.model,
            )
        teach = data_state["teacher"]
        metric = (
            "accuracy" if "accuracy" in after else "data/jsd" if "data/jsd" in after else "own/rkl"
        )
        gap = teach.get(metric, math.nan) - before.get(metric, math.nan)
        closed = (
            (after[metric] - before[metric]) / gap if metric == "accuracy" and gap > 0 else None
        )
        note = "greedy" + (f", toy level(s) {args.toy_difficulty}" if args.data == "toy" else "")
        variant = (
            ("seq-KD " if args.seq_kd else "")
            + args.loss
            + (f" lambda {args.lmbda:g}" if args.loss != "reverse-kl-pg" else "")
        )
        summary = lifecycle.finish_run(
            run,
            {
                "method": "gkd",
                "variant": variant,
                "loss": args.loss,
                "lmbda": args.lmbda,
                "beta": args.beta,
                "seq_kd": args.seq_kd,
                "heldout": {
                    "metric": metric,
                    "before": before.get(metric),
                    "after": after.get(metric),
                    "teacher": teach.get(metric),
                    "gap_closed": closed,
                    "note": note,
                },
                "before": before,
                "after": after,
                "teacher": teach,
                "final": last,
                "train_seconds": t_train,
                "num_tokens": tokens_seen,
                "skipped_steps": optimizer_step.skipped,
                "rank_param_max_diff": rank_diff,
                "args": asdict(args),
            },
            table={
                "variant": variant,
                "metric": metric,
                "student before": before.get(metric),
                "student after": after.get(metric),
                "teacher": teach.get(metric),
                "gap closed": closed,
                "held-out JSD before": before.get("data/jsd"),
                "after": after.get("data/jsd"),
                "train s": round(t_train),
            },
        )
    logger.close()
    distributed.cleanup_distributed()
    return summary


if __name__ == "__main__":
    cli.run_cli(main, Args)
