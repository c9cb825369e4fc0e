"""The toy world: a tiny Qwen3 with a character tokenizer, synthetic tasks and toy judges.

Every script in this repo runs with no arguments on this world, on a 2-core CPU, in minutes, and
shows its metric move. The world is small enough to train in minutes and rich enough for every
method in the repo:

- **Tokenizer** (`load_tokenizer`): one token per character (printable ASCII and newline) plus
  Qwen3's five special tokens, as a `PreTrainedTokenizerFast` carrying Qwen3's own chat template
  (`CHAT_TEMPLATE`, byte-identical to Qwen3's, so the same messages render to the same text) and a
  training variant (`TRAINING_CHAT_TEMPLATE`) that keeps `<think>...</think>` on every assistant
  turn and wraps assistant output in `{% generation %}` tags for assistant-only losses. Token ids::

      0 <|endoftext|> (pad)   1 <|im_start|>   2 <|im_end|> (eos)   3 <think>   4 </think>
      5 "\\n"   6..100 the printable ASCII characters " " (32) .. "~" (126), in code-point order

  The models' vocabulary is padded to 128 rows (as Qwen3 pads 151,669 tokens to 151,936).
- **Configs** (`tiny_config`, `student_config`): Qwen3 with GQA and qk-norm, tied embeddings.
- **Tasks**, each a seeded generator with train and test splits that are disjoint by construction
  (a problem's split is a hash of its content, see `_split_of`):
    * `arithmetic`: word problems with a digit-by-digit `<think>` scratchpad, rendered GSM8K-style
      (`#### N`), MATH-style (`\\boxed{N}`) or as 4-way multiple choice (`Answer: C`), with
      difficulty levels 1..5 (`DIFFICULTIES`);
    * `documents`: three domains with distinct styles (`story`, `news`, `code`), generated from
      small grammars whose facts a program can check (names, counts, clock times, values);
      `continuations` cuts them into prefix / true continuation pairs;
    * `instructions`: short instructions whose answer a program computes (reverse, sort, count...).
- **Judges** (duck-typed stand-ins for an LLM judge): `AnswerJudge.score` grades the final answer
  of an instruction; `ContinuationJudge.prefer` says which of two continuations of a document
  prefix is more consistent with the prefix under the document grammar.
- **The toy base model** (`base_model_dir`, shipped in `toy/base/`): pretrained by
  `python toy.py pretrain` on the documents, plain arithmetic (word problems answered at once with
  their equation, bare equations, digit tables and column drills on bare numbers, as in a
  textbook) and a share of chat-formatted questions answered without thinking. It continues text,
  knows the chat format, has never seen a `<think>` block, is weak at multi-digit word problems,
  and has much to gain from thinking SFT and from RL. `student_model_dir()` is a smaller model
  pretrained the same way, for distillation.

Commands::

    python toy.py pretrain              # rebuild toy/base (deterministic; a few minutes on 2 cores)
    python toy.py eval                  # the base model's perplexity per domain and accuracy table
    python toy.py export --out data/    # every task as JSONL in the repo's data schemas
    python toy.py show                  # print one example of every task
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

TOY_DIR = Path(__file__).resolve().parent / "toy"
BASE_DIR = TOY_DIR / "base"
STUDENT_DIR = TOY_DIR / "student"

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3 marks <think> and </think> as non-special (they survive skip_special_tokens=True).
_SPECIAL_FLAG = {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True,
                 "<think>": False, "</think>": False}
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB = SPECIAL_TOKENS + CHARS  # id = position; fixed forever (the shipped base depends on it)
PAD_ID, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID = range(5)
MODEL_VOCAB_SIZE = 128  # embedding rows: len(VOCAB) = 101 padded to a multiple of 64

CHAT_TEMPLATE = (TOY_DIR / "chat_template.jinja").read_text()
"""Qwen3's chat template, byte for byte (from Qwen3's tokenizer_config.json)."""
TRAINING_CHAT_TEMPLATE = (TOY_DIR / "chat_template_training.jinja").read_text()
"""Qwen3's template for training: every assistant turn renders `<think>\\n{reasoning}\\n</think>\\n\\n`
(empty reasoning gives the empty block Qwen3 writes when thinking is off) and its output, from
`<think>` through `<|im_end|>`, sits in `{% generation %}`; the role header and the newline after
`<|im_end|>` stay outside (the model never generates them: it stops at `<|im_end|>`)."""


def load_tokenizer(chat_template: str | None = None):
    """The toy character tokenizer as a `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad `<|endoftext|>`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # BPE without merges over a character vocabulary = one token per character; no pre-tokenizer,
    # so spaces and newlines are ordinary characters. Characters outside the vocabulary are dropped.
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[]))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if _SPECIAL_FLAG[t]])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS if not _SPECIAL_FLAG[t]])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        chat_template=chat_template or CHAT_TEMPLATE,
    )
    return tok


# ----------------------------------------------------------------------------------------------
# Model configs
# ----------------------------------------------------------------------------------------------


def tiny_config(vocab_size: int | None = None):
    """The toy base model's Qwen3Config: 0.8M parameters, hidden 128, 4 layers, GQA 4/2 heads."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size or MODEL_VOCAB_SIZE, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID,
        initializer_range=0.02, use_cache=True,
    )


def student_config(vocab_size: int | None = None):
    """A smaller Qwen3Config (0.1M parameters: hidden 64, 2 layers) for distillation students."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size or MODEL_VOCAB_SIZE, hidden_size=64, intermediate_size=192,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID,
        initializer_range=0.02, use_cache=True,
    )


# ----------------------------------------------------------------------------------------------
# Splits: disjoint by construction
# ----------------------------------------------------------------------------------------------

SPLITS = ("train", "test")
TEST_SHARE = 10  # one bucket in ten is held out


def _split_of(key: str) -> str:
    """A problem's split is a function of its content (stable hash), so train and test never share one."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % TEST_SHARE
    return "test" if bucket == 0 else "train"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _rng(task: str, split: str, seed: int) -> random.Random:
    # one independent stream per (task, split, seed); string seeds hash with sha512, not Python's salted hash
    return random.Random(f"{task}/{split}/{seed}")


def _generate(task: str, split: str, n: int, seed: int, make, key) -> list[dict]:
    """Draw from make(rng) until n items of `split` are found (split decided by key(item))."""
    _check_split(split)
    rng, out, tries = _rng(task, split, seed), [], 0
    while len(out) < n:
        item = make(rng)
        tries += 1
        if _split_of(key(item)) == split:
            out.append(item)
        if tries > 1000 * (n + 10):
            raise RuntimeError(f"toy.{task}: could not draw {n} {split} items")
    return out


# ----------------------------------------------------------------------------------------------
# Arithmetic word problems with a digit-by-digit scratchpad
# ----------------------------------------------------------------------------------------------

# level -> (digits of every operand, number of operations, allowed operations)
DIFFICULTIES = {
    1: dict(digits=2, steps=1, ops="+"),    # 47+85
    2: dict(digits=3, steps=1, ops="+-"),   # 347+285, 632-285
    3: dict(digits=3, steps=2, ops="+-"),   # 347+285-120
    4: dict(digits=4, steps=2, ops="+-"),   # 4347+2855-1200
    5: dict(digits=4, steps=3, ops="+-"),   # three operations on 4-digit numbers
}
STYLES = ("gsm8k", "math", "mc")
_PEOPLE = [("Ann", "She"), ("Ben", "He"), ("Kim", "She"), ("Raj", "He"), ("Eva", "She"),
           ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Zoe", "She"), ("Max", "He")]
_THINGS = ["apples", "coins", "pens", "books", "shells", "cards", "stamps", "beads", "eggs", "nuts"]
_ADD = ["gets {} more", "buys {} more", "finds {} more", "wins {} more"]
_SUB = ["gives away {}", "sells {}", "loses {}", "uses {}"]


def _column_add(a: int, b: int) -> tuple[list[str], int]:
    """Right-to-left columns `x+y+carry=sum` (one line each) for a+b."""
    da, db, lines, carry = str(a)[::-1], str(b)[::-1], [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return lines, a + b


def _column_sub(a: int, b: int) -> tuple[list[str], int]:
    """Right-to-left columns for a-b (a >= b): `x-y-borrow=d`, or `1x-y-borrow=d` when the column borrows."""
    da, db, lines, borrow = str(a)[::-1], str(b)[::-1], [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        if x - y - borrow < 0:
            lines.append(f"1{x}-{y}-{borrow}={10 + x - y - borrow}")
            borrow = 1
        else:
            lines.append(f"{x}-{y}-{borrow}={x - y - borrow}")
            borrow = 0
    return lines, a - b


def scratchpad(start: int, ops: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """The `<think>` text for start op1 x1 op2 x2 ...: per operation a header, columns, `=result`.

    Example for 347+285-120::

        347+285
        7+5+0=12
        4+8+1=13
        3+2+1=6
        =632
        632-120
        ...
    """
    lines, value = [], start
    for op, x in ops:
        lines.append(f"{value}{op}{x}")
        cols, value = (_column_add if op == "+" else _column_sub)(value, x)
        lines += cols
        lines.append(f"={value}")
    return "\n".join(lines), value


def _draw_problem(rng: random.Random, level: int) -> tuple[int, list[tuple[str, int]]]:
    spec = DIFFICULTIES[level]
    lo, hi = 10 ** (spec["digits"] - 1), 10 ** spec["digits"] - 1
    value = rng.randint(lo, hi)
    start, ops = value, []
    for _ in range(spec["steps"]):
        op = rng.choice(spec["ops"])
        if op == "-" and value < lo:
            op = "+"
        x = rng.randint(lo, hi) if op == "+" else rng.randint(lo, min(hi, value))
        ops.append((op, x))
        value = value + x if op == "+" else value - x
    return start, ops


def _question(rng: random.Random, start: int, ops: list[tuple[str, int]]) -> str:
    (name, pron), thing = rng.choice(_PEOPLE), rng.choice(_THINGS)
    clauses = [rng.choice(_ADD if op == "+" else _SUB).format(x) for op, x in ops]
    if len(clauses) == 1:
        told = clauses[0]
    else:
        told = ", ".join(clauses[:-1]) + ", then " + clauses[-1]
    return f"{name} has {start} {thing}. {pron} {told}. How many {thing} now?"


def _distractors(rng: random.Random, answer: int) -> list[int]:
    """Three wrong options that look like slips: a dropped carry, a swapped digit, an off-by-ten."""
    cands = [answer + 10, answer - 10, answer + 100, answer - 100, answer + 1, answer - 1, answer + 9]
    s = str(answer)
    if len(s) > 1:
        cands.append(int(s[:-2] + s[-1] + s[-2]))  # last two digits swapped
    out = []
    for c in rng.sample(cands, len(cands)):
        if c >= 0 and c != answer and c not in out:
            out.append(c)
        if len(out) == 3:
            break
    return out


def parse_levels(text: str | int) -> list[int]:
    """'1,2,3' or '3' (a command-line flag) -> [1, 2, 3]; a clear error for anything else."""
    try:
        levels = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"difficulty: expected comma-separated levels such as '1,2,3', got {text!r}") from None
    if not levels:
        raise ValueError(f"difficulty: expected at least one level, got {text!r}")
    return _levels(levels)


def _levels(difficulty) -> list[int]:
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    for d in levels:
        if d not in DIFFICULTIES:
            raise ValueError(f"difficulty must be in {sorted(DIFFICULTIES)} (or a list of them), got {d!r}")
    return levels


def arithmetic(split: str = "train", n: int = 1000, seed: int = 0, difficulty: int | Sequence[int] = 2,
               style: str = "gsm8k") -> list[dict]:
    """Arithmetic word problems with a digit-by-digit scratchpad.

    difficulty: a level of `DIFFICULTIES` or a list of levels (drawn uniformly).
    style: "gsm8k" (final line `#### N`), "math" (`\\boxed{N}`), "mc" (choices A-D, `Answer: X`).
    Each record: messages (user question; assistant with reasoning_content = scratchpad and
    content = final answer line), prompt, answer (the number; the letter for "mc"), value (the
    number), reasoning, difficulty, style. Split membership hashes the computation (not the
    wording), so no held-out computation is ever trained on.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    levels = _levels(difficulty)

    def make(rng):
        level = rng.choice(levels)
        start, ops = _draw_problem(rng, level)
        question = _question(rng, start, ops)
        reasoning, value = scratchpad(start, ops)
        rec = {"prompt": question, "answer": str(value), "value": str(value), "reasoning": reasoning,
               "difficulty": level, "style": style, "key": f"{start}" + "".join(f"{o}{x}" for o, x in ops)}
        if style == "gsm8k":
            final = f"#### {value}"
        elif style == "math":
            final = f"\\boxed{{{value}}}"
        else:
            options = _distractors(rng, value) + [value]
            rng.shuffle(options)
            letter = "ABCD"[options.index(value)]
            rec["prompt"] = question + "\n" + "\n".join(f"{L}) {o}" for L, o in zip("ABCD", options))
            rec["answer"], rec["choices"] = letter, [str(o) for o in options]
            final = f"Answer: {letter}"
        rec["messages"] = [{"role": "user", "content": rec["prompt"]},
                           {"role": "assistant", "reasoning_content": reasoning, "content": final}]
        return rec

    return _generate(f"arithmetic{levels}{style}", split, n, seed, make, key=lambda r: r["key"])


