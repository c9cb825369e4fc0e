"""Supervised fine-tuning with interleaved thinking: teach a base model to think before it answers.

The model learns to write `<think> reasoning </think> answer` on every assistant turn. The loss is
the usual next-token cross-entropy, but only on assistant output (Qwen3's chat format, seeds 002
and 004):

    L = - sum_t m_t log p(x_t | x_<t) / sum_t m_t,   m_t = 1 on `<think>` ... `<|im_end|>` of each
                                                          assistant turn, 0 on system/user turns
                                                          and on the `<|im_start|>assistant` header.

The mask comes from a training variant of the chat template that wraps assistant output in
`{% generation %}` tags and, unlike the stock Qwen3 template, keeps the reasoning of earlier turns
(interleaved thinking). `--no-think` trains the same examples with the thoughts removed (seed 004's
`raw` arm). `--train-tokens "<think>,</think>"` trains only those rows of the embedding (seed 001),
everything else frozen. Log-probs come from the final hidden states through
`kernels.linear_token_logprobs`, so full-vocabulary logits are never held.

Run:
    python sft_think.py                                  # toy world: arithmetic with a scratchpad
    python sft_think.py --no-think                       # the same budget without thoughts
    python sft_think.py --model Qwen/Qwen3-0.6B-Base --data traces.jsonl --load-in-4bit \
        --lora-r 64 --lora-alpha 128 --max-length 2048 --gradient-checkpointing
    torchrun --nproc_per_node 2 sft_think.py --model Qwen/Qwen3-1.7B-Base --data traces.jsonl
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import common
import lora
import toy
from kernels import linear_token_logprobs


@dataclass
class Args:
    model: str = field(default="toy", metadata={"help": "hub id or local dir of a causal LM; 'toy' = the toy base"})
    data: str = field(default="toy", metadata={"help": "JSONL file or hub dataset id; 'toy' = toy arithmetic"})
    eval_data: str = field(default="", metadata={"help": "held-out JSONL (default: toy held-out split, or 5%% of --data)"})
    out: str = field(default="runs/sft_think", metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, init, sampling)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps with linear warmup, then cosine decay"})
    max_steps: int = field(default=500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    max_length: int = field(default=512, metadata={"help": "longest tokenized example; longer ones are an error"})
    packing: bool = field(default=False, metadata={"help": "concatenate examples into rows of --max-length"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (scale alpha/r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: NF4 base weights (bitsandbytes)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    no_think: bool = field(default=False, metadata={"help": "remove the thoughts from the training data (raw arm)"})
    train_tokens: str = field(default="", metadata={"help": "comma list, e.g. '<think>,</think>': train only these embedding rows"})
    toy_difficulty: str = field(default="1,2,3", metadata={"help": "toy arithmetic level(s), comma-separated; train and held-out draw from them"})
    toy_train_size: int = field(default=4000, metadata={"help": "toy training examples"})
    eval_size: int = field(default=200, metadata={"help": "held-out examples for loss and accuracy"})
    eval_every: int = field(default=250, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    max_new_tokens: int = field(default=160, metadata={"help": "generation length for accuracy and repetition"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (for --resume)"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    report_to: str = field(default="", metadata={"help": "also log to wandb or trackio"})


# ---------------------------------------------------------------------------------------------
# Data: every accepted row becomes (input_ids, loss_mask)
# ---------------------------------------------------------------------------------------------

THINK_RE = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_thoughts(messages: list[dict]) -> list[dict]:
    """The same conversation without reasoning: seed 004's `raw` arm."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if m.get("role") == "assistant" and isinstance(m.get("content"), str):
            m["content"] = THINK_RE.sub("", m["content"])
        out.append(m)
    return out


def training_template(tokenizer) -> str:
    """A chat template whose assistant output sits in {% generation %} tags, or a clear error."""
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        return template
    if "<|im_start|>" in template and "<think>" in template:  # Qwen3's template (real or toy)
        return toy.TRAINING_CHAT_TEMPLATE
    raise ValueError(
        "sft_think.py: the tokenizer's chat template has no {% generation %} tags and is not Qwen3's, so "
        "the assistant-only loss mask cannot be built. Give the tokenizer a template with "
        "{% generation %}...{% endgeneration %} around assistant output.")


