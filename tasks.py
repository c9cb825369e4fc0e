"""What each trainer trains and is evaluated on: rows of the toy world or of --data (split by
dataio.train_and_heldout, the held-out rule of every script), checked and encoded for the policy.
A bad row is a DataError naming its file and line.

- `rl_prompts` (grpo.py): prompts with gold answers, or document prefixes with their true
  continuation;
- `thinking_prompts` (rlmt.py): requests or document prefixes, the prompt ending in an opened
  thought;
- `document_windows` (dpo_online.py): documents cut into a prefix and the original suffix;
- `distillation_examples` (gkd.py): prompts with the data's target completion.
"""

from __future__ import annotations

import chat
import dataio
import errors
import sampling
import toy
from answers import THINK_CLOSE, THINK_OPEN


def rl_prompts(tokenizer, args) -> tuple[list[dict], list[dict]]:
    """grpo.py's training and held-out prompts, each {"ids": prompt ids, "prompt": readable text,
    + the reward columns ('answer', 'reference', 'domain', ...)}: toy arithmetic (--task
    verifiable) or toy documents (continuation) by default."""
    if args.data == "toy":
        levels = toy.parse_levels(args.toy_difficulty)
        parts = [
            (
                "toy",
                toy.datasets.prompt_rows(
                    args.task, "train", args.toy_train_size, args.seed, levels
                ),
            ),
            ("toy", toy.datasets.prompt_rows(args.task, "test", args.eval_size, args.seed, levels)),
        ]
    else:
        parts = dataio.train_and_heldout(args.data, args.eval_data, args.eval_size)
    encoded = []
    for source, rows in parts:
        if args.task == "continuation":
            rows = documents_as_prompts(
                rows, tokenizer, source, args.prefix_tokens, args.continuation_tokens
            )
            for i, r in enumerate(rows):
                if r.get("reference") is None:
                    raise errors.DataError(
                        f"{source}:{r.get('_line', i + 1)}: field 'reference': missing; the "
                        f"continuation task scores similarity to it"
                    )
        encoded.append(sampling.encode_prompts(rows, tokenizer, source, args.max_prompt_length))
    return encoded[0], encoded[1]


def documents_as_prompts(
    rows: list[dict], tokenizer, source: str, prefix_tokens: int, continuation_tokens: int
) -> list[dict]:
    """Plain documents ({'text'}) cut by tokens (sampling.cut_documents) into a prefix (the prompt)
    and the true continuation (the reference); rows that already have a prompt pass through."""
    docs = [i for i, row in enumerate(rows) if "text" in row and "prompt" not in row]
    windows, _ = sampling.cut_documents(
        [{"_line": i + 1, **rows[i]} for i in docs],
        tokenizer,
        source,
        prefix_tokens,
        continuation_tokens,
        min_tokens=prefix_tokens + 1,
        too_short=f"; the continuation task needs more than --prefix-tokens {prefix_tokens}",
    )
    out = list(rows)
    for i, window in zip(docs, windows):
        out[i] = {
            **{k: v for k, v in rows[i].items() if k != "text"},
            "prompt": window["prefix"],
            "reference": window["continuation"],
        }
    return out


def thinking_prompts(tokenizer, args, toy_train_size: int | None = None):
    """rlmt.py's training and held-out prompts (at most --gate-prefixes held-out rows). The
    policy's prompt ends in `<think>\\n`: the chat template's assistant header (--task chat) or the
    document prefix (continuation), then the opened thought; "judge_prompt" is what the judge sees
    (the request or the prefix, never the opened thought). `toy_train_size` overrides
    --toy-train-size (the gate needs held-out rows only)."""
    data, task, seed, n_eval = args.data, args.task, args.seed, args.gate_prefixes
    n_train = args.toy_train_size if toy_train_size is None else toy_train_size
    if data in ("toy", "toy-arithmetic"):
        if task == "continuation" and data == "toy-arithmetic":
            raise errors.ConfigError(
                "--data toy-arithmetic is a chat task: drop --task continuation"
            )
        parts = [
            (data, toy.datasets.thinking_prompt_rows(split, n, data, task, seed, args.toy_styles))
            for split, n in (("train", n_train), ("test", n_eval))
        ]
    else:
        parts = dataio.train_and_heldout(data, args.eval_data, n_eval)
    # one line on stderr when </think> is several tokens of this tokenizer
    chat.marker_ids(tokenizer, THINK_CLOSE, warn="rlmt.py")
    opened = tokenizer(THINK_OPEN + "\n", add_special_tokens=False)["input_ids"]
    out = []
    for source, rows in parts:
        for i, r in enumerate(rows):
            if task == "continuation" and not isinstance(r.get("reference"), str):
                raise errors.DataError(
                    f"{source}:{r.get('_line', i + 1)}: field 'reference': missing or not a "
                    f"string; the continuation task judges against it"
                )
        enc = sampling.encode_prompts(rows, tokenizer, source, args.max_prompt_length)
        out.append(
            [
                {**e, "judge_prompt": r["prompt"], "ids": e["ids"] + opened}
                for e, r in zip(enc, rows)
            ]
        )
    return out[0], out[1]


