"""The toy tasks: seeded generators with train and test splits that are disjoint by construction (a
problem's split is a hash of its content, see `_split_of`).

- `arithmetic`: word problems with a digit-by-digit `<think>` scratchpad, rendered GSM8K-style
  (`#### N`), MATH-style (`\\boxed{N}`) or as 4-way multiple choice (`Answer: C`), with difficulty
  levels 1..5 (`DIFFICULTIES`);
- `documents`: three domains with distinct styles (`story`, `news`, `code`), generated from small
  grammars whose facts a program can check (names, counts, clock times, values); `continuations`
  cuts them into prefix / true continuation pairs;
- `instructions`: short instructions whose answer a program computes (reverse, sort, count...).

`export` writes every task as JSONL in the repo's data schemas.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable, Sequence

# ----------------------------------------------------------------------------------------------
# Splits: disjoint by construction
# ----------------------------------------------------------------------------------------------

SPLITS = ("train", "test")
TEST_SHARE = 10  # one bucket in ten is held out


def _split_of(key: str) -> str:
    """A problem's split is a function of its content (stable hash), so train and test never share
    one."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % TEST_SHARE
    return "test" if bucket == 0 else "train"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _rng(task: str, split: str, seed: int) -> random.Random:
    # one independent stream per (task, split, seed); string seeds hash with sha512, not Python's
    # salted hash
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
    1: dict(digits=2, steps=1, ops="+"),  # 47+85
    2: dict(digits=3, steps=1, ops="+-"),  # 347+285, 632-285
    3: dict(digits=3, steps=2, ops="+-"),  # 347+285-120
    4: dict(digits=4, steps=2, ops="+-"),  # 4347+2855-1200
    5: dict(digits=4, steps=3, ops="+-"),  # three operations on 4-digit numbers
}
STYLES = ("gsm8k", "math", "mc")
_PEOPLE = [
    ("Ann", "She"),
    ("Ben", "He"),
    ("Kim", "She"),
    ("Raj", "He"),
    ("Eva", "She"),
    ("Tom", "He"),
    ("Mia", "She"),
    ("Sam", "He"),
    ("Zoe", "She"),
    ("Max", "He"),
]
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
    """Right-to-left columns for a-b (a >= b): `x-y-borrow=d`, or `1x-y-borrow=d` when the column
    borrows."""
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
    cands = [
        answer + 10,
        answer - 10,
        answer + 100,
        answer - 100,
        answer + 1,
        answer - 1,
        answer + 9,
    ]
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
        raise ValueError(
            f"difficulty: expected comma-separated levels such as '1,2,3', got {text!r}"
        ) from None
    if not levels:
        raise ValueError(f"difficulty: expected at least one level, got {text!r}")
    return _levels(levels)


def _levels(difficulty) -> list[int]:
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    for d in levels:
        if d not in DIFFICULTIES:
            raise ValueError(
                f"difficulty must be in {sorted(DIFFICULTIES)} (or a list of them), got {d!r}"
            )
    return levels


def arithmetic(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    difficulty: int | Sequence[int] = 2,
    style: str = "gsm8k",
) -> list[dict]:
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
        rec = {
            "prompt": question,
            "answer": str(value),
            "value": str(value),
            "reasoning": reasoning,
            "difficulty": level,
            "style": style,
            "key": f"{start}" + "".join(f"{o}{x}" for o, x in ops),
        }
        if style == "gsm8k":
            final = f"#### {value}"
        elif (
            style == "math"
        ):  # the prompt says so, as MATH-style evaluation prompts do (a model can tell the styles)
            final = f"\\boxed{{{value}}}"
            rec["prompt"] = question + "\nPut the final answer in \\boxed{}."
        else:
            options = _distractors(rng, value) + [value]
            rng.shuffle(options)
            letter = "ABCD"[options.index(value)]
            rec["prompt"] = (
                question + "\n" + "\n".join(f"{L}) {o}" for L, o in zip("ABCD", options))
            )
            rec["answer"], rec["choices"] = letter, [str(o) for o in options]
            final = f"Answer: {letter}"
        rec["messages"] = [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "reasoning_content": reasoning, "content": final},
        ]
        return rec

    return _generate(f"arithmetic{levels}{style}", split, n, seed, make, key=lambda r: r["key"])


# ----------------------------------------------------------------------------------------------
# Documents: three domains from small grammars with checkable facts
# ----------------------------------------------------------------------------------------------

DOMAINS = ("story", "news", "code")

