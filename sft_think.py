"""Thinking SFT: supervised fine-tuning that teaches a base model to think before it answers.

The model learns to write `<think> reasoning </think> answer` on every assistant turn: the
long-CoT cold start of the Qwen3 Technical Report (arXiv:2505.09388, section 4.1), as the model
cards dnotitia/Qwen3-4B-Base and Jarrodbarnes/qwen3-0.6B-interleaved-thinking train it. The loss is
next-token cross-entropy on assistant output only:

    L = - sum_t m_t log p(x_t | x_<t) / sum_t m_t,   m_t = 1 on `<think>` ... `<|im_end|>` of each
                                                          assistant turn, 0 on system/user turns
                                                          and on the `<|im_start|>assistant` header.

For Qwen3 the mask comes from a training variant of the chat template that wraps assistant output in
`{% generation %}` tags and, unlike the stock Qwen3 template, keeps the reasoning of earlier turns
(interleaved thinking); any other model's template is used as it is, through its own tags or,
without them, turn by turn (chat.assistant_mask). `--no-think` trains the same examples with the
thoughts removed (the `raw` arm of Jarrodbarnes/qwen3-0.6B-interleaved-thinking).

Think-token embedding tuning: `--train-tokens "<think>,</think>"` trains only those rows of the
embedding (as Lambent/Qwen3-4B-Base-Continued-GRPO-Style-Karcher tuned its think tokens), everything
else frozen; a tokenizer that writes them in several pieces (SmolLM2) gets them as new tokens, whose
rows start at the mean of those pieces, and the run saves the model with its tokenizer in
<out>/model. Log-probs come from the final hidden states through
`vocab_kernels.linear_token_logprobs`, so full-vocabulary logits are never held.

Toy worlds (--data): toy (arithmetic with a scratchpad), toy-instructions (reverse, sort, count...:
rlmt.py's start), toy-continuations (documents with thoughts that restate their facts),
toy-documents (plain documents of --toy-domains, language modelling on the whole text).
--init-adapter continues from an earlier adapter (e.g. dpo_online.py's); torchrun runs it
data-parallel.

Run:
    python sft_think.py                                  # toy world: arithmetic with a scratchpad
    python sft_think.py --model Qwen/Qwen3-0.6B-Base --data traces.jsonl --load-in-4bit \\
        --lora-r 64 --lora-alpha 128 --max-length 2048 --gradient-checkpointing
    python sft_think.py --model smollm2 --data traces.jsonl --train-tokens "<think>,</think>"
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

import chat
import cli
import dataio
import distributed
import lifecycle
import loading
import lora
import rewards
import sampling
import toy
from vocab_kernels import linear_token_logprobs

# ---------------------------------------------------------------------------------------------
# Data: every accepted row becomes (input_ids, loss_mask) (chat.encode_rows)
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    """What a run trains and evaluates on, encoded."""

    train: list  # (input_ids, loss_mask) examples; lists of them (packed rows) with --packing
    val: list  # held-out examples as written
    val_raw: list  # the same without their thoughts (raw_val_loss)
    problems: list | None  # toy problems graded for accuracy, None otherwise
    pad_id: int


def load_rows(
    data: str,
    eval_data: str,
    seed: int,
    eval_size: int,
    toy_difficulty: str,
    toy_train_size: int,
    toy_styles: str = "gsm8k",
    toy_domains: str = "story,news,code",
):
    """Training rows, held-out rows, and (toy only) held-out problems for accuracy. A user's data is
    split by dataio.train_and_heldout (--eval-data, else the last tenth of --data); its rows carry
    their line number ("_line"), so errors name it."""
    if data in toy.SFT_WORLDS:
        return toy.sft_rows(
            data, seed, toy_train_size, eval_size, toy_difficulty, toy_styles, toy_domains
        )
    (_, train), (_, heldout) = dataio.train_and_heldout(data, eval_data, eval_size)
    return train, heldout, None


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


def masked_nll_sum(model, ids, attn, loss_mask, position_ids=None, head_grad_rows=None):
    """Sum of -log p over the masked target tokens, and their count.

    Hidden state t predicts token t+1, so the mask is read at the targets. Only the masked rows of
    the hidden states go through the LM head, in chunks inside the kernel. `head_grad_rows`: the
    LM-head rows that train (--train-tokens); the kernel computes the weight gradient of those rows
    only."""
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=attn, position_ids=position_ids
    ).last_hidden_state
    sel = loss_mask[:, 1:].bool()
    logp = linear_token_logprobs(
        hidden[:, :-1][sel],
        model.get_output_embeddings().weight,
        ids[:, 1:][sel],
        weight_grad_rows=head_grad_rows,
    )
    return -logp.sum(), int(sel.sum())


@torch.no_grad()
def eval_loss(model, examples, batch_size, pad_id, device):
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        nll, n = masked_nll_sum(model, *chat.collate(examples[i : i + batch_size], pad_id, device))
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(count, 1)


def repetition_rate(token_lists, n=4):
    """Share of n-grams that repeat an earlier n-gram of the same completion, averaged (the
    repetition column of the model card Jarrodbarnes/qwen3-0.6B-interleaved-thinking)."""
    rates = []
    for toks in token_lists:
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


@torch.no_grad()
def generate_eval(model, tokenizer, problems, max_new_tokens):
    """Greedy held-out correctness per problem (toy problems, graded by rewards.correct like every
    script), the 4-gram repetition rate of the samples, the samples, and accuracy per level."""
    prompts = [sampling.render_prompt([p["messages"][0]], tokenizer) for p in problems]
    roll = sampling.sample(
        model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, greedy=True, batch_size=64
    )
    texts = roll.texts(tokenizer)
    tokens = roll.tokens()
    if "kind" in problems[0]:  # toy instructions: the answer after the thought, exactly
        correct = [
            float(rewards.strip_think(t).strip() == p["answer"]) for t, p in zip(texts, problems)
        ]
        key, name = "kind", "accuracy_{}"
    else:
        correct = rewards.correct(
            texts, [p["answer"] for p in problems], [p.get("style") for p in problems]
        )
        key, name = "difficulty", "accuracy_level{}"
    by_level = {}
    for ok, p in zip(correct, problems):
        by_level.setdefault(p[key], []).append(ok)
    per_level = (
        {name.format(d): sum(v) / len(v) for d, v in sorted(by_level.items())}
        if len(by_level) > 1
        else {}
    )
    return correct, repetition_rate(tokens), texts, per_level


def evaluate(model, tokenizer, data: SFTData, batch_size, max_new_tokens, device):
    """Held-out loss with and without the thoughts, and on toy problems greedy accuracy and 4-gram
    repetition, with the first 20 samples (for samples.jsonl)."""
    row = {
        "val_loss": eval_loss(model, data.val, batch_size, data.pad_id, device),
        "raw_val_loss": eval_loss(model, data.val_raw, batch_size, data.pad_id, device),
    }
    problems = data.problems
    if problems is not None:
        correct, row["repetition_4gram"], texts, per_level = generate_eval(
            model, tokenizer, problems, max_new_tokens
        )
        row["accuracy"] = sum(correct) / len(correct)
        row["_units"] = {"accuracy": correct}  # per problem, for the paired interval
        row.update(per_level)
        row["_samples"] = [
            {"prompt": p["messages"][0]["content"], "completion": t, "answer": p["answer"]}
            for p, t in zip(problems[:20], texts[:20])
        ]
    return row


# ---------------------------------------------------------------------------------------------
# Update: one optimizer step on L
# ---------------------------------------------------------------------------------------------


def batch_tokens(rows: list, packed: bool) -> int:
    """Tokens in a list of examples, or of packed rows (lists of examples)."""
    if packed:
        return sum(len(ids) for row in rows for ids, _ in row)
    return sum(len(ids) for ids, _ in rows)


def sft_step(model, data: SFTData, step, args, run, opt, head_rows):
    """One optimizer step on L over a global batch of --batch-size x world examples (packed rows
    with --packing), in the same seeded order on every rank. Returns (loss, tokens in the global
    batch, optimizer stats)."""
    mine = dataio.epoch_indices(
        len(data.train), args.batch_size * run.world, step, args.seed, run.rank, run.world
    )
    chunks = [
        [data.train[i] for i in mine[s : s + args.micro_batch_size]]
        for s in range(0, len(mine), args.micro_batch_size)
    ]
    # the packed 4D mask is added to the attention scores, so it takes their dtype
    mask_dtype = model.get_input_embeddings().weight.dtype
    micro = [chat.collate(c, data.pad_id, run.device, mask_dtype) for c in chunks]
    n_tokens = sum(batch_tokens(c, args.packing) for c in chunks) * run.world
    # Normalise by the token count of the whole global batch, so every target token weighs the
    # same whatever micro-batch or rank it lands on (the gradient all-reduce averages over ranks:
    # x world).
    n_global = distributed.all_reduce_sum(sum(int(m[2][:, 1:].sum()) for m in micro))
    loss_sum = 0.0
    for ids, attn, loss_mask, pos in micro:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
            nll, _ = masked_nll_sum(
                model, ids, attn, loss_mask, pos if args.packing else None, head_rows
            )
        (nll * run.world / n_global).backward()
        loss_sum += float(nll.detach())
    loss = distributed.all_reduce_sum(loss_sum) / n_global
    return loss, n_tokens, opt(loss, step + 1)


# ---------------------------------------------------------------------------------------------
# Run plumbing: data and model in, progress, results out
# ---------------------------------------------------------------------------------------------


def prepare_data(args, tokenizer) -> SFTData:
    """The rows of --data encoded with the training template; the held-out rows twice, with and
    without their thoughts."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    template = chat.training_template(tokenizer)
    train_rows, val_rows, problems = load_rows(
        args.data,
        args.eval_data,
        args.seed,
        args.eval_size,
        args.toy_difficulty,
        args.toy_train_size,
        args.toy_styles,
        args.toy_domains,
    )
    val_source = args.eval_data or args.data
    train = chat.encode_rows(
        train_rows, tokenizer, template, args.no_think, args.max_length, args.data
    )
    val = chat.encode_rows(val_rows, tokenizer, template, False, args.max_length, val_source)
    val_raw = chat.encode_rows(val_rows, tokenizer, template, True, args.max_length, val_source)
    if args.packing:
        train = chat.pack(train, args.max_length)
    return SFTData(train, val, val_raw, problems, pad_id)