def document_windows(tokenizer, args) -> tuple[list[dict], list[dict], int]:
    """dpo_online.py's training and held-out windows ({"prefix", "prefix_ids", "suffix", ...}; toy
    documents by default), and the number of short documents skipped."""
    if args.data == "toy":
        # twice the documents asked for: the ones shorter than prefix + suffix are skipped, then the
        # rest is cut to size
        parts = [
            ("toy train", toy.documents("train", 2 * args.toy_train_size, seed=args.seed)),
            ("toy test", toy.documents("test", 2 * args.eval_size, seed=args.seed)),
        ]
    else:
        parts = dataio.train_and_heldout(
            args.data, args.eval_data, args.eval_size, required=("text",)
        )
    P, S = args.prefix_tokens, args.suffix_tokens
    too_short = f", shorter than --prefix-tokens {P} + --suffix-tokens {S} (or pass "
    too_short += "--skip-short-documents)"
    cut = [
        sampling.cut_documents(
            rows,
            tokenizer,
            source,
            P,
            S,
            min_tokens=P + S,
            too_short=None if args.skip_short_documents else too_short,
        )
        for source, rows in parts
    ]
    for (source, _), (windows, _) in zip(parts, cut):
        if not windows:
            raise errors.DataError(
                f"{source}: no document has --prefix-tokens + --suffix-tokens "
                f"{args.prefix_tokens + args.suffix_tokens} tokens"
            )
    if args.data == "toy":
        return cut[0][0][: args.toy_train_size], cut[1][0][: args.eval_size], 0
    return cut[0][0], cut[1][0], cut[0][1] + cut[1][1]


def distillation_examples(tokenizer, args) -> tuple[list[dict], list[dict]]:
    """gkd.py's (train, held-out) rows: toy arithmetic with its scratchpads by default. Every
    training row needs a target unless the student writes all of them (--lmbda 1, or --loss
    reverse-kl-pg) or the teacher does (--seq-kd)."""
    if args.data == "toy":
        rows = toy.distillation_rows(
            args.toy_difficulty, args.toy_train_size, args.eval_size, args.seed
        )
        parts = [("toy", r) for r in rows]
    else:
        parts = dataio.train_and_heldout(args.data, args.eval_data, args.eval_size)
    train, heldout = [
        encode_examples(rows, tokenizer, source, args.max_prompt_length, args.max_length)
        for source, rows in parts
    ]
    if args.lmbda < 1 and not args.seq_kd and args.loss != "reverse-kl-pg":
        missing = next((i for i, r in enumerate(train) if r["target"] is None), None)
        if missing is not None:
            raise errors.DataError(
                f"{args.data}:{missing + 1}: no target (field 'completion' or an assistant turn), "
                f"which --lmbda {args.lmbda} < 1 trains on; pass --lmbda 1 or --seq-kd"
            )
    return train, heldout


def encode_examples(
    rows: list[dict], tokenizer, source: str, max_prompt_length: int, max_length: int
) -> list[dict]:
    """Each row as {"ids": prompt ids, "target": target ids or None, "prompt": text, + its
    columns}: chat.split_conversation, the prompt through sampling.encode_prompts."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        prompt, target = chat.split_conversation(row, tokenizer, where)
        enc = sampling.encode_prompts(
            [{**row, "prompt": prompt, "_line": row.get("_line", i + 1)}],
            tokenizer,
            source,
            max_prompt_length,
        )[0]
        ids = chat.target_ids(target, tokenizer, where, max_length)
        enc.pop("messages", None)
        out.append({**enc, "target": ids})
    return out
