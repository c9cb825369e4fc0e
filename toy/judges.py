"""The toy judges, duck-typed stand-ins for an LLM judge: `ContinuationJudge.prefer` says which of
two continuations of a document prefix is more consistent with the prefix under the document
grammar; `AnswerJudge.score` grades the final answer of an instruction or an arithmetic word
problem. `check_document` checks a document line by line against the facts stated before each
line."""

from __future__ import annotations

import math
import re
from typing import Sequence

import regex
from rapidfuzz.distance import Levenshtein

from toy.tasks import (
    _ADD,
    _INSTRUCTIONS,
    _N_MONTHS,
    _N_OPINIONS,
    _S_GAIN,
    _S_ITEMS,
    _S_LOSE,
    _S_WHEN,
    _SUB,
    _run_function,
    _solve_instruction,
)

_NAME = r"([A-Z][a-z]+)"
_STORY_INTRO = re.compile(r"(.+) lived (.+)\.")
_STORY_WHO = re.compile(_NAME + r" the ([a-z]+)")
_STORY_INIT = re.compile(
    _NAME + r" had (\d+) ([a-z]+)((?:, [A-Z][a-z]+ had \d+)*) and " + _NAME + r" had (\d+)\."
)
_STORY_WHEN = re.compile(r"(On [A-Z][a-z]+ [a-z]+), (.*)")
_STORY_MOVE = re.compile(
    _NAME + r" (" + "|".join(_S_GAIN + _S_LOSE) + r") (\d+) ([a-z]+), so " + _NAME + r" had (\d+)\."
)
_STORY_GIVE = re.compile(
    _NAME
    + r" gave (\d+) ([a-z]+) to "
    + _NAME
    + r", so "
    + _NAME
    + r" had (\d+) and "
    + _NAME
    + r" had (\d+)\."
)
_STORY_COUNT = re.compile(r"they counted (\d+) ([a-z]+) in all\.")
_STORY_END = re.compile(r"That night, (everyone|[A-Z][a-z]+) went to sleep\.")
_NEWS_HEAD = re.compile(
    r"([A-Z][A-Z ]+), ([A-Z][a-z]+) (\d+) - The ([A-Za-z ]+) council met to vote on a new ([a-z ]+)"
    r" costing (\d+) million dollars\."
)
_NEWS_CAST = re.compile(
    r"The council has (\d+) members, and Mayor "
    + _NAME
    + " "
    + _NAME
    + r" opened the meeting at (\d+):(\d\d)\."
)
_NEWS_SPEAKERS = re.compile(
    r"Council members " + _NAME + " " + _NAME + " and " + _NAME + " " + _NAME + r" spoke first\."
)
_NEWS_AT = re.compile(r"At (\d+):(\d\d), (.*)")
_NEWS_COST = re.compile(_NAME + r" said the ([a-z ]+) would cost (\d+) million dollars\.")
_NEWS_REMARK = re.compile(_NAME + r" (.+)\.")
_NEWS_VOTE = re.compile(r"(\d+) (members?) voted (yes|no), making the tally (\d+) to (\d+)\.")
_NEWS_END = re.compile(
    r"The vote ended at (\d+):(\d\d), and the ([a-z ]+) plan (passed|failed) (\d+) to (\d+)\."
)
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
        pairs = [(m.group(1), int(m.group(2)))] + [
            (n, int(k)) for n, k in re.findall(r", ([A-Z][a-z]+) had (\d+)", m.group(4))
        ]
        pairs.append((m.group(5), int(m.group(6))))
        item = next((it for it in _S_ITEMS if m.group(3) in it), None)
        if (
            [n for n, _ in pairs] != st["cast"]
            or item is None
            or not _plural_ok(pairs[0][1], m.group(3), item)
        ):
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
        if (
            x not in count
            or y not in count
            or x == y
            or (x2, y2) != (x, y)
            or q < 1
            or q > count[x]
        ):
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
        if (
            not m
            or m.group(1) != m.group(4).upper()
            or m.group(2) not in _N_MONTHS
            or not 1 <= int(m.group(3)) <= 31
        ):
            return False
        st.update(project=m.group(5), yes=0, no=0, cost=int(m.group(6)))
        return True
    if "members" not in st:
        m = _NEWS_CAST.fullmatch(line)
        if not m or int(m.group(5)) >= 60:
            return False
        st.update(
            members=int(m.group(1)),
            people={m.group(3)},
            time=int(m.group(4)) * 60 + int(m.group(5)),
        )
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
        return (
            t > st["time"]
            and int(mi) < 60
            and project == st["project"]
            and (int(y), int(n)) == (st["yes"], st["no"])
            and verdict == ("passed" if st["yes"] > st["no"] else "failed")
        )
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
        return (
            ok
            and q >= 1
            and word == ("member" if q == 1 else "members")
            and (int(y), int(n)) == (st["yes"], st["no"])
            and st["yes"] + st["no"] <= st["members"]
        )
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
    """One code line against the state (functions so far, the open function's names); None for
    blanks."""
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
        ok = (
            cur is None
            and m.group(1) not in funcs
            and len(set(params)) == len(params)
            and all(re.fullmatch("[a-z]+", p) for p in params)
        )
        st["cur"] = {"name": m.group(1), "params": params, "known": set(params), "body": []}
        return ok
    if m := _CODE_CALL.fullmatch(line):
        v, f, x, y = m.groups()
        if (
            cur is None
            or f not in funcs
            or len(funcs[f][0]) != 2
            or not (operand_ok(x) and operand_ok(y))
        ):
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