def prepare_model(args, run, tokenizer, added):
    """The model with --init-adapter merged in, its trainable parameters (LoRA, every weight with
    --full, or the think-token embedding rows with --train-tokens), and their optimizer; returns
    (model, optimizer step, the embedding rows that train with --train-tokens or None). `added`:
    the tokens chat.add_marker_tokens put in the tokenizer."""
    if args.train_tokens:
        model = lora.load_merged(args, run.device)
        params, head_rows = lora.train_only_tokens(model, tokenizer, args.train_tokens, added)
    else:
        model, params = lora.trainable_model(args, run.device, full=args.full)
        head_rows = None
    # think-token rows: no decay, so AdamW leaves the zero-gradient rows bit-identical
    opt = lifecycle.adamw(
        params, args, weight_decay=0.0 if args.train_tokens else args.weight_decay
    )
    return model, opt, head_rows


def report(args, problems, before, tokens_seen: int, last: dict, device, after: dict):
    """(thinking SFT's fields of summary.json, the results table): held-out accuracy on toy
    problems, else the held-out loss, before and after training; `tokens_seen`, the tokens trained
    on."""
    metric = "accuracy" if problems is not None else "val_loss"
    arm = "no_think" if args.no_think else "think"
    heldout = {
        "metric": metric,
        "before": before.get(metric) if before else None,
        "after": after[metric],
    }
    if args.data == "toy":
        heldout["note"] = f"greedy, toy level(s) {args.toy_difficulty}"
    elif args.data == "toy-instructions":
        heldout["note"] = "greedy, exact answer after the thought"
    fields = {
        "method": "sft_think",
        "arm": arm,
        "heldout": heldout,
        "final_loss": last.get("loss"),
        "tokens_seen": tokens_seen,
        "tokens_per_s": last.get("tokens_per_s", 0.0),
    }
    table = {
        "arm": arm,
        "val loss": after["val_loss"],
        "raw val loss": after["raw_val_loss"],
        "rep 4-gram": after.get("repetition_4gram"),
        "tokens seen": fields["tokens_seen"],
        "tok/s": round(fields["tokens_per_s"]),
        "memory MB": round(lifecycle.peak_memory_mb(device)),
    }
    if problems is not None and before:
        table["accuracy before"] = before["accuracy"]
        table["accuracy after"] = after["accuracy"]
    return fields, table


