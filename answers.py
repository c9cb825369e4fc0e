"""Final answers: the visible answer after a think block, extraction of a final answer, and
equivalence.

- `strip_think`: what the reader sees, the text after the last `</think>` (an unclosed `<think>`
  leaves "");
- extraction: `extract_gsm8k` (lm-evaluation-harness's order: `####`, "The answer is", the last
  number), `extract_boxed` (the last \\boxed{}, as MATH solutions end), `extract_choice` (a letter
  A-J), `extract_answer` (picks one from the gold's form), `gold_answer` (a raw GSM8K / MATH
  solution to its final answer), `extract` (by a benchmark's answer rule);
- equivalence: `answers_match` (exact numbers, then a LaTeX normal form, then Math-Verify when
  installed); `is_correct` grades a completion by a benchmark's answer rule.

Model output is untrusted input: nothing here calls eval or sympify on it. rewards.correct is the
reward built from these pieces; the training scripts grade through it.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

# ---- the visible answer --------------------------------------------------------------------------
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def completion_text(completion) -> str:
    """A completion as text: strings pass; a conversational completion (list of messages) gives its
    last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and "content" in completion:
        return completion["content"] or ""
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content") or ""
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def strip_think(text) -> str:
    """The visible answer: text after the last </think>; "" if a <think> is never closed; else the
    text itself."""
    text = completion_text(text)
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return ""
    return text


# ---- extraction ----------------------------------------------------------------------------------