def facts_thought(prefix: str) -> str | None:
    """The facts of a document prefix that its continuation must keep, restated as a thought (None
    when the prefix is not a toy document): who holds how many of the item and the total so far
    (story); the project, its cost, the council's size, the people, the clock and the tally (news);
    the constants and the functions with their parameters (code). A model that writes this thought
    before continuing has the facts next to the line that needs them: what interleaved thinking is
    for on documents."""
    domain = detect_domain(prefix)
    if domain is None:
        return None
    st: dict = {}
    for line in prefix.split("\n"):
        _CHECKERS[domain](line, st)
    if domain == "story":
        if "count" not in st:
            return "cast: " + ", ".join(st.get("cast", []))
        total = sum(st["count"].values())
        last = _S_WHEN[st["when"]] if st["when"] >= 0 else "none yet"
        return (
            f"{st['item'][1]}: "
            + ", ".join(f"{n} {k}" for n, k in st["count"].items())
            + f"\nin all: {total}\nlast time: {last}"
        )
    if domain == "news":
        if "members" not in st:
            return f"project: {st['project']}, {st['cost']} million"
        clock = f"{st['time'] // 60}:{st['time'] % 60:02d}"
        return (
            f"project: {st['project']}, {st['cost']} million\nmembers: {st['members']}, people: "
            + ", ".join(sorted(st["people"]))
            + f"\nclock: {clock}\ntally: {st['yes']} to {st['no']}"
        )
    consts = ", ".join(f"{k} = {v}" for k, v in st.get("consts", {}).items())
    funcs = ", ".join(f"{name}({', '.join(f[0])})" for name, f in st.get("funcs", {}).items())
    return f"constants: {consts or 'none'}\nfunctions: {funcs or 'none'}"