# ---------------------------------------------------------------------------------------------
# Flags, defaults, and the run
# ---------------------------------------------------------------------------------------------


@dataclass
class Args(cli.TrainArgs):
    """Thinking SFT: the shared trainer flags and the method's own."""

    out: str = "runs/sft_think"
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    max_steps: int = 500
    batch_size: int = 16
    micro_batch_size: int = 16
    weight_decay: float = 0.0
    """AdamW weight decay (0 with --train-tokens, so the frozen rows stay bit-identical)"""
    max_length: int = 512
    """longest tokenized example; longer ones are an error"""
    packing: bool = False
    """concatenate examples into rows of --max-length; positions restart and attention stays within
    each example (a 4D mask: eager or sdpa attention, not flash-attention)"""
    full: bool = False
    """full fine-tuning instead of LoRA"""
    no_think: bool = False
    """remove the thoughts from the training data (raw arm)"""
    train_tokens: str = ""
    """comma list, e.g. '<think>,</think>': train only these embedding rows; ones the tokenizer
    splits are added as new tokens, and <out>/model holds the model with its tokenizer (--model
    <out>/model)"""
    toy_difficulty: str = "1,2,3"
    """toy arithmetic level(s), comma-separated; train and held-out draw from them"""
    toy_styles: str = "gsm8k"
    """toy arithmetic answer formats, comma-separated, of gsm8k (#### N), math (\\boxed{N}), mc
    (Answer: X)"""
    toy_domains: str = "story,news,code"
    """toy document domains, comma-separated, of --data toy-documents"""
    eval_size: int = 200
    """held-out examples for loss and accuracy"""
    eval_every: int = 250
    """evaluate every N steps (0 = only at the end)"""
    max_new_tokens: int = 160
    """generation length for accuracy and repetition"""