_BOXED = re.compile(r"\\boxed\{")


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces matched."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def final_answer_text(text: str) -> str | None:
    """The part of a completion after the last `</think>`; None if a `<think>` was opened and never closed."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def extract_answer(text: str, style: str = "gsm8k") -> str | None:
    """The toy answer in a completion (after `</think>` if present), or None.

    gsm8k: `#### N`, else `The answer is N`, else the last number; math: the last `\\boxed{}`;
    mc: `Answer: X` (X in A-D), else a lone letter. Numbers lose commas and a trailing `.0`.
    """
    text = final_answer_text(text)
    if text is None:
        return None
    if style == "mc":
        m = re.findall(r"Answer:\s*\(?([A-D])\b", text) or re.findall(r"^\s*\(?([A-D])\)?\s*$", text, re.M)
        return m[-1] if m else None
    if style == "math":
        ans = _last_boxed(text)
        return None if ans is None else _norm_number(ans)
    m = re.findall(r"####\s*(-?[\d,]+(?:\.\d+)?)", text) or re.findall(r"answer is\s*(-?[\d,]+(?:\.\d+)?)", text)
    if not m:
        m = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return _norm_number(m[-1]) if m else None


def _norm_number(s: str) -> str:
    s = s.strip().replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def check_arithmetic(completion: str, answer: str, style: str = "gsm8k") -> bool:
    """True when the completion's extracted answer equals the canonical answer."""
    got = extract_answer(completion, style)
    return got is not None and got == (answer if style == "mc" else _norm_number(answer))