def thinking_continuations(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """toy.continuations rows with `thought` (facts_thought of the prefix) and `completion`, the
    thinking-SFT target: `<think>\n{thought}\n</think>\n\n{reference}` after the prefix, the shape
    rlmt.py samples in."""
    from toy.tasks import continuations

    rows = continuations(split, n, seed)
    for r in rows:
        r["thought"] = facts_thought(r["prompt"])
        r["completion"] = f"<think>\n{r['thought']}\n</think>\n\n{r['reference']}"
    return rows


def check_document(text: str, domain: str | None = None) -> list[bool | None]:
    """Per line of a toy document: True (consistent), False (breaks the grammar or a fact), None
    (blank)."""
    domain = domain or detect_domain(text)
    if domain is None:
        raise ValueError("text does not open like a toy document (story, news or code)")
    st: dict = {}
    return [_CHECKERS[domain](line, st) for line in text.split("\n")]


# A last line cut off mid-way (no newline after it) is judged unknown only while it can still become
# a line of its grammar: it is no longer than the grammar's longest line (MAX_LINE, over 40,000
# generated documents) and it is the start of some line shape below (a partial regex match).
# Otherwise it is wrong: an "unknown" tail that anything could fill was a reward hack (one valid
# line, then run-on text or junk that never ends a line).
MAX_LINE = {"story": 85, "news": 112, "code": 32}


def _alternatives(*patterns: str) -> regex.Pattern:
    return regex.compile("|".join(f"(?:{p})" for p in patterns))


_REMARKS = [re.escape(o).replace(re.escape("{p}"), "[a-z ]+") for o in _N_OPINIONS] + [
    r"said \d+ million dollars was too much"
]
_LINE_SHAPES = {  # every line a continuation can write (the first lines are in the prefix)
    "story": _alternatives(
        _STORY_INIT.pattern,
        *(r"On [A-Z][a-z]+ [a-z]+, " + b.pattern for b in (_STORY_MOVE, _STORY_GIVE, _STORY_COUNT)),
        _STORY_END.pattern,
    ),
    "news": _alternatives(
        _NEWS_CAST.pattern,
        _NEWS_SPEAKERS.pattern,
        _NEWS_END.pattern,
        *(
            r"At \d+:\d\d, " + b
            for b in (
                _NEWS_COST.pattern,
                _NEWS_VOTE.pattern,
                _NAME + " (?:" + "|".join(_REMARKS) + r")\.",
            )
        ),
    ),
    "code": _alternatives(
        *(
            p.pattern
            for p in (_CODE_CONST, _CODE_DEF, _CODE_SET, _CODE_CALL, _CODE_RET, _CODE_PRINT)
        )
    ),
}


def could_become_a_line(text: str, domain: str) -> bool:
    """Whether `text` is the start of a line the domain's grammar writes (its shape, not yet its
    facts)."""
    return (
        len(text) <= MAX_LINE[domain]
        and _LINE_SHAPES[domain].fullmatch(text, partial=True) is not None
    )


def _clean_generated(text: str) -> str:
    for stop in ("<|endoftext|>", "<|im_end|>"):
        text = text.split(stop, 1)[0]
    return text


class ContinuationJudge:
    """Pairwise judge of document continuations under the toy grammars (a stand-in for an LLM
    judge).

    The prefix is replayed line by line to rebuild the facts (cast and counts, council and tally,
    defined functions); every continuation line is then checked against them. A line's verdict:
    +1 if consistent, -`penalty` if it breaks the grammar or a fact; a last line cut off
    mid-way (no newline after it) that does not parse is ignored while it can still become a line of
    the grammar (`could_become_a_line`), and wrong otherwise. A continuation's points s sum its
    lines' verdicts, a wrong line counted once per grammar's longest line (MAX_LINE) of the
    continuation's text in it, so one run-on wrong line does not beat two short wrong ones. `prefer`
    returns sigmoid(sharpness * (s_a - s_b)); None when the prefix is not a toy document.
    """

    def __init__(self, penalty: float = 2.0, sharpness: float = 2.0):
        self.penalty, self.sharpness = penalty, sharpness

    def line_verdicts(self, prefix: str, continuation: str) -> list[bool] | None:
        judged = self.judged_lines(prefix, continuation)
        return None if judged is None else [v for v, _ in judged]

    def judged_lines(self, prefix: str, continuation: str) -> list[tuple[bool, int]] | None:
        """(verdict, characters of the continuation in that line) of every judged line."""
        domain = detect_domain(prefix)
        if domain is None:
            return None
        continuation = _clean_generated(continuation)
        full, st, judged, pos = prefix + continuation, {}, [], 0
        lines = full.split("\n")
        for i, line in enumerate(lines):
            v = _CHECKERS[domain](line, st)
            end = pos + len(line)
            if end > len(prefix) or (line == "" and pos >= len(prefix) and i < len(lines) - 1):
                if i == len(lines) - 1 and not v:
                    # cut off mid-line (or an empty tail): unknown, not wrong, if it can still
                    # become a line
                    v = None if could_become_a_line(line, domain) else False
                if v is not None:
                    judged.append((v, end + 1 - max(pos, len(prefix))))  # its newline included
            pos = end + 1
        return judged

    def _points(self, prefix: str, continuation: str) -> float | None:
        judged, domain = self.judged_lines(prefix, continuation), detect_domain(prefix)
        if judged is None:
            return None
        # a wrong line counts once per longest-line's worth of text it spoils: a run-on line is
        # several
        return sum(
            1.0 if v else -self.penalty * math.ceil(n / (MAX_LINE[domain] + 1)) for v, n in judged
        )

    def prefer(
        self, prefixes: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> list[float | None]:
        """Probability that continuation a is better than b, per prefix (0.5 on a tie)."""
        out = []
        for p, x, y in zip(prefixes, a, b, strict=True):
            sa, sb = self._points(p, x), self._points(p, y)
            out.append(None if sa is None else 1.0 / (1.0 + math.exp(-self.sharpness * (sa - sb))))
        return out

    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        """Pointwise: share of the continuation's judged lines that are consistent (0 if none). The
        facts are rebuilt from the prefix, so a reference continuation adds nothing to this check
        and is accepted but not read."""
        out = []
        for p, c in zip(prefixes, continuations, strict=True):
            v = self.line_verdicts(p, c)
            out.append(None if v is None else (sum(v) / len(v) if v else 0.0))
        return out


def prompt_text(prompt) -> str:
    """The user's request from a prompt given as text, as a message list, or as rendered chat
    text."""
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


_ARITH = re.compile(r"[A-Z][a-z]+ has (\d+) ([a-z]+)\. (?:He|She) (.+)\. How many \2 now\?")
_CLAUSES = [
    (re.compile(t.replace("{}", r"(\d+)")), sign)
    for ts, sign in ((_ADD, 1), (_SUB, -1))
    for t in ts
]


def parse_arithmetic(prompt) -> tuple[str, str] | None:
    """(gold answer, answer style) of a toy arithmetic word problem (toy.arithmetic), read from its
    text alone, or None if it is not one. The style is the prompt's: `\\boxed{}` asked for (math),
    lettered choices (mc: the gold is the letter of the computed value), else gsm8k."""
    text = prompt_text(prompt).strip()
    question, *rest = text.split("\n")
    m = _ARITH.fullmatch(question)
    if m is None:
        return None
    value = int(m.group(1))
    for clause in re.split(r", then |, ", m.group(3)):
        found = [(sign, int(c.group(1))) for pat, sign in _CLAUSES if (c := pat.fullmatch(clause))]
        if not found:
            return None
        value += found[0][0] * found[0][1]
    choices = dict(re.findall(r"^([A-D])\) (\d+)$", "\n".join(rest), re.M))
    if choices:
        letters = [k for k, v in choices.items() if int(v) == value]
        return (letters[0], "mc") if letters else None
    return str(value), "math" if "\\boxed{}" in text else "gsm8k"


class AnswerJudge:
    """Grades the final answer of a toy instruction or toy arithmetic problem (a stand-in for an LLM
    judge).

    Only the answer counts: the text after the last `</think>` (the whole response if it has no
    `<think>`), stripped. Returns None ("invalid") when there is no answer (empty, or a `<think>`
    never closed) or the prompt is not a toy instruction; 1.0 for the exact answer; otherwise
    `partial_credit` * (1 - normalized edit distance), so near misses rank above nonsense.
    Arithmetic: 1.0 when the answer line, in the format the prompt asks for, holds the computed
    value (rewards.correct), else 0.0.
    """

    def __init__(self, partial_credit: float = 0.5):
        self.partial_credit = partial_credit

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float | None]:
        # lazily: the module that builds judges imports toy, so a top-level import would be a cycle
        import rewards

        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            parsed = parse_instruction(prompt)
            answer = rewards.strip_think(
                _clean_generated(response)
            )  # "" when a thought never closes
            arith = parse_arithmetic(prompt) if parsed is None else None
            if (parsed is None and arith is None) or not answer.strip():
                out.append(None)
                continue
            if arith is not None:
                out.append(rewards.correct([answer], [arith[0]], [arith[1]])[0])
                continue
            gold, answer = _solve_instruction(*parsed), answer.strip()
            if answer == gold:
                out.append(1.0)
            else:
                sim = Levenshtein.normalized_similarity(answer, gold)  # 1 - distance / max length
                out.append(self.partial_credit * sim)
        return out