# {field: (toy, real model on CUDA)}. The toy column made the shipped toy/sft_think adapter
# (scripts/make_toy_adapters.py); the model cards of this recipe give no CUDA setup, so a real model
# keeps the same one there (on a CPU, lora.SMALL_DEVICE_SETUP's).
DEFAULTS = {
    "lr": (3e-3, 3e-3),
    "lora_r": (32, 32),
    "load_in_4bit": (False, False),
    "gradient_checkpointing": (False, False),
}


def resolve_defaults(args: Args) -> None:
    """Fill the fields left None from DEFAULTS, and LoRA alpha = 2 x rank."""
    lora.fill_defaults(args, DEFAULTS)


def main(args: Args):
    resolve_defaults(args)
    run = lifecycle.start_run(args, args.resume, args.report_to)
    tokenizer = loading.load_tokenizer(args.model)
    # saved with the model in <out>/model
    added = chat.add_marker_tokens(tokenizer, args.train_tokens)
    data = prepare_data(args, tokenizer)
    model, opt, head_rows = prepare_model(args, run, tokenizer, added)
    heldout_eval = functools.partial(
        evaluate, model, tokenizer, data, args.micro_batch_size, args.max_new_tokens, run.device
    )
    start, state = lifecycle.begin_training(run, model, opt, heldout_eval, args.resume)
    tokens_seen, tokens_run, t_train, last = state.get("tokens_seen", 0), 0, 0.0, {}

    model.train()
    for step in lifecycle.training_steps(run, start, args, "sft"):
        t0 = time.perf_counter()
        loss, n_tokens, stats = sft_step(model, data, step, args, run, opt, head_rows)
        step_time = time.perf_counter() - t0
        t_train += step_time
        tokens_seen, tokens_run = tokens_seen + n_tokens, tokens_run + n_tokens
        last = {
            "loss": loss,
            **stats,
            "learning_rate": opt.scheduler.get_last_lr()[0],
            "tokens_seen": tokens_seen,
            "tokens_per_s": tokens_run / max(t_train, 1e-9),
            "step_time": step_time,
        }
        state["tokens_seen"] = tokens_seen  # carried by the checkpoints, for --resume
        shown = {"loss": ".4f", "eval/accuracy": ".2f"}
        lifecycle.end_step(
            run, step + 1, last, model, opt, state, args, show=shown, evaluate=heldout_eval
        )

    # the LoRA adapter, or (--full, --train-tokens) the model with its tokenizer in <out>/model
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
        report=functools.partial(
            report, args, data.problems, state.get("before"), tokens_seen, last, run.device
        ),
        full=args.full or bool(args.train_tokens),
    )


if __name__ == "__main__":
    cli.run_cli(main, Args)