# ----------------------------------------------------------------------------------------------
# Documents: three domains from small grammars with checkable facts
# ----------------------------------------------------------------------------------------------

DOMAINS = ("story", "news", "code")

# story: animals count their things; every event is dated and states the counts it leads to
_S_NAMES = ["Milo", "Lily", "Ruby", "Otto", "Nina", "Finn", "Rosa", "Hugo", "Ivy", "Leo", "Maya", "Theo"]
_S_ANIMALS = ["fox", "owl", "rabbit", "bear", "mouse", "duck", "frog", "deer", "crow", "hare"]
_S_PLACES = ["by the river", "in the old forest", "on a green hill", "near the lake", "under a big oak",
             "at the edge of the meadow"]
_S_ITEMS = [("acorn", "acorns"), ("apple", "apples"), ("shell", "shells"), ("berry", "berries"),
            ("stone", "stones"), ("feather", "feathers"), ("nut", "nuts"), ("pebble", "pebbles")]
_S_WHEN = [f"On {day} {part}" for day in ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
           for part in ["morning", "afternoon", "evening"]]  # strictly increasing through a story
_S_GAIN = ["found", "picked up", "dug up"]
_S_LOSE = ["lost", "dropped", "ate"]
# news: a council vote reported minute by minute with a running tally
_N_CITIES = ["Harbor City", "Riverton", "Oakdale", "Lakeview", "Stonebridge", "Millbrook", "Westfield",
             "Pine Falls", "Redwater", "Elmstead"]
_N_PROJECTS = ["library", "bridge", "school", "park", "bus line", "stadium", "clinic", "market hall"]
_N_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
             "October", "November", "December"]
_N_FIRST = ["Ada", "Omar", "Grace", "Ivan", "Lena", "Marco", "Priya", "Sam", "Tara", "Victor", "Nora", "Felix"]
_N_LAST = ["Reyes", "Hale", "Novak", "Okafor", "Brandt", "Chen", "Duarte", "Evans", "Kowal", "Moreau",
           "Singh", "Larsen"]
_N_OPINIONS = ["said the {p} was badly needed", "said the {p} would help local shops",
               "warned that the {p} would take years to build", "asked for more time to study the {p}"]
# code: small Python-like functions, each followed by a call whose printed value is a comment
_C_VERBS = ["scale", "mix", "shift", "merge", "count", "blend", "step", "pack", "fold", "spin"]
_C_NOUNS = ["total", "score", "value", "price", "size", "level", "rate", "sum"]
_C_PARAMS = [("a", "b"), ("x", "y"), ("n", "m"), ("p", "q"), ("u", "v")]
_C_LOCALS = ["c", "d", "e", "f", "g", "h", "k", "r", "s", "t", "w", "z"]
_C_CONSTS = ["RATE", "BASE", "STEP", "LIMIT", "SCALE", "OFFSET"]


def _noun(k: int, item: tuple[str, str]) -> str:
    return f"{k} {item[0] if k == 1 else item[1]}"


def _story_lines(rng: random.Random) -> list[str]:
    k = rng.choice([2, 2, 3])
    names = rng.sample(_S_NAMES, k)
    animals = rng.sample(_S_ANIMALS, k)
    item = rng.choice(_S_ITEMS)
    who = [f"{n} the {a}" for n, a in zip(names, animals)]
    lines = [f"{', '.join(who[:-1])} and {who[-1]} lived {rng.choice(_S_PLACES)}."]
    count = {n: rng.randint(1, 9) for n in names}
    held = [f"{names[0]} had {_noun(count[names[0]], item)}"] + [f"{n} had {count[n]}" for n in names[1:]]
    lines.append(f"{', '.join(held[:-1])} and {held[-1]}.")
    n_events = rng.randint(4, 7)
    for e, slot in enumerate(sorted(rng.sample(range(len(_S_WHEN)), n_events))):
        when, x = _S_WHEN[slot], rng.choice(names)
        kind = rng.choice(["gain", "lose", "give", "give", "count"]) if e else "gain"
        if kind in ("lose", "give") and count[x] == 0:
            kind = "gain"
        if kind == "gain":
            q = rng.randint(1, 6)
            count[x] += q
            lines.append(f"{when}, {x} {rng.choice(_S_GAIN)} {_noun(q, item)}, so {x} had {count[x]}.")
        elif kind == "lose":
            q = rng.randint(1, count[x])
            count[x] -= q
            lines.append(f"{when}, {x} {rng.choice(_S_LOSE)} {_noun(q, item)}, so {x} had {count[x]}.")
        elif kind == "give":
            y = rng.choice([n for n in names if n != x])
            q = rng.randint(1, count[x])
            count[x] -= q
            count[y] += q
            lines.append(f"{when}, {x} gave {_noun(q, item)} to {y}, so {x} had {count[x]} and {y} had {count[y]}.")
        else:
            lines.append(f"{when}, they counted {_noun(sum(count.values()), item)} in all.")
    lines.append(rng.choice(["That night, everyone went to sleep.", f"That night, {names[0]} went to sleep."]))
    return lines


def _clock(minute: int) -> str:
    return f"{minute // 60}:{minute % 60:02d}"