def encode_row(row: dict, where: str, tokenizer, template: str, no_think: bool) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = trained) for one JSONL row of any accepted schema."""
    if "messages" in row:
        messages = strip_thoughts(row["messages"]) if no_think else row["messages"]
        if not any(m.get("role") == "assistant" for m in messages):
            raise common.DataError(f"{where}: field 'messages' has no assistant turn")
        enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list):  # conversational prompt/completion
            return encode_row({"messages": row["prompt"] + row["completion"]}, where, tokenizer, template, no_think)
        completion = THINK_RE.sub("", row["completion"]) if no_think else row["completion"]
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return p + c, [0] * len(p) + [1] * len(c)
    if "text" in row:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    raise common.DataError(f"{where}: expected a 'messages', 'prompt'+'completion' or 'text' field, got {sorted(row)}")


def encode_all(rows, tokenizer, template, no_think, max_length, source):
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        ids, mask = encode_row(row, where, tokenizer, template, no_think)
        if len(ids) > max_length:
            raise common.DataError(f"{where}: {len(ids)} tokens > --max-length {max_length}")
        if sum(mask) == 0:
            raise common.DataError(f"{where}: nothing to train on (empty loss mask)")
        examples.append((ids, mask))
    return examples


def pack(examples, max_length):
    """Greedy packing into rows of max_length. Attention is not blocked across example boundaries
    (classic GPT-style packing); position ids restart at each example so RoPE sees short sequences."""
    rows, cur_ids, cur_mask = [], [], []
    for ids, mask in examples:
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            rows.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    return rows


def collate(batch, pad_id, device):
    """Right-padded tensors: input_ids, attention_mask, loss_mask."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, m) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    return ids.to(device), attn.to(device), loss_mask.to(device)


def load_rows(args):
    """Training rows, held-out rows, and (toy only) held-out arithmetic problems for accuracy."""
    if args.data == "toy":
        levels = toy.parse_levels(args.toy_difficulty)
        train = toy.arithmetic("train", args.toy_train_size, seed=args.seed, difficulty=levels)
        heldout = toy.arithmetic("test", args.eval_size, seed=args.seed, difficulty=levels)
        return train, heldout, heldout
    train = common.load_rows(args.data)
    if args.eval_data:
        return train, common.load_rows(args.eval_data), None
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    n_eval = max(1, min(args.eval_size, len(train) // 20))
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]], None


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------

