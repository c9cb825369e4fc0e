"""GKD: generalized knowledge distillation, on-policy (Agarwal et al., "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", ICLR 2024, arXiv 2306.13649).

A frozen teacher pi_T and a student pi_S that share a tokenizer. On every completion token the
student's next-token distribution Q is pulled towards the teacher's P, on a mix of sequences from
the data and sequences the student writes itself (the student learns where its own mistakes take
it: no train/test mismatch):

    L(theta) = (1 - lambda) E_{(x,y) ~ data}[D(x, y)] + lambda E_{x ~ data, y ~ pi_S(.|x)}[D(x, y)]
    D(x, y)  = 1/|y| sum_t JSD_beta(pi_T(.|x, y_<t) || pi_S(.|x, y_<t))         (paper, eq. 2 and 4)
    JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

beta 0 is the forward KL(P || Q) and beta 1 the reverse KL(Q || P), exactly (as TRL's GKD trainer
special-cases them). No gradient flows through the student's sampling. A step holds --batch-size
prompts, a lambda share of which the student answers (stochastically rounded, seeded: the mixture
is exact in expectation, not a coin per batch); every row counts with the mean of D over its
tokens, rows with equal weight.

- `--seq-kd`: the data targets y are written by the teacher instead (sequence-level KD, Kim and
  Rush 2016, arXiv 1606.07947); `--seq-kd --loss sft --lmbda 0` is plain SFT on the teacher's
  outputs.
- `--loss reverse-kl-pg`: on-policy distillation as policy gradient (the Thinking Machines
  "On-Policy Distillation" post, tinker-cookbook): the student samples, each sampled token gets the
  advantage A_t = -(log pi_S(y_t) - log pi_T(y_t)) (a per-token reward, discount 0) and the loss is
  -A_t log pi_S(y_t).
- `--temperature` is the sampling temperature, `--loss-temperature` the one both softmaxes take in
  the loss. Both are 1.0 by default (as in TRL's newer distillation trainer and tinker-cookbook);
  TRL's GKD trainer samples at 0.9 and computes the loss at 1.0 (`--temperature 0.9` does the same
  here); a warning says when they differ.

`generalized_jsd` below is JSD_beta on full logits, as the paper writes it. Training computes the
same numbers with `vocab_kernels.linear_generalized_jsd` from both models' final hidden states,
which never holds [N, V] logits of either model (tests/test_gkd.py checks one against the other).
Heads are cut to the tokenizer's rows: Qwen3 checkpoints differ in embedding rows (151,936 vs
152,064) while sharing one tokenizer of 151,669 tokens, and a row past the tokenizer must get
probability 0 (-inf logit), not a padded 0 logit.

Run:
    python gkd.py                       # toy: teacher toy base + toy/sft_think, student toy/student
    python gkd.py --loss reverse-kl-pg  # on-policy distillation, reverse KL as a per-token reward
    python gkd.py --model Qwen/Qwen3-0.6B-Base --teacher Qwen/Qwen3-4B --data chats.jsonl  # 1 GPU
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

import cli
import distributed
import errors
import lifecycle
import loading
import lora
import rewards
import sampling
import tasks
import toy
from vocab_kernels import linear_generalized_jsd, linear_token_logprobs

# ---------------------------------------------------------------------------------------------
# The method: the generalized JSD, the per-token loss terms, the on-policy share
# ---------------------------------------------------------------------------------------------


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per row of [N, V] logits, JSD_beta(P || Q) between the teacher's P = softmax(z_T / tau) and
    the student's Q = softmax(z_S / tau), as in the objective above:

        beta = 0:  KL(P || Q) = sum_v P (log P - log Q)                          (forward KL)
        beta = 1:  KL(Q || P) = sum_v Q (log Q - log P)                          (reverse KL)
        else:      beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q,
                   log M = logsumexp(log P + log beta, log Q + log(1 - beta))

    The textbook form on full logits (finite ones), the oracle of the fused kernel that training
    calls (`token_losses`), which computes the same from hidden states without [N, V] logits."""
    log_q = torch.log_softmax(student_logits / temperature, -1)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        return (p * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


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
    """Per completion token of some rollout rows: (the loss term, the divergence to log, row
    index), flat [N].

    jsd: JSD_beta(P_T || Q_S) at `temperature` (`generalized_jsd`, computed by the fused kernel);
    sft: -log Q_S(y_t); reverse-kl-pg: -A_t log Q_S(y_t) with A_t = -(log Q_S(y_t) - log P_T(y_t))
    detached (the logged divergence is that sample's log-ratio, an unbiased estimate of the reverse
    KL). The heads are cut to `vocab` rows; no [N, V] logits are ever held."""
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
    """How many of the step's rows the student writes: lambda x batch, stochastically rounded with
    a seeded draw (exact in expectation, the same on a resumed run)."""
    whole, frac = divmod(lmbda * batch_size, 1.0)
    draw = torch.rand((), generator=torch.Generator().manual_seed(seed * 7919 + step)).item()
    return int(whole) + int(draw < frac)


# ---------------------------------------------------------------------------------------------
# Rollout, update, evaluation
# ---------------------------------------------------------------------------------------------


def sample(model, tokenizer, batch: list[dict], args, generator) -> sampling.Rollout:
    """One completion per prompt of `batch` at --temperature / --top-p."""
    return sampling.sample(
        model,
        tokenizer,
        [b["ids"] for b in batch],
        n=1,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=generator,
    )


def rollout(student, teacher, tokenizer, batch: list[dict], args, run, step: int, gen):
    """(n_on, [(part name, Rollout)]): the targets of a step. The first n_on = lambda x batch rows
    the student writes (on-policy, sampled with `gen`); the rest are the data's, or the teacher's
    with --seq-kd. Sampling runs without gradients (none flows through it)."""
    n_on = on_policy_rows(len(batch), args.lmbda, step, args.seed + run.rank)
    parts = []
    if n_on:
        parts.append(("policy", sample(student, tokenizer, batch[:n_on], args, gen)))
    off = batch[n_on:]
    if off and args.seq_kd:
        parts.append(("teacher", sample(teacher, tokenizer, off, args, gen)))
    elif off:
        prompts, targets = [b["ids"] for b in off], [b["target"] for b in off]
        data = sampling.rollout_from_tokens(prompts, targets, tokenizer.pad_token_id, run.device)
        parts.append(("data", data))
    return n_on, parts


def update(student, teacher, parts, vocab: int, batch_size: int, args, device):
    """Backward of L = 1/B sum_rows D(x, y) in micro-batches (the optimizer step is the caller's).
    Returns (L, per part the mean loss and divergence of its rows, completion tokens)."""
    loss_total, sums, n_tok = 0.0, {}, 0
    for name, roll in parts:
        R = roll.completion_ids.shape[0]
        for s in range(0, R, args.micro_batch_size):
            rows = slice(s, s + args.micro_batch_size)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
            (per_row.sum() / batch_size).backward()
            # logged only from here: a float() of a tensor that needs grad warns
            per_row = per_row.detach()
            loss_total += float(per_row.sum()) / batch_size
            div_rows = per_row_mean(div.float(), row, n_rows)
            loss_key, div_key = f"loss/{name}", f"divergence/{name}"  # means over the part's rows
            sums[loss_key] = sums.get(loss_key, 0.0) + float(per_row.sum()) / R
            sums[div_key] = sums.get(div_key, 0.0) + float(div_rows.sum()) / R
            n_tok += int(row.numel())
    return loss_total, sums, n_tok


def policy_metrics(run, step: int, batch: list[dict], roll, tokenizer, args) -> dict:
    """Accuracy (rows with an 'answer'), length and clipped share of the completions the student
    wrote for `batch`; the first --log-completions go to samples.jsonl."""
    texts = roll.texts(tokenizer)
    out = {}
    graded = rewards.accuracy(texts, batch)
    if graded:
        out["policy/accuracy"] = graded["accuracy"]
    out.update(roll.length_metrics())
    shown = list(zip(batch, texts))[: args.log_completions]
    lifecycle.log_samples(run, step, [{"prompt": b["prompt"], "completion": t} for b, t in shown])
    return out


@torch.no_grad()
def divergences(student, teacher, roll: sampling.Rollout, vocab: int, args) -> dict:
    """Mean per-token forward KL(P||Q), reverse KL(Q||P) and JSD_0.5 between teacher P and student
    Q on a rollout's completion tokens, at --loss-temperature."""
    sums, n = {"fkl": 0.0, "rkl": 0.0, "jsd": 0.0}, 0
    for s in range(0, roll.completion_ids.shape[0], args.micro_batch_size):
        rows = slice(s, s + args.micro_batch_size)
        for key, beta in (("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.5)):
            d, _, _ = token_losses(
                student,
                teacher,
                roll,
                rows,
                vocab,
                loss="jsd",
                beta=beta,
                temperature=args.loss_temperature,
            )
            sums[key] += float(d.sum())
        n += int(roll.completion_mask[rows].sum())
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(model, tokenizer, heldout: list[dict], args, teacher=None, vocab=None) -> dict:
    """Greedy completions of the held-out prompts: accuracy (rows with an 'answer'), mean length;
    with a teacher, the per-token divergences on the data targets (`data/...`) and on these greedy
    completions (`own/...`), at --loss-temperature."""
    was_training = model.training
    model.eval()
    prompts = [p["ids"] for p in heldout]
    roll = sampling.sample(
        model,
        tokenizer,
        prompts,
        n=1,
        max_new_tokens=args.max_new_tokens,
        greedy=True,
        batch_size=128,
    )
    texts = roll.texts(tokenizer)
    row = {
        "mean_length": float(roll.completion_mask.sum(1).float().mean()),
        "clipped_ratio": float((~roll.finished).float().mean()),
    }
    graded = rewards.accuracy(texts, heldout, units=True)
    if graded:
        row["accuracy"], row["_units"] = graded["accuracy"], graded["_units"]
    if teacher is not None:
        with_target = [p for p in heldout if p["target"] is not None]
        if with_target:
            data = sampling.rollout_from_tokens(
                [p["ids"] for p in with_target],
                [p["target"] for p in with_target],
                tokenizer.pad_token_id,
                roll.prompt_ids.device,
            )
            for k, v in divergences(model, teacher, data, vocab, args).items():
                row[f"data/{k}"] = v
        for k, v in divergences(model, teacher, roll, vocab, args).items():
            row[f"own/{k}"] = v
    row["_samples"] = [
        {"prompt": p["prompt"], "completion": t} for p, t in zip(heldout[:10], texts[:10])
    ]
    model.train(was_training)
    return row


# ---------------------------------------------------------------------------------------------
# Models: a frozen teacher and a trainable student with one tokenizer
# ---------------------------------------------------------------------------------------------


def load_models(args, device, tokenizer, teacher_tokenizer):
    """(teacher, student, the student's trainable parameters, vocab = the shared tokenizer's
    size)."""
    teacher = lora.load_frozen(
        str(toy.base_model_dir()) if args.teacher == "toy" else args.teacher,
        args.teacher_adapter,
        device,
        args.teacher_load_in_4bit,
        "--teacher-adapter",
        "Pass the directory `sft_think.py --out` wrote.",
    )
    # the student ('toy' = the toy student) with --init-adapter merged in, then LoRA on it, or
    # every weight with --full
    name = toy.student_model_dir() if args.model == "toy" else args.model
    student, params = lora.trainable_model(args, device, name, full=args.full)
    vocab = loading.shared_vocab(tokenizer, teacher_tokenizer, student, teacher)
    return teacher, student, params, vocab


def without_samples(metrics: dict) -> dict:
    """Held-out metrics without the completions and per-prompt values they carry."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def report(args, teach: dict, before: dict, train_seconds: float, after: dict):
    """(GKD's fields of summary.json, the results table): the held-out metric (greedy accuracy,
    else the JSD on the data targets, else the reverse KL on the student's own completions) of the
    student before and after and of the teacher (`teach`), and the share of the student-teacher gap
    closed (accuracy)."""
    metric = "accuracy" if "accuracy" in after else "data/jsd" if "data/jsd" in after else "own/rkl"
    gap = teach.get(metric, math.nan) - before.get(metric, math.nan)
    closed = (after[metric] - before[metric]) / gap if metric == "accuracy" and gap > 0 else None
    note = "greedy" + (f", toy level(s) {args.toy_difficulty}" if args.data == "toy" else "")
    variant = ("seq-KD " if args.seq_kd else "") + args.loss
    if args.loss != "reverse-kl-pg":
        variant += f" lambda {args.lmbda:g}"
    heldout = {
        "metric": metric,
        "before": before.get(metric),
        "after": after.get(metric),
        "teacher": teach.get(metric),
        "gap_closed": closed,
        "note": note,
    }
    fields = {
        "method": "gkd",
        "variant": variant,
        "loss": args.loss,
        "lmbda": args.lmbda,
        "beta": args.beta,
        "seq_kd": args.seq_kd,
        "heldout": heldout,
        "teacher": teach,
    }
    table = {
        "variant": variant,
        "metric": metric,
        "student before": before.get(metric),
        "student after": after.get(metric),
        "teacher": teach.get(metric),
        "gap closed": closed,
        "held-out JSD before": before.get("data/jsd"),
        "after": after.get("data/jsd"),
        "train s": round(train_seconds),
    }
    return fields, table


# ---------------------------------------------------------------------------------------------
# Flags and defaults
# ---------------------------------------------------------------------------------------------


@dataclass
class Args(cli.TrainArgs):
    out: str = "runs/gkd"
    warmup_ratio: float = 0.05
    max_steps: int = 1400
    log_completions: int = 2
    """examples per step written to samples.jsonl (prompt and the student's completion)"""
    batch_size: int = 16
    micro_batch_size: int = 16
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    save_every: int = 100
    teacher: str = "auto"
    """the teacher: hub id or local dir ('auto' = the toy base for the toy student; required
    otherwise)"""
    teacher_adapter: str = "auto"
    """PEFT adapter dir(s), joined by '+', merged into the teacher; 'auto' = toy/sft_think for the
    toy teacher, none otherwise"""
    teacher_load_in_4bit: bool = False
    """the frozen teacher in NF4 (else bf16 on CUDA, fp32 on CPU)"""
    eval_size: int = 200
    """held-out prompts"""
    eval_every: int = 0
    """evaluate every N steps (0 = before and after only)"""
    toy_difficulty: str = "1,2,3"
    """toy arithmetic level(s), comma-separated, for training and held-out accuracy"""
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
    full: bool | None = None
    """full fine-tuning of the student instead of LoRA (default: on for the toy, off for a hub
    model)"""


# {field: (toy student, real model on one CUDA GPU)}: the toy student trains in full at 1.5e-3;
# a real one LoRA rank 128 at 1e-4 (tinker-cookbook's distillation recipe)
DEFAULTS = {"lr": (1.5e-3, 1e-4), "lora_r": (128, 128)}


def resolve_defaults(args: Args) -> Args:
    """The teacher (the toy base and its SFT adapter for the toy student), full fine-tuning for the
    toy, DEFAULTS, alpha = 2 x rank; then the checks of the flags."""
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
    lora.fill_defaults(args, DEFAULTS)
    if not 0.0 <= args.beta <= 1.0:
        raise errors.ConfigError(
            f"--beta {args.beta}: must lie in [0, 1] (0 forward KL, 1 reverse KL)"
        )
    if args.loss == "reverse-kl-pg" and (args.lmbda != 1.0 or args.seq_kd):
        if args.lmbda != Args.lmbda or args.seq_kd:
            raise errors.ConfigError(
                "--loss reverse-kl-pg trains on the student's own samples only: drop --lmbda "
                "and --seq-kd"
            )
        args.lmbda = 1.0
    samples = args.lmbda > 0 or args.seq_kd
    if samples and args.temperature != args.loss_temperature:
        warnings.warn(
            f"gkd: sampling at --temperature {args.temperature} but the loss compares the models "
            f"at --loss-temperature {args.loss_temperature} (as TRL's GKD trainer does); pass "
            "both equal to distill the distribution you sample from",
            UserWarning,
            stacklevel=2,
        )
    return args


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    args = resolve_defaults(args)
    run = lifecycle.start_run(args, args.resume, args.report_to)
    tokenizer, teacher_tokenizer = loading.load_tokenizers(args.model, args.teacher)
    train, heldout = tasks.distillation_examples(tokenizer, args)
    teacher, student, params, vocab = load_models(args, run.device, tokenizer, teacher_tokenizer)
    opt = lifecycle.adamw(params, args)

    def evaluate_student():
        return evaluate(student, tokenizer, heldout, args, teacher, vocab)

    start, state = lifecycle.begin_training(run, student, opt, evaluate_student, args.resume)
    if distributed.is_main() and "teacher" not in state:  # measured once; a resumed run reads it
        state["teacher"] = without_samples(evaluate(teacher, tokenizer, heldout, args))
    state.setdefault("tokens_seen", 0)
    student.train()
    t_train, last = 0.0, {}
    for step in lifecycle.training_steps(run, start, args, "gkd"):
        t0 = time.perf_counter()
        batch, gen = lifecycle.step_batch(run, train, args, step)
        n_on, parts = rollout(student, teacher, tokenizer, batch, args, run, step, gen)
        t_sample = time.perf_counter() - t0
        loss, sums, n_tok = update(student, teacher, parts, vocab, len(batch), args, run.device)
        stats = opt(loss, step + 1)
        t_train += time.perf_counter() - t0
        state["tokens_seen"] += sum(int(r.attention_mask.sum()) for _, r in parts) * run.world
        last = {"loss": loss, **sums, **stats, "on_policy_rows": n_on, "completion_tokens": n_tok}
        last["learning_rate"] = opt.scheduler.get_last_lr()[0]
        last["num_tokens"] = state["tokens_seen"]
        last["step_time"] = time.perf_counter() - t0
        last["timing/sample"] = t_sample
        if n_on:
            last.update(policy_metrics(run, step + 1, batch[:n_on], parts[0][1], tokenizer, args))
        shown = {"loss": ".4f", "eval/accuracy": ".3f"}
        lifecycle.end_step(
            run, step + 1, last, student, opt, state, args, show=shown, evaluate=evaluate_student
        )
    # --full: the model and tokenizer in <out>/model, else the LoRA adapter in <out>
    return lifecycle.finish_training(
        run,
        args,
        student,
        tokenizer,
        opt,
        state,
        last,
        t_train,
        evaluate=evaluate_student,
        report=functools.partial(report, args, state.get("teacher"), state.get("before"), t_train),
        full=args.full,
    )


if __name__ == "__main__":
    cli.run_cli(main, Args)