def _news_lines(rng: random.Random) -> list[str]:
    city, project = rng.choice(_N_CITIES), rng.choice(_N_PROJECTS)
    members = rng.choice([5, 7, 9, 11])
    firsts, lasts = rng.sample(_N_FIRST, 3), rng.sample(_N_LAST, 3)
    minute, cost = 9 * 60 + rng.choice([0, 15, 30]), rng.randint(2, 90)
    lines = [f"{city.upper()}, {rng.choice(_N_MONTHS)} {rng.randint(1, 28)} - "
             f"The {city} council met to vote on a new {project} costing {cost} million dollars.",
             f"The council has {members} members, and Mayor {firsts[0]} {lasts[0]} opened the meeting at {_clock(minute)}.",
             f"Council members {firsts[1]} {lasts[1]} and {firsts[2]} {lasts[2]} spoke first."]
    voters = rng.randint(members // 2 + 1, members)
    yes = rng.randint(0, voters)
    events = []  # yes and no votes split into a few timed reports, remarks in between
    for side, total in (("yes", yes), ("no", voters - yes)):
        while total > 0:
            q = rng.randint(1, total)
            events.append((side, q))
            total -= q
    rng.shuffle(events)
    events.insert(0, ("cost", lasts[0]))
    for speaker in rng.sample(lasts, rng.randint(1, 2)):
        events.insert(rng.randint(1, len(events)), ("remark", speaker))
    y = n = 0
    for kind, arg in events:
        minute += rng.randint(3, 25)
        at = f"At {_clock(minute)}, "
        if kind == "cost":
            lines.append(f"{at}{arg} said the {project} would cost {cost} million dollars.")
        elif kind == "remark":
            said = rng.choice(_N_OPINIONS + ["said {c} million dollars was too much"])
            lines.append(f"{at}{arg} {said.format(p=project, c=cost)}.")
        else:
            y, n = (y + arg, n) if kind == "yes" else (y, n + arg)
            lines.append(f"{at}{_members(arg)} voted {kind}, making the tally {y} to {n}.")
    minute += rng.randint(3, 25)
    lines.append(f"The vote ended at {_clock(minute)}, and the {project} plan "
                 f"{'passed' if y > n else 'failed'} {y} to {n}.")
    return lines


def _members(q: int) -> str:
    return "1 member" if q == 1 else f"{q} members"


def _code_blocks(rng: random.Random) -> list[str]:
    """A module constant, then 2-3 functions; each body is a chain (every local feeds the next) that
    uses every parameter and the constant, later functions may call earlier ones, and each function
    is followed by a call and its printed value."""
    const, const_value = rng.choice(_C_CONSTS), rng.randint(2, 9)
    blocks, funcs, consts = [f"{const} = {const_value}"], {}, {const: const_value}
    for _ in range(rng.randint(2, 3)):
        name = f"{rng.choice(_C_VERBS)}_{rng.choice(_C_NOUNS)}"
        while name in funcs:
            name = f"{rng.choice(_C_VERBS)}_{rng.choice(_C_NOUNS)}"
        params = list(rng.choice(_C_PARAMS))
        local_names = rng.sample(_C_LOCALS, rng.randint(2, 4))
        body, prev, unused, used_mul = [], params[0], rng.sample([params[1], const], 2), False
        call_at = rng.randrange(len(local_names)) if funcs and rng.random() < 0.6 else -1
        for i, v in enumerate(local_names):
            if i == call_at:
                body.append((v, rng.choice(sorted(funcs)), prev, unused.pop() if unused else str(rng.randint(1, 5))))
            else:
                must = len(unused) >= len(local_names) - i  # every parameter and the constant get used
                other = unused.pop() if unused and (must or rng.random() < 0.5) else str(rng.randint(1, 9))
                op = "*" if not used_mul and other.isdigit() and int(other) <= 4 and rng.random() < 0.4 else rng.choice("+-")
                used_mul |= op == "*"
                body.append((v, prev, op, other))
            prev = v
        args = [rng.randint(1, 9) for _ in params]
        funcs[name] = (params, body, local_names[-1])
        value = _run_function(funcs, name, args, consts)
        lines = [f"def {name}({', '.join(params)}):"]
        for v, x, op, y in body:
            lines.append(f"    {v} = {x}({op}, {y})" if x in funcs else f"    {v} = {x} {op} {y}")
        lines.append(f"    return {local_names[-1]}")
        lines.append(f"print({name}({', '.join(map(str, args))}))  # {value}")
        blocks.append("\n".join(lines))
    return blocks


def _run_function(funcs: dict, name: str, args: Sequence[int], consts: dict) -> int:
    """Interpret a toy function: body lines `(v, x, op, y)` are `v = x op y`, or `v = x(op, y)` when
    x names a function; our own interpreter, so no text is ever evaluated."""
    params, body, ret = funcs[name]
    env = {**consts, **dict(zip(params, args))}
    val = lambda o: env[o] if o in env else int(o)  # noqa: E731
    for v, x, op, y in body:
        if x in funcs:
            env[v] = _run_function(funcs, x, [val(op), val(y)], consts)
        else:
            a, b = val(x), val(y)
            env[v] = a + b if op == "+" else a - b if op == "-" else a * b
    return env[ret]


def _document(rng: random.Random) -> dict:
    domain = rng.choice(DOMAINS)
    if domain == "code":
        blocks = _code_blocks(rng)
        sep = "\n\n"
    else:
        blocks = _story_lines(rng) if domain == "story" else _news_lines(rng)
        sep = "\n"
    return {"text": sep.join(blocks), "domain": domain, "blocks": blocks, "sep": sep}


def documents(split: str = "train", n: int = 1000, seed: int = 0, domains: Sequence[str] = DOMAINS) -> list[dict]:
    """Documents `{"text", "domain"}` from the story, news and code grammars (uniform over `domains`)."""
    for d in domains:
        if d not in DOMAINS:
            raise ValueError(f"domain must be in {DOMAINS}, got {d!r}")

    def make(rng):
        while True:
            doc = _document(rng)
            if doc["domain"] in domains:
                return doc

    docs = _generate("documents" + ("" if tuple(domains) == DOMAINS else str(list(domains))), split, n, seed,
                     make, key=lambda d: d["text"])
    return [{"text": d["text"], "domain": d["domain"]} for d in docs]


def continuations(split: str = "train", n: int = 1000, seed: int = 0, domains: Sequence[str] = DOMAINS,
                  max_reference_chars: int = 160) -> list[dict]:
    """Prefix / true-continuation pairs `{"prompt", "reference", "domain"}` cut at block boundaries.

    The prefix holds at least the opening blocks (the cast, the council, the first function) and
    ends with its separator; the reference is the following whole blocks (at least one, then more
    while under max_reference_chars). These are the prompts of continued-pretraining RL.
    """
    docs = documents(split, n, seed, domains)
    rng = _rng("continuations", split, seed)
    out = []
    for d in docs:
        sep = "\n\n" if d["domain"] == "code" else "\n"
        blocks = d["text"].split(sep)
        lo = {"code": 2, "story": 2, "news": 3}[d["domain"]]  # the prefix holds the cast (code: the constant and a function)
        cut = rng.randint(lo, len(blocks) - 1)
        ref = [blocks[cut]]
        while cut + len(ref) < len(blocks) and len(sep.join(ref + [blocks[cut + len(ref)]])) <= max_reference_chars:
            ref.append(blocks[cut + len(ref)])
        out.append({"prompt": sep.join(blocks[:cut]) + sep, "reference": sep.join(ref), "domain": d["domain"]})
    return out


# ----------------------------------------------------------------------------------------------
# Instructions with programmatically checkable answers
# ----------------------------------------------------------------------------------------------

_WORDS = ["planet", "garden", "silver", "window", "rocket", "candle", "forest", "bridge", "pillow", "marble",
          "orange", "jacket", "rabbit", "basket", "tunnel", "falcon", "island", "meadow", "copper", "lantern",
          "river", "stone", "cloud", "apple", "tiger", "music", "paper", "smile", "ocean", "light"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _solve_instruction(kind: str, arg: str) -> str:
    """The correct answer of an instruction, computed from its argument."""
    if kind == "reverse":
        return arg[::-1]
    if kind == "sort":
        return " ".join(str(v) for v in sorted(int(t) for t in arg.split()))
    if kind == "max":
        return str(max(int(t) for t in arg.split()))
    if kind == "upper":
        return arg.upper()
    if kind == "vowels":
        return "".join(c for c in arg if c not in "aeiou")
    if kind == "initials":
        return "".join(w[0] for w in arg.split())
    if kind == "count":
        letter, word = arg.split(" ", 1)
        return str(word.count(letter))
    raise ValueError(f"unknown instruction kind {kind!r}")


# (kind, prompt template, regex that reads the argument back from a prompt)
_INSTRUCTIONS = [
    ("reverse", "Reverse the letters of: {}", r"Reverse the letters of: ([a-z]+)"),
    ("sort", "Sort from small to large: {}", r"Sort from small to large: ([\d ]+)"),
    ("max", "Which number is largest: {}", r"Which number is largest: ([\d ]+)"),
    ("upper", "Write in capital letters: {}", r"Write in capital letters: ([a-z ]+)"),
    ("vowels", "Remove the vowels from: {}", r"Remove the vowels from: ([a-z]+)"),
    ("initials", "Join the first letters of: {}", r"Join the first letters of: ([a-z ]+)"),
    ("count", "How many times does {} appear in {}?", r"How many times does ([a-z]) appear in ([a-z]+)\?"),
]


def _instruction_reasoning(kind: str, arg: str, answer: str) -> str:
    if kind == "reverse":
        return " ".join(arg) + "\nbackwards: " + " ".join(answer)
    if kind in ("sort", "max"):
        return "numbers: " + ", ".join(arg.split()) + "\nin order: " + ", ".join(sorted(arg.split(), key=int))
    if kind == "upper":
        return " ".join(arg) + "\ncapitals: " + " ".join(answer)
    if kind == "vowels":
        return " ".join(arg) + "\nkeep: " + " ".join(answer)
    if kind == "initials":
        return "words: " + ", ".join(arg.split()) + "\nfirst letters: " + " ".join(answer)
    letter, word = arg.split(" ", 1)
    return " ".join(f"{c}*" if c == letter else c for c in word) + f"\ncount of {letter}: {answer}"


def instructions(split: str = "train", n: int = 1000, seed: int = 0, kinds: Sequence[str] | None = None) -> list[dict]:
    """Instructions `{"prompt", "answer", "kind", "reasoning", "messages"}` whose answer a program checks."""
    table = [t for t in _INSTRUCTIONS if kinds is None or t[0] in kinds]
    if not table:
        raise ValueError(f"no instruction kinds among {kinds}; known: {[t[0] for t in _INSTRUCTIONS]}")

    def make(rng):
        kind, template, _ = rng.choice(table)
        if kind in ("reverse", "vowels"):
            arg = rng.choice(_WORDS) if rng.random() < 0.5 else "".join(rng.choices(_LETTERS, k=rng.randint(3, 7)))
            prompt = template.format(arg)
        elif kind in ("sort", "max"):
            arg = " ".join(str(rng.randint(1, 99)) for _ in range(rng.randint(3, 6)))
            prompt = template.format(arg)
        elif kind in ("upper", "initials"):
            arg = " ".join(rng.sample(_WORDS, rng.randint(2, 4)))
            prompt = template.format(arg)
        else:
            word = rng.choice(_WORDS)
            letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(_LETTERS)
            arg = f"{letter} {word}"
            prompt = template.format(letter, word)
        answer = _solve_instruction(kind, arg)
        reasoning = _instruction_reasoning(kind, arg, answer)
        return {"prompt": prompt, "answer": answer, "kind": kind, "reasoning": reasoning,
                "messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "reasoning_content": reasoning, "content": answer}]}

    return _generate("instructions" + ("" if kinds is None else str(list(kinds))), split, n, seed, make,
                     key=lambda r: r["prompt"])


# ----------------------------------------------------------------------------------------------
# Toy judges (stand-ins for an LLM judge; duck-typed)
# ----------------------------------------------------------------------------------------------

_NAME = r"([A-Z][a-z]+)"
_STORY_INTRO = re.compile(r"(.+) lived (.+)\.")
_STORY_WHO = re.compile(_NAME + r" the ([a-z]+)")
_STORY_INIT = re.compile(_NAME + r" had (\d+) ([a-z]+)((?:, [A-Z][a-z]+ had \d+)*) and " + _NAME + r" had (\d+)\.")
_STORY_WHEN = re.compile(r"(On [A-Z][a-z]+ [a-z]+), (.*)")
_STORY_MOVE = re.compile(_NAME + r" (" + "|".join(_S_GAIN + _S_LOSE) + r") (\d+) ([a-z]+), so " + _NAME + r" had (\d+)\.")
_STORY_GIVE = re.compile(_NAME + r" gave (\d+) ([a-z]+) to " + _NAME + r", so " + _NAME + r" had (\d+) and "
                         + _NAME + r" had (\d+)\.")
_STORY_COUNT = re.compile(r"they counted (\d+) ([a-z]+) in all\.")
_STORY_END = re.compile(r"That night, (everyone|[A-Z][a-z]+) went to sleep\.")
_NEWS_HEAD = re.compile(r"([A-Z][A-Z ]+), ([A-Z][a-z]+) (\d+) - The ([A-Za-z ]+) council met to vote on a new ([a-z ]+)"
                        r" costing (\d+) million dollars\.")
_NEWS_CAST = re.compile(r"The council has (\d+) members, and Mayor " + _NAME + " " + _NAME
                        + r" opened the meeting at (\d+):(\d\d)\.")
_NEWS_SPEAKERS = re.compile(r"Council members " + _NAME + " " + _NAME + " and " + _NAME + " " + _NAME + r" spoke first\.")
_NEWS_AT = re.compile(r"At (\d+):(\d\d), (.*)")
_NEWS_COST = re.compile(_NAME + r" said the ([a-z ]+) would cost (\d+) million dollars\.")
_NEWS_REMARK = re.compile(_NAME + r" (.+)\.")
_NEWS_VOTE = re.compile(r"(\d+) (members?) voted (yes|no), making the tally (\d+) to (\d+)\.")
_NEWS_END = re.compile(r"The vote ended at (\d+):(\d\d), and the ([a-z ]+) plan (passed|failed) (\d+) to (\d+)\.")
_CODE_CONST = re.compile(r"([A-Z]+) = (\d+)")
_CODE_DEF = re.compile(r"def ([a-z_]+)\(([a-z, ]*)\):")
_CODE_SET = re.compile(r"    ([a-z]+) = ([a-zA-Z]+|\d+) ([-+*]) ([a-zA-Z]+|\d+)")
_CODE_CALL = re.compile(r"    ([a-z]+) = ([a-z_]+)\(([a-zA-Z]+|\d+), ([a-zA-Z]+|\d+)\)")
_CODE_RET = re.compile(r"    return ([a-z]+)")
_CODE_PRINT = re.compile(r"print\(([a-z_]+)\(([-\d, ]*)\)\)  # (-?\d+)")


def detect_domain(text: str) -> str | None:
    """The toy domain whose grammar the first line of `text` opens with, or None."""
    first = text.split("\n", 1)[0]
    if _CODE_CONST.fullmatch(first):
        return "code"
    if _NEWS_HEAD.fullmatch(first):
        return "news"
    m = _STORY_INTRO.fullmatch(first)
    if m and _story_cast(m.group(1)):
        return "story"
    return None


def _story_cast(who: str) -> list[tuple[str, str]] | None:
    parts = re.split(r", | and ", who)
    cast = [_STORY_WHO.fullmatch(p) for p in parts]
    if len(parts) < 2 or not all(cast):
        return None
    return [(m.group(1), m.group(2)) for m in cast]


def _plural_ok(k: int, noun: str, item: tuple[str, str]) -> bool:
    return noun == (item[0] if k == 1 else item[1])


def _check_story(line: str, st: dict) -> bool:
    """One story line against the state (cast, counts, item, date); updates the state."""
    if st.get("ended"):
        return False
    if "cast" not in st:
        m = _STORY_INTRO.fullmatch(line)
        cast = m and _story_cast(m.group(1))
        if not cast or len({n for n, _ in cast}) != len(cast):
            return False
        st.update(cast=[n for n, _ in cast], when=-1)
        return True
    if "count" not in st:
        m = _STORY_INIT.fullmatch(line)
        if not m:
            return False
        pairs = [(m.group(1), int(m.group(2)))] + [(n, int(k)) for n, k in re.findall(r", ([A-Z][a-z]+) had (\d+)", m.group(4))]
        pairs.append((m.group(5), int(m.group(6))))
        item = next((it for it in _S_ITEMS if m.group(3) in it), None)
        if [n for n, _ in pairs] != st["cast"] or item is None or not _plural_ok(pairs[0][1], m.group(3), item):
            return False
        st.update(count=dict(pairs), item=item)
        return True
    m = _STORY_END.fullmatch(line)
    if m:
        st["ended"] = True
        return m.group(1) == "everyone" or m.group(1) in st["cast"]
    m = _STORY_WHEN.fullmatch(line)
    if not m or m.group(1) not in _S_WHEN:
        return False
    when = _S_WHEN.index(m.group(1))
    ok, st["when"] = when > st["when"], max(when, st["when"])
    body, count, item = m.group(2), st["count"], st["item"]
    if mm := _STORY_MOVE.fullmatch(body):
        x, verb, q, noun, x2, claim = mm.groups()
        q, claim = int(q), int(claim)
        if x not in count or x2 != x or q < 1 or not _plural_ok(q, noun, item):
            return False
        new = count[x] + q if verb in _S_GAIN else count[x] - q
        if new < 0:
            return False
        count[x] = new
        return ok and claim == new
    if mm := _STORY_GIVE.fullmatch(body):
        x, q, noun, y, x2, cx, y2, cy = mm.groups()
        q = int(q)
        if x not in count or y not in count or x == y or (x2, y2) != (x, y) or q < 1 or q > count[x]:
            return False
        count[x] -= q
        count[y] += q
        return ok and _plural_ok(q, noun, item) and (int(cx), int(cy)) == (count[x], count[y])
    if mm := _STORY_COUNT.fullmatch(body):
        total = sum(count.values())
        return ok and int(mm.group(1)) == total and _plural_ok(total, mm.group(2), item)
    return False


def _check_news(line: str, st: dict) -> bool:
    """One news line against the state (city, project, council, speakers, cost, clock, tally)."""
    if st.get("ended"):
        return False
    if "project" not in st:
        m = _NEWS_HEAD.fullmatch(line)
        if not m or m.group(1) != m.group(4).upper() or m.group(2) not in _N_MONTHS or not 1 <= int(m.group(3)) <= 31:
            return False
        st.update(project=m.group(5), yes=0, no=0, cost=int(m.group(6)))
        return True
    if "members" not in st:
        m = _NEWS_CAST.fullmatch(line)
        if not m or int(m.group(5)) >= 60:
            return False
        st.update(members=int(m.group(1)), people={m.group(3)}, time=int(m.group(4)) * 60 + int(m.group(5)))
        return True
    if "speakers" not in st:
        m = _NEWS_SPEAKERS.fullmatch(line)
        if not m or len({m.group(2), m.group(4)} | st["people"]) != 3:
            return False
        st["speakers"] = True
        st["people"] |= {m.group(2), m.group(4)}
        return True
    if m := _NEWS_END.fullmatch(line):
        hh, mi, project, verdict, y, n = m.groups()
        st["ended"] = True
        t = int(hh) * 60 + int(mi)
        return (t > st["time"] and int(mi) < 60 and project == st["project"] and (int(y), int(n)) == (st["yes"], st["no"])
                and verdict == ("passed" if st["yes"] > st["no"] else "failed"))
    m = _NEWS_AT.fullmatch(line)
    if not m:
        return False
    t = int(m.group(1)) * 60 + int(m.group(2))
    ok, st["time"] = t > st["time"] and int(m.group(2)) < 60, max(t, st["time"])
    body = m.group(3)
    if mm := _NEWS_VOTE.fullmatch(body):
        q, word, side, y, n = mm.groups()
        q = int(q)
        st[side] += q
        return (ok and q >= 1 and word == ("member" if q == 1 else "members")
                and (int(y), int(n)) == (st["yes"], st["no"]) and st["yes"] + st["no"] <= st["members"])
    if mm := _NEWS_COST.fullmatch(body):
        who, project, cost = mm.group(1), mm.group(2), int(mm.group(3))
        return ok and who in st["people"] and project == st["project"] and cost == st["cost"]
    if mm := _NEWS_REMARK.fullmatch(body):
        who, said = mm.groups()
        if who not in st["people"]:
            return False
        if said in [o.format(p=st["project"]) for o in _N_OPINIONS]:
            return ok
        mc = re.fullmatch(r"said (\d+) million dollars was too much", said)
        return ok and bool(mc) and int(mc.group(1)) == st["cost"]
    return False


def _check_code(line: str, st: dict) -> bool | None:
    """One code line against the state (functions so far, the open function's names); None for blanks."""
    if line == "":
        return None
    funcs, consts, cur = st.setdefault("funcs", {}), st.setdefault("consts", {}), st.get("cur")
    operand_ok = lambda o: o.isdigit() or o in cur["known"] or o in consts  # noqa: E731
    if m := _CODE_CONST.fullmatch(line):
        ok = cur is None and not funcs and m.group(1) not in consts
        consts[m.group(1)] = int(m.group(2))
        return ok
    if m := _CODE_DEF.fullmatch(line):
        params = [p.strip() for p in m.group(2).split(",")] if m.group(2).strip() else []
        ok = (cur is None and m.group(1) not in funcs and len(set(params)) == len(params)
              and all(re.fullmatch("[a-z]+", p) for p in params))
        st["cur"] = {"name": m.group(1), "params": params, "known": set(params), "body": []}
        return ok
    if m := _CODE_CALL.fullmatch(line):
        v, f, x, y = m.groups()
        if cur is None or f not in funcs or len(funcs[f][0]) != 2 or not (operand_ok(x) and operand_ok(y)):
            return False
        cur["body"].append((v, f, x, y))
        cur["known"].add(v)
        return True
    if m := _CODE_SET.fullmatch(line):
        v, x, op, y = m.groups()
        if cur is None or not (operand_ok(x) and operand_ok(y)):
            return False
        cur["body"].append((v, x, op, y))
        cur["known"].add(v)
        return True
    if m := _CODE_RET.fullmatch(line):
        st["cur"] = None
        if cur is None or m.group(1) not in cur["known"] or not cur["body"]:
            return False
        funcs[cur["name"]] = (cur["params"], cur["body"], m.group(1))
        return True
    if m := _CODE_PRINT.fullmatch(line):
        name, args, shown = m.groups()
        if cur is not None or name not in funcs:
            return False
        args = [int(a) for a in args.split(",")] if args.strip() else []
        if len(args) != len(funcs[name][0]):
            return False
        return _run_function(funcs, name, args, consts) == int(shown)
    st["cur"] = None
    return False


_CHECKERS = {"story": _check_story, "news": _check_news, "code": _check_code}


def check_document(text: str, domain: str | None = None) -> list[bool | None]:
    """Per line of a toy document: True (consistent), False (breaks the grammar or a fact), None (blank)."""
    domain = domain or detect_domain(text)
    if domain is None:
        raise ValueError("text does not open like a toy document (story, news or code)")
    st: dict = {}
    return [_CHECKERS[domain](line, st) for line in text.split("\n")]


def _clean_generated(text: str) -> str:
    for stop in ("<|endoftext|>", "<|im_end|>"):
        text = text.split(stop, 1)[0]
    return text


class ContinuationJudge:
    """Pairwise judge of document continuations under the toy grammars (a stand-in for an LLM judge).

    The prefix is replayed line by line to rebuild the facts (cast and counts, council and tally,
    defined functions); every continuation line is then checked against them. A line's verdict:
    +1 if consistent, -`penalty` if it breaks the grammar or a fact; a last line cut off
    mid-way (no newline after it) that does not parse is ignored. `prefer` returns
    sigmoid(sharpness * (s_a - s_b)) for the summed verdicts s; None when the prefix is not a toy document.
    """

    def __init__(self, penalty: float = 2.0, sharpness: float = 2.0):
        self.penalty, self.sharpness = penalty, sharpness

    def line_verdicts(self, prefix: str, continuation: str) -> list[bool] | None:
        domain = detect_domain(prefix)
        if domain is None:
            return None
        continuation = _clean_generated(continuation)
        full, st, verdicts, pos = prefix + continuation, {}, [], 0
        lines = full.split("\n")
        for i, line in enumerate(lines):
            v = _CHECKERS[domain](line, st)
            end = pos + len(line)
            if end > len(prefix) or (line == "" and pos >= len(prefix) and i < len(lines) - 1):
                if i == len(lines) - 1 and not v:
                    v = None  # cut off mid-line (or empty tail): unknown, not wrong
                if v is not None:
                    verdicts.append(v)
            pos = end + 1
        return verdicts

    def _points(self, prefix: str, continuation: str) -> float | None:
        v = self.line_verdicts(prefix, continuation)
        return None if v is None else sum(1.0 if x else -self.penalty for x in v)

    def prefer(self, prefixes: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float | None]:
        """Probability that continuation a is better than b, per prefix (0.5 on a tie)."""
        out = []
        for p, x, y in zip(prefixes, a, b, strict=True):
            sa, sb = self._points(p, x), self._points(p, y)
            out.append(None if sa is None else 1.0 / (1.0 + math.exp(-self.sharpness * (sa - sb))))
        return out

    def score(self, prefixes: Sequence[str], continuations: Sequence[str]) -> list[float | None]:
        """Pointwise: share of the continuation's judged lines that are consistent (0 if none)."""
        out = []
        for p, c in zip(prefixes, continuations, strict=True):
            v = self.line_verdicts(p, c)
            out.append(None if v is None else (sum(v) / len(v) if v else 0.0))
        return out


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def prompt_text(prompt) -> str:
    """The user's request from a prompt given as text, as a message list, or as rendered chat text."""
    if isinstance(prompt, (list, tuple)):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    found = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S)
    return found[-1] if found else prompt


def parse_instruction(prompt) -> tuple[str, str] | None:
    """(kind, argument) of a toy instruction prompt, or None if it is not one."""
    text = prompt_text(prompt).strip()
    for kind, _, pattern in _INSTRUCTIONS:
        m = re.fullmatch(pattern, text)
        if m:
            return kind, " ".join(m.groups())
    return None


class AnswerJudge:
    """Grades the final answer of a toy instruction (a stand-in for an LLM judge).

    Only the answer counts: the text after the last `</think>` (the whole response if it has no
    `<think>`), stripped. Returns None ("invalid") when there is no answer (empty, or a `<think>`
    never closed) or the prompt is not a toy instruction; 1.0 for the exact answer; otherwise
    `partial_credit` * (1 - normalized edit distance), so near misses rank above nonsense.
    """

    def __init__(self, partial_credit: float = 0.5):
        self.partial_credit = partial_credit

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float | None]:
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            parsed = parse_instruction(prompt)
            answer = final_answer_text(_clean_generated(response))
            if parsed is None or answer is None or not answer.strip():
                out.append(None)
                continue
            gold, answer = _solve_instruction(*parsed), answer.strip()
            if answer == gold:
                out.append(1.0)
            else:
                sim = 1.0 - _levenshtein(answer, gold) / max(len(answer), len(gold))
                out.append(self.partial_credit * sim)
        return out


# ----------------------------------------------------------------------------------------------
# The toy base model: pretraining corpus, pretraining, evaluation
# ----------------------------------------------------------------------------------------------

# Share of each kind of text in the pretraining stream (by number of samples).
PRETRAIN_MIX = {"documents": 0.4, "plain_arithmetic": 0.42, "chat_arithmetic": 0.06, "chat_instructions": 0.12}
PRETRAIN_STEPS = 1600  # x 4 rows x 512 tokens = 3.3M tokens: about 5 minutes on 2 cores


def _digit_fact(rng: random.Random) -> str:
    """One single-digit column fact in the scratchpad's notation (an addition/subtraction table row)."""
    x, y, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
    if rng.random() < 0.5:
        return f"{x}+{y}+{c}={x + y + c}"
    return f"1{x}-{y}-{c}={10 + x - y - c}" if x - y - c < 0 else f"{x}-{y}-{c}={x - y - c}"


def _plain_arithmetic_text(rng: random.Random, rec: dict) -> str:
    """Arithmetic as a base model meets it in pretraining text, never inside `<think>`: a word problem
    answered at once with its equation (`A: 15+24=39`), a bare equation, a row of single-digit facts,
    or a column drill on bare numbers (one operation worked digit by digit, as in a textbook)."""
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
    plain = arithmetic("train", counts["plain_arithmetic"], seed, difficulty=[1, 1, 2, 2, 3, 3, 4, 5])
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


def pretrain(out_dir: str | Path = BASE_DIR, max_steps: int = PRETRAIN_STEPS, batch_size: int = 4, seq_len: int = 512,
             lr: float = 1e-3, warmup: int = 50, seed: int = 0, threads: int = 2, config=None,
             progress: bool = True) -> Path:
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
    n_samples = rows_needed * (seq_len + 1) // 100  # samples average over 100 tokens: enough to fill every step once
    data = _pack(pretrain_corpus(n_samples, seed), seq_len)
    if len(data) < rows_needed:
        raise RuntimeError(f"pretraining corpus too small: {len(data)} rows < {rows_needed}")
    data = data[:rows_needed]
    # weight decay on matrices only: decaying the RMSNorm gains (q_norm/k_norm included) would cap
    # how sharp attention can get, and copying digits needs sharp attention
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, max_steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0, bar = time.time(), tqdm(range(max_steps), desc="pretrain toy base", disable=not progress)
    for step in bar:
        batch = data[step * batch_size:(step + 1) * batch_size]
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
    info = {"max_steps": max_steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup": warmup,
            "seed": seed, "threads": threads, "tokens": max_steps * batch_size * seq_len,
            "seconds": round(seconds, 1), "final_loss": round(loss.item(), 4)}
    (out_dir / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return out_dir


def base_model_dir() -> Path:
    """The toy base model's directory (config, weights, tokenizer); pretrained first if missing."""
    if not (BASE_DIR / "model.safetensors").exists():
        print(f"toy base model missing in {BASE_DIR}: pretraining it (a few minutes)", file=sys.stderr)
        pretrain(BASE_DIR)
    return BASE_DIR


def student_model_dir() -> Path:
    """A smaller pretrained toy model (`student_config`, same corpus) for distillation; built if missing."""
    if not (STUDENT_DIR / "model.safetensors").exists():
        print(f"toy student model missing in {STUDENT_DIR}: pretraining it (about a minute)", file=sys.stderr)
        pretrain(STUDENT_DIR, config=student_config())
    return STUDENT_DIR


def load_model(path: str | Path | None = None):
    """A toy model (the base by default) in eval mode, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or base_model_dir(), dtype="float32").eval()


def perplexity(model, texts: Sequence[str]) -> float:
    """Per-token perplexity exp(sum NLL / tokens) over texts (each scored alone, first token unscored)."""
    import torch

    tok, nll, count = load_tokenizer(), 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def greedy_complete(model, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 64,
                    stop_ids: Sequence[int] = (IM_END_ID, PAD_ID)) -> list[str]:
    """Greedy completions of raw prompt texts (left-padded batches; special tokens kept)."""
    import torch

    tok = load_tokenizer()
    tok.padding_side = "left"
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=PAD_ID)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                ids = row.tolist()
                cut = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
                out.append(tok.decode(ids[:cut]))
    return out


def arithmetic_accuracy(model, difficulty: int, n: int = 200, mode: str = "chat", seed: int = 0,
                        style: str = "gsm8k") -> float:
    """Greedy accuracy on held-out problems. mode: "chat" (Qwen3 chat, thinking off: answer at once),
    "think" (Qwen3 chat, thinking on: the model writes its own scratchpad), "plain" (`Q: ...\nA:`,
    the pretraining format: the model writes the equation and its value on one line)."""
    tok = load_tokenizer()
    recs = arithmetic("test", n, seed, difficulty=difficulty, style=style)
    if mode == "plain":
        prompts = [f"Q: {r['prompt']}\nA:" for r in recs]
        outs = greedy_complete(model, prompts, 40, stop_ids=(PAD_ID, 5))  # one line: `A: 15+24=39`
        return sum(extract_answer(o) == r["value"] for o, r in zip(outs, recs)) / n
    think = mode == "think"
    prompts = [tok.apply_chat_template([r["messages"][0]], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=think) for r in recs]
    outs = greedy_complete(model, prompts, 256 if think else 24)
    return sum(check_arithmetic(o, r["answer"], style) for o, r in zip(outs, recs)) / n


def evaluate(path: str | Path | None = None, n: int = 200, seed: int = 0) -> dict:
    """The toy base's report card: held-out perplexity per domain, arithmetic accuracy per level."""
    model = load_model(path)
    report = {"perplexity": {d: round(perplexity(model, [x["text"] for x in documents("test", n // 4, seed, [d])]), 3)
                             for d in DOMAINS}}
    for mode in ("plain", "chat"):
        report[f"accuracy_{mode}"] = {d: arithmetic_accuracy(model, d, n, mode, seed) for d in DIFFICULTIES}
    return report


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a killed export never leaves a torn file


def export(out: str | Path, n_train: int = 5000, n_test: int = 500, seed: int = 0,
           difficulty: int | Sequence[int] = 2) -> list[Path]:
    """Write every task as JSONL in the repo's data schemas; returns the files written.

    arithmetic_{train,test}.jsonl (GSM8K style at `difficulty`), arithmetic_d{L}_test.jsonl per
    level, arithmetic_{math,mc}_test.jsonl, documents_*.jsonl ({"text", "domain"}),
    continuations_*.jsonl ({"prompt", "reference", "domain"}), instructions_*.jsonl.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "arithmetic_train": arithmetic("train", n_train, seed, difficulty),
        "arithmetic_test": arithmetic("test", n_test, seed, difficulty),
        **{f"arithmetic_d{d}_test": arithmetic("test", n_test, seed, d) for d in DIFFICULTIES},
        "arithmetic_math_test": arithmetic("test", n_test, seed, difficulty, style="math"),
        "arithmetic_mc_test": arithmetic("test", n_test, seed, difficulty, style="mc"),
        "documents_train": documents("train", n_train, seed),
        "documents_test": documents("test", n_test, seed),
        "continuations_train": continuations("train", n_train, seed),
        "continuations_test": continuations("test", n_test, seed),
        "instructions_train": instructions("train", n_train, seed),
        "instructions_test": instructions("test", n_test, seed),
    }
    paths = []
    for name, rows in files.items():
        paths.append(out / f"{name}.jsonl")
        _write_jsonl(paths[-1], rows)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pretrain", help="pretrain the toy base model (deterministic)")
    pp.add_argument("--out", default=None, help="output directory (default toy/base, or toy/student)")
    pp.add_argument("--student", action="store_true", help="pretrain the smaller distillation student instead")
    pp.add_argument("--max-steps", type=int, default=PRETRAIN_STEPS, help="optimizer steps")
    pp.add_argument("--batch-size", type=int, default=4, help="rows of --seq-len tokens per step")
    pp.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    pp.add_argument("--lr", type=float, default=1e-3,
                    help="peak learning rate (AdamW, cosine to 10%%); at 3e-3 this model never learns to copy")
    pp.add_argument("--seed", type=int, default=0, help="seed of the corpus and the initialisation")
    pp.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (speed only: 1 and 2 threads gave bit-identical weights here)")
    pe = sub.add_parser("eval", help="perplexity per domain and arithmetic accuracy of a toy model")
    pe.add_argument("--model", default=None, help="model directory (default: the toy base)")
    pe.add_argument("--n", type=int, default=200, help="held-out problems per difficulty")
    px = sub.add_parser("export", help="write every task as JSONL")
    px.add_argument("--out", required=True, help="output directory")
    px.add_argument("--n-train", type=int, default=5000, help="records per train file")
    px.add_argument("--n-test", type=int, default=500, help="records per test file")
    px.add_argument("--seed", type=int, default=0, help="generator seed")
    px.add_argument("--difficulty", type=int, nargs="+", default=[2], help="arithmetic level(s) of the main files")
    ps = sub.add_parser("show", help="print one example of every task")
    args = p.parse_args(argv)
    if args.cmd == "pretrain":
        out = args.out or (STUDENT_DIR if args.student else BASE_DIR)
        out = pretrain(out, args.max_steps, args.batch_size, args.seq_len, args.lr, seed=args.seed,
                       threads=args.threads, config=student_config() if args.student else None)
        print(json.loads((out / "pretrain_info.json").read_text()))
    elif args.cmd == "export":
        for path in export(args.out, args.n_train, args.n_test, args.seed, args.difficulty):
            print(path)
    elif args.cmd == "show":
        tok = load_tokenizer(TRAINING_CHAT_TEMPLATE)
        for style in STYLES:
            print(tok.apply_chat_template(arithmetic("train", 1, difficulty=3, style=style)[0]["messages"], tokenize=False))
        print(tok.apply_chat_template(instructions("train", 1)[0]["messages"], tokenize=False))
        for d in DOMAINS:
            print(documents("train", 1, domains=[d])[0]["text"], end="\n\n")
    elif args.cmd == "eval":
        print(json.dumps(evaluate(args.model, args.n), indent=1))


if __name__ == "__main__":
    main()