# story: animals count their things; every event is dated and states the counts it leads to
_S_NAMES = [
    "Milo",
    "Lily",
    "Ruby",
    "Otto",
    "Nina",
    "Finn",
    "Rosa",
    "Hugo",
    "Ivy",
    "Leo",
    "Maya",
    "Theo",
]
_S_ANIMALS = ["fox", "owl", "rabbit", "bear", "mouse", "duck", "frog", "deer", "crow", "hare"]
_S_PLACES = [
    "by the river",
    "in the old forest",
    "on a green hill",
    "near the lake",
    "under a big oak",
    "at the edge of the meadow",
]
_S_ITEMS = [
    ("acorn", "acorns"),
    ("apple", "apples"),
    ("shell", "shells"),
    ("berry", "berries"),
    ("stone", "stones"),
    ("feather", "feathers"),
    ("nut", "nuts"),
    ("pebble", "pebbles"),
]
_S_WHEN = [
    f"On {day} {part}"
    for day in ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
    for part in ["morning", "afternoon", "evening"]
]  # strictly increasing through a story
_S_GAIN = ["found", "picked up", "dug up"]
_S_LOSE = ["lost", "dropped", "ate"]
# news: a council vote reported minute by minute with a running tally
_N_CITIES = [
    "Harbor City",
    "Riverton",
    "Oakdale",
    "Lakeview",
    "Stonebridge",
    "Millbrook",
    "Westfield",
    "Pine Falls",
    "Redwater",
    "Elmstead",
]
_N_PROJECTS = [
    "library",
    "bridge",
    "school",
    "park",
    "bus line",
    "stadium",
    "clinic",
    "market hall",
]
_N_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_N_FIRST = [
    "Ada",
    "Omar",
    "Grace",
    "Ivan",
    "Lena",
    "Marco",
    "Priya",
    "Sam",
    "Tara",
    "Victor",
    "Nora",
    "Felix",
]
_N_LAST = [
    "Reyes",
    "Hale",
    "Novak",
    "Okafor",
    "Brandt",
    "Chen",
    "Duarte",
    "Evans",
    "Kowal",
    "Moreau",
    "Singh",
    "Larsen",
]
_N_OPINIONS = [
    "said the {p} was badly needed",
    "said the {p} would help local shops",
    "warned that the {p} would take years to build",
    "asked for more time to study the {p}",
]
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
    held = [f"{names[0]} had {_noun(count[names[0]], item)}"] + [
        f"{n} had {count[n]}" for n in names[1:]
    ]
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
            lines.append(
                f"{when}, {x} {rng.choice(_S_GAIN)} {_noun(q, item)}, so {x} had {count[x]}."
            )
        elif kind == "lose":
            q = rng.randint(1, count[x])
            count[x] -= q
            lines.append(
                f"{when}, {x} {rng.choice(_S_LOSE)} {_noun(q, item)}, so {x} had {count[x]}."
            )
        elif kind == "give":
            y = rng.choice([n for n in names if n != x])
            q = rng.randint(1, count[x])
            count[x] -= q
            count[y] += q
            lines.append(
                f"{when}, {x} gave {_noun(q, item)} to {y}, so {x} had {count[x]} and {y} had "
                f"{count[y]}."
            )
        else:
            lines.append(f"{when}, they counted {_noun(sum(count.values()), item)} in all.")
    lines.append(
        rng.choice(
            ["That night, everyone went to sleep.", f"That night, {names[0]} went to sleep."]
        )
    )
    return lines


def _clock(minute: int) -> str:
    return f"{minute // 60}:{minute % 60:02d}"


def _news_lines(rng: random.Random) -> list[str]:
    city, project = rng.choice(_N_CITIES), rng.choice(_N_PROJECTS)
    members = rng.choice([5, 7, 9, 11])
    firsts, lasts = rng.sample(_N_FIRST, 3), rng.sample(_N_LAST, 3)
    minute, cost = 9 * 60 + rng.choice([0, 15, 30]), rng.randint(2, 90)
    lines = [
        f"{city.upper()}, {rng.choice(_N_MONTHS)} {rng.randint(1, 28)} - "
        f"The {city} council met to vote on a new {project} costing {cost} million dollars.",
        f"The council has {members} members, and Mayor {firsts[0]} {lasts[0]} opened the meeting "
        f"at {_clock(minute)}.",
        f"Council members {firsts[1]} {lasts[1]} and {firsts[2]} {lasts[2]} spoke first.",
    ]
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
    lines.append(
        f"The vote ended at {_clock(minute)}, and the {project} plan "
        f"{'passed' if y > n else 'failed'} {y} to {n}."
    )
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
                body.append(
                    (
                        v,
                        rng.choice(sorted(funcs)),
                        prev,
                        unused.pop() if unused else str(rng.randint(1, 5)),
                    )
                )
            else:
                must = (
                    len(unused) >= len(local_names) - i
                )  # every parameter and the constant get used
                other = (
                    unused.pop()
                    if unused and (must or rng.random() < 0.5)
                    else str(rng.randint(1, 9))
                )
                op = (
                    "*"
                    if not used_mul and other.isdigit() and int(other) <= 4 and rng.random() < 0.4
                    else rng.choice("+-")
                )
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


