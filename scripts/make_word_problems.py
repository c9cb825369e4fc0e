"""Grade-school word problems written for this repo, in GSM8K's format (a question; a worked answer
ending in `#### N`), for the real-model tour (scripts/real_tour.py). Made from templates by a seeded
program, never copied from a dataset: one- and two-step problems with small numbers, which a 135M
instruct model sometimes solves.

    # writes data/word_problems/{train,test}.jsonl (deterministic)
    python scripts/make_word_problems.py

Each row: {"question", "answer"} as GSM8K has them (eval_reasoning.py reads it as `--data
gsm8k=...`), plus "messages" (the user turn asks as eval_reasoning.py asks; the assistant turn
thinks in `<think>...</think>`, then answers: the thinking-SFT rows) and "prompt" (the user turn
alone: the GRPO rows; "answer" is then graded against the number after ####). Train and test share
no question.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = (
    "Solve the problem step by step. Give the final answer on the last line as '#### <number>'."
)
NAMES = [
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Sam", "he"),
    ("Zoe", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Omar", "he"),
    ("Nora", "she"),
    ("Ivan", "he"),
    ("Rosa", "she"),
    ("Theo", "he"),
]
ITEMS = [
    "apples",
    "stickers",
    "marbles",
    "pencils",
    "cookies",
    "stamps",
    "books",
    "shells",
    "cards",
    "beads",
]


def _problem(rng: random.Random) -> tuple[str, list[str], int]:
    """A question, the reasoning steps (each with its equation), and the answer."""
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    he_cap = he.capitalize()
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return (
            f"{name} has {a} {item}. {he_cap} gets {b} more. How many {item} does {name} have now?",
            [f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}."],
            a + b,
        )
    if kind == 1:
        a = rng.randint(10, 40)
        b = rng.randint(2, a - 1)
        return (
            f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} "
            "have left?",
            [f"{name} gives away {b} of {a}: {a} - {b} = {a - b}."],
            a - b,
        )
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (
            f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does "
            f"{name} buy?",
            [f"{a} boxes of {b} {item} each: {a} * {b} = {a * b}."],
            a * b,
        )
    if kind == 3:
        b, q = rng.randint(2, 6), rng.randint(2, 9)
        a = b * q
        return (
            f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend "
            "get?",
            [f"{a} {item} shared by {b} friends: {a} / {b} = {q}."],
            q,
        )
    if kind == 4:
        a, b, c = rng.randint(2, 20), rng.randint(2, 6), rng.randint(2, 9)
        return (
            f"{name} has {a} {item}. {he_cap} buys {b} packs with {c} {item} in each pack. "
            f"How many {item} does {name} have now?",
            [
                f"The packs hold {b} * {c} = {b * c} {item}.",
                f"In all: {a} + {b * c} = {a + b * c}.",
            ],
            a + b * c,
        )
    if kind == 5:
        a, b = rng.randint(3, 12), rng.randint(2, 8)
        c = rng.randint(1, a * b - 1)
        return (
            f"{name} earns {a} dollars an hour and works {b} hours. Then {he} spends {c} dollars. "
            f"How many dollars does {name} have left?",
            [
                f"{name} earns {a} * {b} = {a * b} dollars.",
                f"After spending: {a * b} - {c} = {a * b - c}.",
            ],
            a * b - c,
        )
    a, b, c = rng.randint(5, 30), rng.randint(2, 20), rng.randint(2, 20)
    return (
        f"{name} has {a} {item}. {he_cap} finds {b} more, then loses {min(c, a + b - 1)}. "
        f"How many {item} does {name} have?",
        [
            f"After finding some: {a} + {b} = {a + b}.",
            f"After losing some: {a + b} - {min(c, a + b - 1)} = {a + b - min(c, a + b - 1)}.",
        ],
        a + b - min(c, a + b - 1),
    )


def row(question: str, steps: list[str], value: int) -> dict:
    user = f"{question}\n\n{INSTRUCTION}"
    worked = "\n".join(steps)
    return {
        "question": question,
        "answer": f"{worked}\n#### {value}",
        "prompt": [{"role": "user", "content": user}],
        "messages": [
            {"role": "user", "content": user},
            {
                "role": "assistant",
                "content": f"<think>\n{worked}\n</think>\n\n{steps[-1]}\n#### {value}",
            },
        ],
    }


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_test:
        question, steps, value = _problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append(row(question, steps, value))
    return rows[:n_train], rows[n_train:]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "data" / "word_problems"))
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train, test = make(a.train, a.test, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} train and {len(test)} test problems to {out}")


if __name__ == "__main__":
    main()