def masked_nll_sum(model, ids, attn, loss_mask):
    """Sum of -log p over the masked target tokens, and their count.

    Hidden state t predicts token t+1, so the mask is read at the targets. Only the masked rows of
    the hidden states go through the LM head, in chunks inside the kernel."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    sel = loss_mask[:, 1:].bool()
    logp = linear_token_logprobs(hidden[:, :-1][sel], model.get_output_embeddings().weight, ids[:, 1:][sel])
    return -logp.sum(), int(sel.sum())


@torch.no_grad()
def eval_loss(model, examples, batch_size, pad_id, device):
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        nll, n = masked_nll_sum(model, *collate(examples[i: i + batch_size], pad_id, device))
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(count, 1)


def repetition_rate(token_lists, n=4):
    """Share of n-grams that repeat an earlier n-gram of the same completion, averaged (seed 004)."""
    rates = []
    for toks in token_lists:
        grams = [tuple(toks[i: i + n]) for i in range(len(toks) - n + 1)]
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


@torch.no_grad()
def generate_eval(model, tokenizer, problems, args):
    """Greedy held-out accuracy (toy problems only) and the 4-gram repetition rate of the samples."""
    prompts = [tokenizer.apply_chat_template([p["messages"][0]], tokenize=False, add_generation_prompt=True)
               for p in problems]
    roll = common.sample(model, tokenizer, prompts, n=1, max_new_tokens=args.max_new_tokens, greedy=True,
                         batch_size=64)
    texts = roll.texts(tokenizer)
    tokens = [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]
    correct = [toy.extract_answer(t, p.get("style", "gsm8k")) == p["answer"] for t, p in zip(texts, problems)]
    by_level = {}
    for ok, p in zip(correct, problems):
        by_level.setdefault(p["difficulty"], []).append(ok)
    per_level = {f"accuracy_level{d}": sum(v) / len(v) for d, v in sorted(by_level.items())} if len(by_level) > 1 else {}
    return sum(correct) / len(correct), repetition_rate(tokens), texts, per_level


def evaluate(model, tokenizer, val, val_raw, problems, args, pad_id, device):
    row = {"val_loss": eval_loss(model, val, args.batch_size, pad_id, device),
           "raw_val_loss": eval_loss(model, val_raw, args.batch_size, pad_id, device)}
    if problems is not None:
        row["accuracy"], row["repetition_4gram"], texts, per_level = generate_eval(model, tokenizer, problems, args)
        row.update(per_level)
        row["_samples"] = [{"prompt": p["messages"][0]["content"], "completion": t, "answer": p["answer"]}
                           for p, t in zip(problems[:20], texts[:20])]
    return row


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def setup_trainable(model, args, tokenizer):
    """LoRA / full / think-token embedding rows; returns the parameters the optimizer updates."""
    if args.train_tokens:
        names = [t for t in args.train_tokens.split(",") if t]
        ids = tokenizer.convert_tokens_to_ids(names)
        unknown = [n for n, i in zip(names, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"--train-tokens: {unknown} are not single tokens of this tokenizer")
        for p in model.parameters():
            p.requires_grad_(False)
        rows = torch.tensor(ids)
        params = []
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            w = emb.weight
            w.requires_grad_(True)
            keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
            keep[rows] = 1
            # Zero every other row's gradient: with no weight decay AdamW then leaves them bit-identical.
            w.register_hook(lambda g, keep=keep: g * keep)
            params.append(w)
        return params
    if args.full:
        if args.load_in_4bit:
            raise ValueError("--full cannot train 4-bit weights; use LoRA (the default) with --load-in-4bit")
        return [p for p in model.parameters() if p.requires_grad]
    lora.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    return lora.lora_parameters(model)


def main(args: Args):
    rank, world, local_rank = common.init_distributed()
    common.set_seed(args.seed)
    device = common.pick_device(args.device if world == 1 or args.device != "auto" else None, local_rank)
    out = common.prepare_out_dir(args.out, args, resume=args.resume)
    tokenizer = common.load_tokenizer(args.model)
    model = common.load_model(args.model, device=device, load_in_4bit=args.load_in_4bit,
                              gradient_checkpointing=args.gradient_checkpointing)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template = training_template(tokenizer)

    train_rows, val_rows, problems = load_rows(args)
    train = encode_all(train_rows, tokenizer, template, args.no_think, args.max_length, args.data)
    val = encode_all(val_rows, tokenizer, template, False, args.max_length, args.eval_data or args.data)
    val_raw = encode_all(val_rows, tokenizer, template, True, args.max_length, args.eval_data or args.data)
    if args.packing:
        train = pack(train, args.max_length)

    params = setup_trainable(model, args, tokenizer)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0 if args.train_tokens else args.weight_decay)
    scheduler = common.cosine_schedule(optimizer, int(args.warmup_ratio * args.max_steps), args.max_steps)
    logger = common.MetricsLogger(out, report_to=args.report_to or None)

    before = None
    state = common.load_checkpoint(out, model, optimizer, scheduler) if args.resume else None
    start = state["step"] if state else 0
    if state:
        before = state["data_state"].get("before")
    elif common.is_main():
        before = evaluate(model, tokenizer, val, val_raw, problems, args, pad_id, device)
        before.pop("_samples", None)
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})

    # One global batch per step: the same seeded order on every rank, each rank takes its slice.
    per_step = args.batch_size * args.grad_accum * world
    epoch_len = max(1, len(train) // per_step)

    def batch_for(step: int):
        epoch, pos = divmod(step, epoch_len)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx = order[pos * per_step: (pos + 1) * per_step].tolist()
        mine = idx[rank::world]
        return [mine[i: i + args.batch_size] for i in range(0, len(mine), args.batch_size)]

    model.train()
    tokens_seen = state["data_state"].get("tokens_seen", 0) if state else 0
    t_train, tokens_run, last = 0.0, 0, {}
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="sft", disable=not common.is_main())
    for step in bar:
        t0 = time.perf_counter()
        micro = [collate([train[i] for i in mb], pad_id, device) for mb in batch_for(step)]
        # Normalise by the token count of the whole global batch, so every target token weighs the same
        # whatever micro-batch or rank it lands on (all_reduce_gradients averages over ranks: x world).
        n_local = sum(int(m[2][:, 1:].sum()) for m in micro)
        n_global = common.all_reduce_sum(n_local)
        loss_sum = 0.0
        for ids, attn, loss_mask in micro:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                nll, _ = masked_nll_sum(model, ids, attn, loss_mask)
            (nll * world / n_global).backward()
            loss_sum += float(nll.detach())
            tokens_seen += int(attn.sum()) * world
            tokens_run += int(attn.sum()) * world
        common.all_reduce_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0

        loss = common.all_reduce_sum(loss_sum) / n_global
        last = {"loss": loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                "tokens_seen": tokens_seen, "tokens_per_s": tokens_run / max(t_train, 1e-9)}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps and common.is_main():
            ev = evaluate(model, tokenizer, val, val_raw, problems, args, pad_id, device)
            ev.pop("_samples", None)
            last.update({f"eval/{k}": v for k, v in ev.items()})
        logger.log(step + 1, last)
        bar.set_postfix(loss=f"{loss:.4f}", **({"acc": f"{last['eval/accuracy']:.2f}"} if "eval/accuracy" in last else {}))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps:
            common.save_checkpoint(out, step + 1, model, optimizer, scheduler,
                                   data_state={"tokens_seen": tokens_seen, "before": before})

    # Final evaluation, outputs, summary.
    summary = {}
    if common.is_main():
        after = evaluate(model, tokenizer, val, val_raw, problems, args, pad_id, device)
        common.write_jsonl(out / "samples.jsonl", after.pop("_samples", []))
        logger.log(args.max_steps, {f"eval/{k}": v for k, v in after.items()})
        if args.full or args.train_tokens:
            model.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
        else:
            lora.save_adapter(model, out, base_model_name_or_path=None if args.model == "toy" else args.model)
        metric = "accuracy" if problems is not None else "val_loss"
        summary = {
            "method": "sft_think", "arm": "no_think" if args.no_think else "think",
            "heldout": {"metric": metric, "before": before.get(metric) if before else None, "after": after[metric],
                        **({"note": f"greedy, level{'s' * (',' in args.toy_difficulty)} {args.toy_difficulty}"} if args.data == "toy" else {})},
            "final_loss": last.get("loss"), "before": before, "after": after,
            "tokens_seen": tokens_seen, "tokens_per_s": tokens_run / max(t_train, 1e-9),
            "train_seconds": t_train, "peak_memory_mb": common.peak_memory_mb(device), "args": asdict(args),
        }
        common.atomic_write_json(out / "summary.json", summary)
        print(f"\n| arm | val loss | raw val loss | rep 4-gram | tokens seen | tok/s | memory MB |"
              f"{' accuracy |' if problems is not None else ''}\n|---|---|---|---|---|---|---|"
              f"{'---|' if problems is not None else ''}\n"
              f"| {summary['arm']} | {after['val_loss']:.4f} | {after['raw_val_loss']:.4f} | "
              f"{after.get('repetition_4gram', float('nan')):.4f} | {tokens_seen} | {summary['tokens_per_s']:.0f} | "
              f"{summary['peak_memory_mb']:.0f} |" + (f" {before['accuracy']:.3f} -> {after['accuracy']:.3f} |"
                                                     if problems is not None and before else ""))
    common.cleanup_distributed()
    return summary


if __name__ == "__main__":
    main(common.parse_args(Args))