def documents(
    split: str = "train", n: int = 1000, seed: int = 0, domains: Sequence[str] = DOMAINS
) -> list[dict]:
    """Documents `{"text", "domain"}` from the story, news and code grammars (uniform over
    `domains`)."""
    for d in domains:
        if d not in DOMAINS:
            raise ValueError(f"domain must be in {DOMAINS}, got {d!r}")

    def make(rng):
        while True:
            doc = _document(rng)
            if doc["domain"] in domains:
                return doc

    docs = _generate(
        "documents" + ("" if tuple(domains) == DOMAINS else str(list(domains))),
        split,
        n,
        seed,
        make,
        key=lambda d: d["text"],
    )
    return [{"text": d["text"], "domain": d["domain"]} for d in docs]


def continuations(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    domains: Sequence[str] = DOMAINS,
    max_reference_chars: int = 160,
) -> list[dict]:
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
        lo = {"code": 2, "story": 2, "news": 3}[
            d["domain"]
        ]  # the prefix holds the cast (code: the constant and a function)
        cut = rng.randint(lo, len(blocks) - 1)
        ref = [blocks[cut]]
        while (
            cut + len(ref) < len(blocks)
            and len(sep.join(ref + [blocks[cut + len(ref)]])) <= max_reference_chars
        ):
            ref.append(blocks[cut + len(ref)])
        out.append(
            {
                "prompt": sep.join(blocks[:cut]) + sep,
                "reference": sep.join(ref),
                "domain": d["domain"],
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# Instructions with programmatically checkable answers
# ----------------------------------------------------------------------------------------------

_WORDS = [
    "planet",
    "garden",
    "silver",
    "window",
    "rocket",
    "candle",
    "forest",
    "bridge",
    "pillow",
    "marble",
    "orange",
    "jacket",
    "rabbit",
    "basket",
    "tunnel",
    "falcon",
    "island",
    "meadow",
    "copper",
    "lantern",
    "river",
    "stone",
    "cloud",
    "apple",
    "tiger",
    "music",
    "paper",
    "smile",
    "ocean",
    "light",
]
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
    (
        "count",
        "How many times does {} appear in {}?",
        r"How many times does ([a-z]) appear in ([a-z]+)\?",
    ),
]


def _instruction_reasoning(kind: str, arg: str, answer: str) -> str:
    if kind == "reverse":
        return " ".join(arg) + "\nbackwards: " + " ".join(answer)
    if kind in ("sort", "max"):
        return (
            "numbers: "
            + ", ".join(arg.split())
            + "\nin order: "
            + ", ".join(sorted(arg.split(), key=int))
        )
    if kind == "upper":
        return " ".join(arg) + "\ncapitals: " + " ".join(answer)
    if kind == "vowels":
        return " ".join(arg) + "\nkeep: " + " ".join(answer)
    if kind == "initials":
        return "words: " + ", ".join(arg.split()) + "\nfirst letters: " + " ".join(answer)
    letter, word = arg.split(" ", 1)
    return " ".join(f"{c}*" if c == letter else c for c in word) + f"\ncount of {letter}: {answer}"


def instructions(
    split: str = "train", n: int = 1000, seed: int = 0, kinds: Sequence[str] | None = None
) -> list[dict]:
    """Instructions `{"prompt", "answer", "kind", "reasoning", "messages"}` whose answer a program
    checks."""
    table = [t for t in _INSTRUCTIONS if kinds is None or t[0] in kinds]
    if not table:
        raise ValueError(
            f"no instruction kinds among {kinds}; known: {[t[0] for t in _INSTRUCTIONS]}"
        )

    def make(rng):
        kind, template, _ = rng.choice(table)
        if kind in ("reverse", "vowels"):
            arg = (
                rng.choice(_WORDS)
                if rng.random() < 0.5
                else "".join(rng.choices(_LETTERS, k=rng.randint(3, 7)))
            )
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
        return {
            "prompt": prompt,
            "answer": answer,
            "kind": kind,
            "reasoning": reasoning,
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "reasoning_content": reasoning, "content": answer},
            ],
        }

    return _generate(
        "instructions" + ("" if kinds is None else str(list(kinds))),
        split,
        n,
        seed,
        make,
        key=lambda r: r["prompt"],
    )


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a killed export never leaves a torn file


def export(
    out: str | Path,
    n_train: int = 5000,
    n_test: int = 500,
    seed: int = 0,
    difficulty: int | Sequence[int] = 2,
) -> list[Path]:
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
