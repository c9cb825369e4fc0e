"""The toy worlds as the training scripts read them: train rows, held-out rows, and the held-out
problems graded for accuracy, from one flag value (`--data toy`, `--data toy-instructions`, ...).

- `sft_rows`: the worlds of thinking SFT (`SFT_WORLDS`): arithmetic with a scratchpad in one or
  more answer styles, instructions, document continuations with thoughts, plain documents;
- `distillation_rows`: toy arithmetic conversations with their answers, the data of distillation;
- `prompt_rows`, `thinking_prompt_rows`: the prompts of GRPO and of RLMT.
"""

from __future__ import annotations

import errors
from toy.judges import thinking_continuations
from toy.tasks import (
    DOMAINS,
    STYLES,
    arithmetic,
    continuations,
    documents,
    instructions,
    parse_levels,
)

SFT_WORLDS = ("toy", "toy-continuations", "toy-documents", "toy-instructions")


def text_only(rows: list[dict]) -> list[dict]:
    """{"text"} rows: the loss covers every token (the domain adapters of karcher_merge.py)."""
    return [{"text": r["text"]} for r in rows]


def mixed_arithmetic(split: str, n: int, seed: int, levels: list[int], styles: list[str]):
    """n arithmetic rows of `split`, the answer styles (--toy-styles) in turn."""
    if not set(styles) <= set(STYLES):
        raise errors.ConfigError(
            f"--toy-styles {','.join(styles)}: each must be one of {', '.join(STYLES)}"
        )
    per = [
        arithmetic(split, -(-n // len(styles)), seed=seed, difficulty=levels, style=st)
        for st in styles
    ]
    return [r for group in zip(*per) for r in group][:n]


def sft_rows(
    world: str,
    seed: int,
    train_size: int,
    eval_size: int,
    difficulty: str = "1,2,3",
    styles: str = "gsm8k",
    domains: str = "story,news,code",
):
    """(train rows, held-out rows, held-out problems graded for accuracy or None) of a world of
    SFT_WORLDS:

    - toy: arithmetic word problems of levels `difficulty` with a scratchpad thought, in the answer
      `styles` (comma-separated) in turn; the held-out rows are the problems;
    - toy-continuations: document prefixes, a thought restating their facts, the true continuation;
    - toy-documents: plain documents of `domains` (comma-separated), every token trained;
    - toy-instructions: reverse, sort, count... with a thought; the held-out rows are the problems.
    """
    if world == "toy":
        levels = parse_levels(difficulty)
        style_list = [x.strip() for x in styles.split(",") if x.strip()]
        train = mixed_arithmetic("train", train_size, seed, levels, style_list)
        heldout = mixed_arithmetic("test", eval_size, seed, levels, style_list)
        return train, heldout, heldout
    if world == "toy-continuations":
        return (
            thinking_continuations("train", train_size, seed=seed),
            thinking_continuations("test", eval_size, seed=seed),
            None,
        )
    if world == "toy-documents":
        domain_list = [x.strip() for x in domains.split(",") if x.strip()]
        if not domain_list or set(domain_list) - set(DOMAINS):
            raise errors.ConfigError(
                f"--toy-domains: {domains!r}; choose from {', '.join(DOMAINS)}"
            )
        return (
            text_only(documents("train", train_size, seed=seed, domains=domain_list)),
            text_only(documents("test", eval_size, seed=seed, domains=domain_list)),
            None,
        )
    if world == "toy-instructions":
        return (
            instructions("train", train_size, seed=seed),
            instructions("test", eval_size, seed=seed),
            instructions("test", eval_size, seed=seed),
        )
    raise errors.ConfigError(f"{world!r}: not a toy world of SFT; choose from {SFT_WORLDS}")


def distillation_rows(difficulty: str, train_size: int, eval_size: int, seed: int):
    """(train rows, held-out rows): toy arithmetic of levels `difficulty` as {"messages" (the
    question and the scratchpad answer), "answer", "style"}."""
    levels = parse_levels(difficulty)
    parts = []
    for split, size in (("train", train_size), ("test", eval_size)):
        rows = arithmetic(split, size, seed=seed, difficulty=levels)
        parts.append(
            [{"messages": r["messages"], "answer": r["answer"], "style": r["style"]} for r in rows]
        )
    return parts[0], parts[1]


def prompt_rows(task: str, split: str, n: int, seed: int, levels: list[int]) -> list[dict]:
    """The prompts of GRPO: arithmetic problems of `levels` as a one-message chat with the gold
    answer and its style (--task verifiable), or documents (continuation)."""
    if task != "verifiable":
        return documents(split, n, seed=seed)
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "answer": r["answer"],
            "style": r["style"],
        }
        for r in arithmetic(split, n, seed=seed, difficulty=levels)
    ]


def thinking_prompt_rows(
    split: str, n: int, data: str, task: str, seed: int, styles: str
) -> list[dict]:
    """The prompts of RLMT: document prefixes (--task continuation), word problems of levels 1-3
    in the answer formats of `styles` taken in turn (--data toy-arithmetic, eval_reasoning's toy
    benchmarks) or instructions, the last two as one-message chats."""
    if task == "continuation":
        return continuations(split, n, seed=seed)
    if data == "toy-arithmetic":
        rows = mixed_arithmetic(split, n, seed, [1, 2, 3], styles.split(","))
    else:
        rows = instructions(split, n, seed=seed)
    return [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