# A number: thousands with commas (1,234,567) or plain digits, optional decimals; "-" sign; ".5"
# too.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
# "The answer is" followed by a number; the phrase runs to the end of its clause: a line end, or . !
# ? ; , before a space. Its final number is the answer: models write "The answer is 8 - 3 = 5",
# whose first number is an operand.
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*\\?\(?\s*(?=" + _NUMBER + ")", re.IGNORECASE)
_CLAUSE_END_RE = re.compile(r"\n|[.!?;,](?=\s|$)")


def extract_gsm8k(text: str) -> str | None:
    """GSM8K answer (lm-evaluation-harness order): after `#### `, else the final number of the last
    "The answer is N ..." phrase (up to the end of its line or clause), else the last number in the
    text; commas removed. None when the text has no number."""
    found = _GSM8K_HASH_RE.findall(text)
    if found:
        return found[-1].replace(",", "")
    starts = [m.end() for m in _ANSWER_IS_RE.finditer(text)]
    if starts:
        phrase = _CLAUSE_END_RE.split(text[starts[-1] :], maxsplit=1)[0]
        return _NUMBER_RE.findall(phrase)[-1].replace(",", "")
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none or
    it never closes."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        # "\boxed 5" (no braces): the token after the space
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_CHOICE_PATTERNS = [
    # "Answer: B", "**Answer:** (B)", "answer: b"
    re.compile(r"answer\s*\**\s*[:：]\s*\**\s*[\(\[]?\s*([A-J])\b", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}"),
    # "the answer is (B)", "the correct answer is B"
    re.compile(r"answer\s+is\s*[:：]?\s*\**\s*[\(\[]?([A-J])\b"),
]


def extract_choice(text: str) -> str | None:
    """Multiple-choice letter A-J: the last "Answer: X", else the last \\boxed{X}, else "answer is
    (X)", else a final line that is only a letter ("B", "(B)", "B.")."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        m = re.fullmatch(r"\(?([A-J])[\).]?", lines[-1])
        if m:
            return m.group(1)
    return None


# ---- equivalence ---------------------------------------------------------------------------------
def _to_fraction(s: str) -> Fraction | None:
    """An exact number from "1,234", "-3.50", "1/2", "\\frac{1}{2}", "50%" (-> 1/2); None if s is
    not one."""
    s = s.strip().replace(",", "")
    if s.startswith("$"):
        s = s[1:]
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?\d+)?", s):
        # Fraction() alone would accept "1e400" or " nan"; keep to plain decimals and ratios
        return None
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def normalize_answer(s: str) -> str:
    """A string normal form for math answers: \\text{..} / \\mathrm{..} unwrapped (their content
    kept); no $, spaces, \\left, \\right, thin spaces, degree signs or trailing period; \\dfrac and
    \\tfrac -> \\frac, \\frac12 -> \\frac{1}{2}; a leading "x =" dropped."""
    s = str(s).strip()
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|mbox|textbf)\{([^{}]*)\}", r"\1", s)
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\%", "%"),
        ("\\$", ""),
        ("$", ""),
        ("\\(", ""),
        ("\\)", ""),
        ("\\[", ""),
        ("\\]", ""),
    ):
        s = s.replace(old, new)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    m = re.fullmatch(r"[a-zA-Z]\s*=(.+)", s)
    if m:
        s = m.group(1)
    return s


def _math_verify_equal(gold: str, pred: str) -> bool:
    """Math-Verify's verdict when the package is installed (gold first); False when absent or when
    it fails.

    Only its LaTeX extraction is used: that is a grammar-based parser, while its plain-expression
    extraction goes through sympy's parse_expr, which evaluates text. Its timeouts use SIGALRM,
    which only works in the main thread, so they are off elsewhere.
    """
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError:
        return False
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig()]
    try:
        g = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=seconds)
        p = parse(f"\\boxed{{{pred}}}", extraction_config=config, parsing_timeout=seconds)
        return bool(g and p and verify(g, p, timeout_seconds=seconds))
    except Exception:  # noqa: BLE001 - a parser failure on untrusted text is a "no", not a crashed training step
        return False


# a unit after a number: \text{...} (what MATH solutions write) or a plain unit word; "2x" is not a
# unit
_UNITS = (
    "mm|cm|m|km|in|inch|inches|ft|feet|foot|yd|yards|miles|mph|g|kg|lb|lbs|pounds|s|sec|seconds|min|minutes|"
    "h|hours|days|weeks|years|degrees|deg|dollars|cents|units|meters|percent|sq|square"
)
_UNIT_RE = re.compile(
    r"^(.*?\d)\s*(?:\\(?:text|mbox|mathrm)\{\s*[a-zA-Z .]+\}|(?:"
    + _UNITS
    + r"))(?:\^?\{?[23]\}?)?$"
)


def _strip_unit(s: str) -> str:
    """'12 \\text{ cm}', '12cm^2', '5 dollars' -> the number; anything else unchanged (Hendrycks et
    al.'s MATH normaliser also drops units after a number)."""
    m = _UNIT_RE.match(s.strip())
    return m.group(1) if m else s


def _split_top(s: str) -> list[str]:
    """Items of a tuple / interval / set at bracket depth 0: '(1,\\frac{1}{2}]' -> ['1',
    '\\frac{1}{2}']."""
    items, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "({["
        depth -= ch in ")}]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return items + [cur]


def fast_match(gold, pred) -> bool | None:
    """The cheap, dependable part of answers_match: True / False when it can decide (equal normal
    forms, two exact numbers, numbers with units, tuples and intervals item by item with the same
    brackets), None when only a symbolic checker can (Math-Verify)."""
    if pred is None or gold is None:
        return False
    g, p = normalize_answer(str(gold)), normalize_answer(str(pred))
    if g == p:
        return g != ""
    gn, pn = _to_fraction(_strip_unit(g)), _to_fraction(_strip_unit(p))
    if gn is not None and pn is not None:
        # "10%" is 1/10, and also the answer "10" to "what percent...": MATH's normaliser drops
        # the sign
        return gn == pn or (
            "%" in g + p and _to_fraction(g.rstrip("%")) == _to_fraction(p.rstrip("%"))
        )

    def brackets(t):
        return (t[:1], t[-1:]) if len(t) > 1 and t[0] in "([{" and t[-1] in ")]}" else None

    if brackets(g) and brackets(g) == brackets(p):
        gi, pi = _split_top(g[1:-1]), _split_top(p[1:-1])
        if len(gi) == len(pi) > 1:
            verdicts = [fast_match(a, b) for a, b in zip(gi, pi)]
            return None if None in verdicts else all(verdicts)
    return None


def answers_match(gold, pred) -> bool:
    """Same answer? Exact numbers (1,000 == 1000.0, 1/2 == 0.5 == \\frac{1}{2}, 5 cm == 5), equal
    normal forms (see normalize_answer), tuples and intervals item by item, else Math-Verify's
    verdict when it is installed (in this process: MathVerifier runs it in worker processes with a
    timeout)."""
    verdict = fast_match(gold, pred)
    return _math_verify_equal(str(gold), str(pred)) if verdict is None else verdict


def _verify_in_worker(gold: str, pred: str, seconds: int) -> str:
    """'yes' / 'no' / 'timeout': Math-Verify (gold first) in a worker process's main thread, where
    its SIGALRM timeouts work. LaTeX extraction only (see _math_verify_equal)."""
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    config = [LatexExtractionConfig()]
    try:
        g = parse(
            f"\\boxed{{{gold}}}",
            extraction_config=config,
            parsing_timeout=seconds,
            raise_on_error=True,
        )
        p = parse(
            f"\\boxed{{{pred}}}",
            extraction_config=config,
            parsing_timeout=seconds,
            raise_on_error=True,
        )
        return (
            "yes"
            if g and p and verify(g, p, timeout_seconds=seconds, raise_on_error=True)
            else "no"
        )
    except TimeoutException:
        return "timeout"
    except Exception:  # noqa: BLE001 - untrusted text that breaks the parser is a "no"
        return "no"


class MathVerifier:
    """answers_match over many pairs, Math-Verify in `workers` spawned processes with a per-answer
    `timeout` (seconds): a timeout is scored wrong and counted in `timeouts`; a worker stuck past
    twice the timeout (C code ignores SIGALRM) is killed with its pool. Without Math-Verify
    installed, undecided pairs are wrong and counted in `undecided`. Use as a context manager, or
    call close()."""

    def __init__(self, workers: int = 2, timeout: int = 5, worker=_verify_in_worker):
        import importlib.util

        self.available = importlib.util.find_spec("math_verify") is not None
        self.workers, self.timeout, self.timeouts, self.undecided, self._pool = (
            max(1, workers),
            int(timeout),
            0,
            0,
            None,
        )
        # (gold, pred, seconds) -> 'yes' | 'no' | 'timeout', importable by a spawned process
        self.worker = worker

    def check(self, pairs: list[tuple]) -> list[bool]:
        import multiprocessing

        out = [fast_match(g, p) for g, p in pairs]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo and not self.available:
            self.undecided += len(todo)
            return [bool(v) for v in out]
        if todo and self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        jobs = {
            i: self._pool.apply_async(
                self.worker, (str(pairs[i][0]), str(pairs[i][1]), self.timeout)
            )
            for i in todo
        }
        for i, job in jobs.items():
            try:
                verdict = job.get(timeout=2 * self.timeout + 5)
            except multiprocessing.TimeoutError:
                verdict = "timeout"
                # the stuck worker goes with its pool; the rest of `jobs` then fail fast as timeouts
                self.close()
            except Exception:  # noqa: BLE001 - a pool torn down by close() above
                verdict = "timeout"
            self.timeouts += verdict == "timeout"
            out[i] = verdict == "yes"
        return [bool(v) for v in out]

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- gold answers and the rule per sample --------------------------------------------------------
def gold_answer(answer) -> str:
    """A gold answer column entry as a plain answer: raw GSM8K solutions keep what follows ####; raw
    MATH solutions their last \\boxed{}."""
    s = str(answer).strip()
    if "####" in s:
        return s.rsplit("####", 1)[1].strip().replace(",", "")
    if "\\boxed" in s:
        return extract_boxed(s) or s
    return s


def is_choice(gold: str) -> bool:
    """A gold answer that is a multiple-choice letter: "B" or "(B)"."""
    return re.fullmatch(r"\(?[A-J]\)?", gold.strip()) is not None


def extract_answer(text: str, gold: str | None = None) -> str | None:
    """The final answer of a completion, after any think block: a letter when the gold is a letter
    (multiple choice), else the last \\boxed{} when there is one, else the GSM8K rules (####, "The
    answer is", last number)."""
    visible = strip_think(text)
    if gold is not None and is_choice(gold):
        return extract_choice(visible)
    boxed = extract_boxed(visible)
    if boxed is not None:
        return boxed
    return extract_gsm8k(visible)


# the `style` column of a data set -> its extraction rule (the toy arithmetic task and eval sets
# label rows)
EXTRACTORS = {"gsm8k": extract_gsm8k, "math": extract_boxed, "mc": extract_choice}


def extract(rule: str, completion: str) -> str | None:
    """The final answer a completion gives under an answer rule (a key of EXTRACTORS), from the text
    after any think block."""
    return EXTRACTORS[rule](strip_think(completion))


def is_correct(rule: str, completion: str, gold: str) -> bool:
    """Is `completion` right under answer rule `rule` (gsm8k, math, mc; benchmarks.RULE names each
    benchmark's)? A letter must equal the gold's, "(b)" as "B"; a number or expression goes through
    answers_match (Math-Verify in this process; eval_reasoning.py runs it in worker processes),
    against the final answer of a raw GSM8K solution."""
    if rule not in EXTRACTORS:
        raise ValueError(f"unknown answer rule {rule!r} (known: {', '.join(EXTRACTORS)})")
    pred = extract(rule, completion)
    if rule == "mc":
        return pred is not None and pred == str(gold).strip().strip("()").upper()
    return answers_match(gold_answer(gold) if rule == "gsm8k" else gold, pred)
