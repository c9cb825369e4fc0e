"""Pretrain the toy base model from scratch, or evaluate a toy model.

The corpus (train splits only) mixes the toy documents, plain arithmetic as a base model meets it in
pretraining text (word problems answered at once with their equation, bare equations, digit tables
and column drills on bare numbers, as in a textbook) and a share of chat-formatted questions
answered without thinking. The resulting base continues text, knows Qwen3's chat format, has never
seen a `<think>` block, and is weak at multi-digit word problems: it has much to gain from thinking
SFT and from RL. Pretraining is deterministic for a fixed seed and torch build.

Run (from the repo root):
    # rebuild toy/base (5-15 minutes on a 2-core CPU)
    python scripts/pretrain_toy.py
    # rebuild toy/student, the distillation student
    python scripts/pretrain_toy.py --student
    # the base's perplexity per domain and accuracy table
    python scripts/pretrain_toy.py --eval
    python scripts/pretrain_toy.py --eval --model toy/student
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root: toy and the building blocks

import cli  # noqa: E402
import rewards  # noqa: E402
from toy.model import (
    BASE_DIR,
    IM_END_ID,
    PAD_ID,
    STUDENT_DIR,
    load_model,
    load_tokenizer,  # noqa: E402
    student_config,
    tiny_config,
)
from toy.tasks import (
    DIFFICULTIES,
    DOMAINS,
    STYLES,
    _rng,
    _split_of,
    arithmetic,
    documents,  # noqa: E402
    instructions,
    scratchpad,
)


@dataclass
class Args:
    out: str | None = None
    """output directory (default toy/base, or toy/student with --student)"""
    student: bool = False
    """pretrain the smaller distillation student instead"""
    max_steps: int = 1600
    """optimizer steps"""
    batch_size: int = 4
    """rows of --seq-len tokens per step"""
    seq_len: int = 512
    """tokens per packed row"""
    lr: float = 1e-3
    """peak learning rate (AdamW, cosine to 10%); at 3e-3 this model never learns to copy a number
    """
    warmup_steps: int = 50
    """steps of linear warmup"""
    seed: int = 0
    """seed of the corpus and the initialisation"""
    threads: int = 2
    """torch CPU threads (speed only: 1 and 2 threads gave bit-identical weights)"""
    eval: bool = False
    """evaluate --model instead of pretraining"""
    model: str | None = None
    """model directory for --eval (default: the toy base)"""
    eval_size: int = 200
    """held-out problems per difficulty for --eval"""


# Share of each kind of text in the pretraining stream (by number of samples).
PRETRAIN_MIX = {
    "documents": 0.4,
    "plain_arithmetic": 0.42,
    "chat_arithmetic": 0.06,
    "chat_instructions": 0.12,
}


def _digit_fact(rng: random.Random) -> str:
    """One single-digit column fact in the scratchpad's notation (an addition/subtraction table
    row)."""
    x, y, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
    if rng.random() < 0.5:
        return f"{x}+{y}+{c}={x + y + c}"
    return f"1{x}-{y}-{c}={10 + x - y - c}" if x - y - c < 0 else f"{x}-{y}-{c}={x - y - c}"


def _plain_arithmetic_text(rng: random.Random, rec: dict) -> str:
    """Arithmetic as a base model meets it in pretraining text, never inside `<think>`: a word
    problem answered at once with its equation (`A: 15+24=39`), a bare equation, a row of
    single-digit facts, or a column drill on bare numbers (one operation worked digit by digit, as
    in a textbook)."""
    r = rng.random()
    if r < 0.45:
        return f"Q: {rec['prompt']}\nA: {rec['key']}={rec['value']}"
    if r < 0.55:
        return " ".join(_digit_fact(rng) for _ in range(8))
    first = re.match(r"\d+[+-]\d+", rec["key"]).group()  # the problem's first operation
    if _split_of(first) != "train":  # never drill a computation that is a held-out problem
        return f"Q: {rec['prompt']}\nA: {rec['key']}={rec['value']}"
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", first).groups()
    return scratchpad(int(a), [(op, int(b))])[0]


def pretrain_corpus(n_samples: int, seed: int = 0) -> list[str]:
    """The base model's training texts (train splits only), each ending with `<|endoftext|>`.

    Chat samples use Qwen3's template without reasoning, so the base knows the chat format and
    answers directly (`<think>\\n\\n</think>\\n\\n#### 632`), but has never seen a scratchpad.
    """
    tok = load_tokenizer()
    rng = _rng("pretrain", "train", seed)
    counts = {k: int(round(v * n_samples)) for k, v in PRETRAIN_MIX.items()}
    texts = [d["text"] for d in documents("train", counts["documents"], seed)]
    plain = arithmetic(
        "train", counts["plain_arithmetic"], seed, difficulty=[1, 1, 2, 2, 3, 3, 4, 5]
    )
    texts += [_plain_arithmetic_text(rng, r) for r in plain]
    per_style = counts["chat_arithmetic"] // len(STYLES) + 1
    for style in STYLES:
        for r in arithmetic("train", per_style, seed, difficulty=list(DIFFICULTIES), style=style):
            msgs = [r["messages"][0], {"role": "assistant", "content": r["messages"][1]["content"]}]
            texts.append(tok.apply_chat_template(msgs, tokenize=False))
    for r in instructions("train", counts["chat_instructions"], seed):
        msgs = [r["messages"][0], {"role": "assistant", "content": r["answer"]}]
        texts.append(tok.apply_chat_template(msgs, tokenize=False))
    rng.shuffle(texts)
    return [t + "<|endoftext|>" for t in texts]


def _pack(texts: list[str], seq_len: int):
    """Concatenate token ids and cut rows of seq_len + 1 (inputs and shifted targets)."""
    import torch

    tok = load_tokenizer()
    ids = [i for enc in tok(texts, add_special_tokens=False)["input_ids"] for i in enc]
    rows = len(ids) // (seq_len + 1)
    return torch.tensor(ids[: rows * (seq_len + 1)], dtype=torch.long).view(rows, seq_len + 1)


def pretrain(
    out_dir: str | Path = BASE_DIR,
    max_steps: int = 1600,
    batch_size: int = 4,
    seq_len: int = 512,
    lr: float = 1e-3,
    warmup: int = 50,
    seed: int = 0,
    threads: int = 2,
    config=None,
    progress: bool = True,
) -> Path:
    """Pretrain a toy model from scratch on `pretrain_corpus` and save it with its tokenizer.

    Deterministic for a fixed seed and torch build (1 and 2 threads gave bit-identical weights).
    AdamW, cosine schedule to 10%. The peak lr matters: at 3e-3 this model never learned to copy a
    number from earlier in the text (the skill every arithmetic format needs); at 1e-3 it does.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import Qwen3ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = config or tiny_config()
    model = Qwen3ForCausalLM(config)
    rows_needed = max_steps * batch_size
    n_samples = (
        rows_needed * (seq_len + 1) // 100
    )  # samples average over 100 tokens: enough to fill every step once
    data = _pack(pretrain_corpus(n_samples, seed), seq_len)
    if len(data) < rows_needed:
        raise RuntimeError(f"pretraining corpus too small: {len(data)} rows < {rows_needed}")
    data = data[:rows_needed]
    # weight decay on matrices only: decaying the RMSNorm gains (q_norm/k_norm included) would cap
    # how sharp attention can get, and copying digits needs sharp attention
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    # not lifecycle.cosine_schedule: its warmup starts from 0 (step / warmup), this one from lr /
    # warmup ((step + 1) / warmup), and the shipped toy/base was trained with this one
    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, max_steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0, bar = time.time(), tqdm(range(max_steps), desc="pretrain toy base", disable=not progress)
    for step in bar:
        batch = data[step * batch_size : (step + 1) * batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.time() - t0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.eos_token_id = [IM_END_ID, PAD_ID]
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out_dir)
    load_tokenizer().save_pretrained(out_dir)
    info = {
        "max_steps": max_steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "threads": threads,
        "tokens": max_steps * batch_size * seq_len,
        "seconds": round(seconds, 1),
        "final_loss": round(loss.item(), 4),
    }
    (out_dir / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return out_dir


def perplexity(model, texts: Sequence[str]) -> float:
    """Per-token perplexity exp(sum NLL / tokens) over texts (each scored alone, first token
    unscored)."""
    import torch

    tok, nll, count = load_tokenizer(), 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def greedy_complete(
    model,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    stop_ids: Sequence[int] = (IM_END_ID, PAD_ID),
) -> list[str]:
    """Greedy completions of raw prompt texts (left-padded batches; special tokens kept)."""
    import torch

    tok = load_tokenizer()
    tok.padding_side = "left"
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(
                list(prompts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stop_ids),
                pad_token_id=PAD_ID,
            )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                ids = row.tolist()
                cut = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
                out.append(tok.decode(ids[:cut]))
    return out


def arithmetic_accuracy(
    model, difficulty: int, n: int = 200, mode: str = "chat", seed: int = 0, style: str = "gsm8k"
) -> float:
    """Greedy accuracy on held-out problems. mode: "chat" (Qwen3 chat, thinking off: answer at
    once), "think" (Qwen3 chat, thinking on: the model writes its own scratchpad), "plain" (`Q:
    ...\nA:`, the pretraining format: the model writes the equation and its value on one line)."""
    tok = load_tokenizer()
    recs = arithmetic("test", n, seed, difficulty=difficulty, style=style)
    if mode == "plain":
        prompts = [f"Q: {r['prompt']}\nA:" for r in recs]
        outs = greedy_complete(model, prompts, 40, stop_ids=(PAD_ID, 5))  # one line: `A: 15+24=39`
        return (
            sum(rewards.correct(outs, [r["value"] for r in recs], ["gsm8k"] * n)) / n
        )  # the last number
    think = mode == "think"
    prompts = [
        tok.apply_chat_template(
            [r["messages"][0]], tokenize=False, add_generation_prompt=True, enable_thinking=think
        )
        for r in recs
    ]
    outs = greedy_complete(model, prompts, 256 if think else 24)
    return sum(rewards.correct(outs, [r["answer"] for r in recs], [style] * n)) / n


def evaluate(path: str | Path | None = None, n: int = 200, seed: int = 0) -> dict:
    """The toy base's report card: held-out perplexity per domain, arithmetic accuracy per level."""
    model = load_model(path)
    report = {
        "perplexity": {
            d: round(
                perplexity(model, [x["text"] for x in documents("test", n // 4, seed, [d])]), 3
            )
            for d in DOMAINS
        }
    }
    for mode in ("plain", "chat"):
        report[f"accuracy_{mode}"] = {
            d: arithmetic_accuracy(model, d, n, mode, seed) for d in DIFFICULTIES
        }
    return report


def main(args: Args) -> None:
    if args.eval:
        model = Path(args.model) if args.model else BASE_DIR
        if not (model / "config.json").exists():
            print(
                f"error: --model {model}: no config.json there (not a model directory)",
                file=sys.stderr,
            )
            raise SystemExit(2)
        print(json.dumps(evaluate(model, args.eval_size, args.seed), indent=1))
        return
    out = args.out or (STUDENT_DIR if args.student else BASE_DIR)
    out = pretrain(
        out,
        args.max_steps,
        args.batch_size,
        args.seq_len,
        args.lr,
        args.warmup_steps,
        args.seed,
        args.threads,
        config=student_config() if args.student else None,
    )
    print(json.loads((out / "pretrain_info.json").read_text()))


if __name__ == "__main__":
    main(cli.parse_args(Args))
