"""LLM judges, duck typed: score(prompts, responses) -> [float | None] in [0, 1] (pointwise) and/or
prefer(prefixes, a, b) -> [float | None] = P(a is better than b) (pairwise). None means no usable
verdict; every judge counts `calls` and `invalid` verdicts, so scripts can log the invalid-judge
rate.

- `LocalJudge`: a Hugging Face causal LM prompted as a judge, greedy, in this process;
- `HTTPJudge`: the same prompts sent to an OpenAI-compatible server (vLLM, SGLang, `transformers
  serve`) through
  serving.post_json (standard library only), with bounded concurrency, timeouts and retries;
- `VerdictCache`: judge replies keyed by their content, in memory and in a JSONL file, so a rerun or
  a resumed run
  asks only what it has not asked before;
- `CountedJudge`: adds the counters to a judge that has none (the toy world's `toy.AnswerJudge` and
  `toy.ContinuationJudge`, which live in the toy package);
- `make_judge`: one of the above from a `--judge` string ("toy", a URL, a model); `from_args`: from
  a script's --judge* flags;
- `judge_reward`: a pointwise judge as a reward function of rewards.py's convention, shown the
  visible answer only
  (RLMT, arXiv 2509.20357: the thought is not judged);
- `both_orders` / `win_tie_loss`: pairs asked in both orders, and their vote (RLMT's pairwise
  reward);
- `both_orders`: every pair asked in both orders in one batch (online DPO's full-pairwise scoring,
  dpo_online.full_pairwise, and RLMT's votes, win_tie_loss, are built on it).

The pairwise prompt is that paper's quality prompt (fig. 2), answered by "Conclusion: Option 1" or
"Option 2".

An in-process judge gives its verdict one of two ways (`verdict`, the scripts' --judge-verdict):
"generate" writes a reply and parses its last line, which a small model often fails to end as asked;
"logprobs" forces the reply to begin with the answer prefix ("Conclusion: Option " / "Score: ") and
reads the verdict from the next-token probabilities in one forward pass, so every verdict parses
unless those tokens carry almost no probability (the way sail-sg/oat's judge client reads the "1" /
"2" logprobs).

A judge that cannot answer at all (its server is down, answers 4xx, or sends something that is not a
chat completion) raises JudgeError, a errors.UserError: one line naming the URL and the cause.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

import errors
import loading
import rewards
import serving
from answers import completion_text, strip_think


class JudgeError(serving.ServerError):
    """A judge could not answer at all (e.g. its endpoint is down); an unparseable verdict is not an
    error."""


# ---- prompts and verdicts ------------------------------------------------------------------------


def _prompt_text(prompt) -> str:
    """A prompt column entry as text: a string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [
            m.get("content") or ""
            for m in prompt
            if isinstance(m, dict) and m.get("role") == "user"
        ]
        if users:
            return users[-1]
        return completion_text(prompt)
    raise TypeError(
        f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}"
    )


POINTWISE_SYSTEM = (
    "You are a strict grader. You judge only the final response, never the reasoning behind it."
)
POINTWISE_TEMPLATE = """Rate the response to the instruction below for correctness and helpfulness.

### Instruction
{prompt}

### Response
{response}

Give a short justification, then end with a last line of exactly this form, with an integer from \
{lo} to {hi}:
Score: <integer>"""
# pointwise with a reference (a document continuation against the document's own): the judge sees
# the prefix, the original continuation as a reference, and the continuation to rate; never a
# thought
POINTWISE_REFERENCE_TEMPLATE = """Rate the continuation of the text below for coherence with the \
text, fluency and \
consistency with everything the text states. The original continuation is given as a reference: a \
continuation \
need not repeat it, but must be as consistent and as good.

### Text
{prompt}

### Reference continuation
{reference}

### Continuation to rate
{response}

Give a short justification, then end with a last line of exactly this form, with an integer from \
{lo} to {hi}:
Score: <integer>"""

# Self-Improving Pretraining (arXiv 2601.21343), fig. 2: the quality judge's prompt, word for word.
PAIRWISE_TEMPLATE = """I have an original text fragment and 2 generated continuations that follow \
the original text \
fragment.

Original text fragment:
{prefix}

Option 1:
{first}

Option 2:
{second}

Judge which continuation is more coherent. If both continuations are coherent, choose the one \
that is more factual \
and otherwise high quality. Ignore whether continuations feel incomplete. In the final paragraph, \
output \
"Conclusion: Option 1" if you think option 1 is better otherwise output "Conclusion: Option 2"."""

SCORE_RANGE = (1, 10)
# Logprob verdicts: the reply starts with these, and the next token is the verdict.
PAIRWISE_ANSWER_PREFIX = "Conclusion: Option "
POINTWISE_ANSWER_PREFIX = "Score: "
# 1..9, one digit each: "10" is two tokens in digit-splitting vocabularies (Qwen3, SmolLM2), where
# P("1") would mix a 1 with the first half of a 10.
LOGPROB_SCORE_RANGE = (1, 9)
MIN_VERDICT_MASS = (
    1e-3  # answer tokens with less of the next-token probability than this: invalid, never guessed
)
VERDICT_MODES = ("auto", "logprobs", "generate")
_SCORE_LINE = re.compile(r"score\s*:\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?", re.IGNORECASE)
_CONCLUSION = re.compile(r"conclusion\W*option\W*([12])\b", re.IGNORECASE)


def _last_line(text: str) -> str:
    lines = [
        line.strip().strip("*").strip() for line in strip_think(text or "").strip().splitlines()
    ]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def parse_score(text: str, lo: float = SCORE_RANGE[0], hi: float = SCORE_RANGE[1]) -> float | None:
    """A verdict's "Score: N" on its last non-empty line (after any think block), mapped to [0, 1]
    as (N - lo) / (hi - lo); None when the line is missing, malformed or out of [lo, hi]."""
    m = _SCORE_LINE.fullmatch(_last_line(text))
    if not m:
        return None
    value = float(m.group(1))
    if not (lo <= value <= hi):
        return None
    return (value - lo) / (hi - lo)


def parse_option(text: str) -> int | None:
    """1 or 2 from "Conclusion: Option N" in the last paragraph of a verdict (after any think block;
    markdown emphasis allowed); None when it is missing there or names both options."""
    paragraphs = [p for p in re.split(r"\n\s*\n", strip_think(text or "").strip()) if p.strip()]
    found = set(_CONCLUSION.findall(paragraphs[-1])) if paragraphs else set()
    return int(found.pop()) if len(found) == 1 else None


def option_probability(probs: Sequence[float]) -> float | None:
    """P(option 1) = p1 / (p1 + p2) from the next-token probabilities of "1" and "2"; None (invalid)
    when the two carry less than MIN_VERDICT_MASS."""
    p1, p2 = probs
    return None if p1 + p2 < MIN_VERDICT_MASS else p1 / (p1 + p2)


def expected_score(
    probs: Sequence[float], lo: int = LOGPROB_SCORE_RANGE[0], hi: int = LOGPROB_SCORE_RANGE[1]
) -> float | None:
    """The expected score sum_s s p(s) / sum_s p(s) over the scores lo..hi (their next-token
    probabilities, in order), mapped to [0, 1] as (E - lo) / (hi - lo); None (invalid) when they
    carry less than MIN_VERDICT_MASS.

    The expectation rather than the argmax: a graded reward separates responses that the argmax
    ties, and a GRPO group of equal rewards teaches nothing (G-Eval, arXiv 2303.16634, sec. 2,
    weights scores by their
    probabilities for the same reason)."""
    mass = sum(probs)
    if mass < MIN_VERDICT_MASS:
        return None
    return (sum(p * s for p, s in zip(probs, range(lo, hi + 1), strict=True)) / mass - lo) / (
        hi - lo
    )


def _answer_split(tokenizer, texts: list[str], prefix: str, choices: Sequence[str]):
    """For each text + prefix: the ids the judge reads and, per choice, the one token that writes it
    next.

    Each text + prefix + choice is tokenized whole and the ids are cut where the choices part, so
    the answer is read in the vocabulary's own form: after "Option" where it glues the space to the
    digit (" 1"), after the space
    where it splits digits off (Qwen3, SmolLM2, the toy's characters)."""
    rows = tokenizer([t + prefix + c for t in texts for c in choices], add_special_tokens=False)[
        "input_ids"
    ]
    reads, options = [], []
    for i in range(len(texts)):
        group = rows[i * len(choices) : (i + 1) * len(choices)]
        n = 0
        while all(len(r) > n for r in group) and len({r[n] for r in group}) == 1:
            n += 1
        tails = [r[n:] for r in group]
        if any(len(t) != 1 for t in tails) or len({t[0] for t in tails}) != len(tails):
            raise errors.ConfigError(
                f"--judge-verdict logprobs: the judge's tokenizer writes the answers "
                f"{list(choices)} after {prefix!r} as {tails}, not one token each; pass "
                f"--judge-verdict generate"
            )
        reads.append(group[0][:n])
        options.append([t[0] for t in tails])
    return reads, options


@torch.no_grad()
def next_token_probs(
    model, rows: list[list[int]], options: list[list[int]], pad_id: int, batch_size: int | None = 16
) -> list[list[float]]:
    """P(each of `options[i]` as the next token after rows[i]): one forward pass per row, batched
    shortest first, left-padded with positions counted over real tokens (as sampling.sample does),
    logits of the last position only."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[list[float]] = [[] for _ in rows]
    step = batch_size or max(len(rows), 1)
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.tensor(
            [[pad_id] * (width - len(rows[i])) + rows[i] for i in chunk], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in chunk], device=device
        )
        logits = (
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
        probs = logits.softmax(-1)
        for row, i in enumerate(chunk):
            out[i] = probs[row, torch.tensor(options[i], device=device)].tolist()
    return out


def _pointwise_messages(prompts, responses, references=None, scale=SCORE_RANGE) -> list[list[dict]]:
    lo, hi = scale
    if references is None:
        return [
            [
                {"role": "system", "content": POINTWISE_SYSTEM},
                {
                    "role": "user",
                    "content": POINTWISE_TEMPLATE.format(
                        prompt=_prompt_text(p), response=strip_think(r), lo=lo, hi=hi
                    ),
                },
            ]
            for p, r in zip(prompts, responses)
        ]
    return [
        [
            {"role": "system", "content": POINTWISE_SYSTEM},
            {
                "role": "user",
                "content": POINTWISE_REFERENCE_TEMPLATE.format(
                    prompt=_prompt_text(p), reference=ref, response=strip_think(r), lo=lo, hi=hi
                ),
            },
        ]
        for p, r, ref in zip(prompts, responses, references, strict=True)
    ]


def _pairwise_messages(prefixes, first, second) -> list[list[dict]]:
    return [
        [{"role": "user", "content": PAIRWISE_TEMPLATE.format(prefix=p, first=x, second=y)}]
        for p, x, y in zip(prefixes, first, second)
    ]


def _judge_score(
    judge, prompts: Sequence, responses: Sequence, references: Sequence | None = None
) -> list[float | None]:
    if len(prompts) != len(responses):
        raise ValueError(f"score(): {len(prompts)} prompts but {len(responses)} responses")
    if getattr(judge, "verdict", "generate") == "logprobs":
        lo, hi = LOGPROB_SCORE_RANGE
        probs = judge.choice_probs(
            _pointwise_messages(prompts, responses, references, LOGPROB_SCORE_RANGE),
            POINTWISE_ANSWER_PREFIX,
            [str(s) for s in range(lo, hi + 1)],
        )
        scores = [expected_score(p, lo, hi) for p in probs]
    else:
        scores = [
            parse_score(v)
            for v in judge.generate(_pointwise_messages(prompts, responses, references))
        ]
    judge.calls += len(scores)
    judge.invalid += sum(s is None for s in scores)
    return scores


def _judge_prefer_ordered(
    judge, prefixes: Sequence, first: Sequence, second: Sequence
) -> list[float | None]:
    """One verdict per pair in the order shown: P(`first`, Option 1, wins); 1.0 or 0.0 from a
    generated verdict."""
    if not (len(prefixes) == len(first) == len(second)):
        raise ValueError(
            f"prefer(): lengths differ: {len(prefixes)} prefixes, {len(first)} first, "
            f"{len(second)} second"
        )
    messages = _pairwise_messages(prefixes, first, second)
    if getattr(judge, "verdict", "generate") == "logprobs":
        verdicts = [
            option_probability(p)
            for p in judge.choice_probs(messages, PAIRWISE_ANSWER_PREFIX, ["1", "2"])
        ]
    else:
        verdicts = [
            None if o is None else float(o == 1)
            for o in map(parse_option, judge.generate(messages))
        ]
    judge.calls += len(verdicts)
    judge.invalid += sum(v is None for v in verdicts)
    return verdicts


def _judge_prefer(judge, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
    """P(a better) with both orders asked in one batch: the mean of the valid votes (one order's
    vote when the other is unparseable), None when neither parses; generated votes that disagree
    give 0.5. Cancels position bias."""
    out: list[float | None] = []
    for ab, ba in both_orders(judge, prefixes, a, b):
        valid = [v for v in (ab, None if ba is None else 1.0 - ba) if v is not None]
        out.append(sum(valid) / len(valid) if valid else None)
    return out


class VerdictCache:
    """Judge replies keyed by the sha256 of everything that determines them (the judge, its sampling
    settings, the messages), in memory and appended to a JSONL file when `path` is given, so a rerun
    or a resumed run sends only what it has not asked before. A judge sampled at T > 0 then replays
    its first answer to the same question. A last line torn by a kill is ignored."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path, self.replies, self.hits = (Path(path) if path else None), {}, 0
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.replies[row["key"]] = row["reply"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(
            json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")
        ).hexdigest()

    def get(self, key: str) -> str | None:
        reply = self.replies.get(key)
        self.hits += reply is not None
        return reply

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")


def _cached(
    cache: VerdictCache | None, identity: tuple, conversations: list[list[dict]], ask
) -> list[str]:
    """Replies to `conversations`: the cached ones from `cache`, the others from ask(missing) (then
    cached)."""
    if cache is None:
        return ask(conversations)
    keys = [cache.key(*identity, c) for c in conversations]
    replies = [cache.get(k) for k in keys]
    missing = [i for i, r in enumerate(replies) if r is None]
    for i, reply in zip(missing, ask([conversations[i] for i in missing]) if missing else []):
        replies[i] = reply
        cache.put(keys[i], reply)
    return replies


# ---- the judges ----------------------------------------------------------------------------------


class LocalJudge:
    """A local Hugging Face causal LM prompted as a judge, in this process.

    verdict "generate": greedy replies (sampling.sample); score(): POINTWISE_TEMPLATE, "Score: N"
    (1-10) on the last line -> (N - 1) / 9; prefer(): PAIRWISE_TEMPLATE, "Conclusion: Option N" ->
    1.0 / 0.0. verdict "logprobs": the reply forced to begin with the answer prefix, one forward
    pass; score(): the expected score over "1".."9" (LOGPROB_SCORE_RANGE, asked for in the prompt)
    -> (E - 1) / 8; prefer(): p1 / (p1 + p2). prefer() asks both orders, prefer_ordered() one.
    Unusable verdicts are None and counted in `invalid` (of `calls`). Replies go through `cache` (a
    VerdictCache) when one is given.
    """

    verdict = "generate"

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 256,
        batch_size: int | None = 16,
        enable_thinking: bool = False,
        cache: VerdictCache | None = None,
        verdict: str = "generate",
    ):
        if verdict not in ("generate", "logprobs"):
            raise ValueError(f"verdict {verdict!r}: 'generate' or 'logprobs'")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.enable_thinking, self.cache, self.verdict = enable_thinking, cache, verdict
        self.calls = 0
        self.invalid = 0

    def _text(self, messages: list[dict]) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            # Qwen3 templates read enable_thinking; other templates ignore unknown variables
            return tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=self.enable_thinking,
            )
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def _render(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(self._text(messages), add_special_tokens=False)["input_ids"]

    def choice_probs(
        self, conversations: list[list[dict]], prefix: str, choices: Sequence[str]
    ) -> list[list[float]]:
        """Each conversation's reply forced to begin with `prefix`: the next-token probabilities of
        `choices`."""
        if not conversations:
            return []
        tok = self.tokenizer
        pad = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

        def ask(convs):
            rows, options = _answer_split(tok, [self._text(c) for c in convs], prefix, choices)
            return [
                json.dumps(p)
                for p in next_token_probs(self.model, rows, options, pad, self.batch_size)
            ]

        identity = (
            "local-logprobs",
            getattr(self.model, "name_or_path", ""),
            prefix,
            list(choices),
            self.enable_thinking,
        )
        return [json.loads(r) for r in _cached(self.cache, identity, conversations, ask)]

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy replies to chat conversations (special tokens dropped)."""
        if not conversations:
            return []
        import sampling

        def ask(convs):
            rollout = sampling.sample(
                self.model,
                self.tokenizer,
                [self._render(c) for c in convs],
                n=1,
                max_new_tokens=self.max_new_tokens,
                greedy=True,
                batch_size=self.batch_size,
            )
            return rollout.texts(self.tokenizer, skip_special_tokens=True)

        identity = (
            "local",
            getattr(self.model, "name_or_path", ""),
            self.max_new_tokens,
            self.enable_thinking,
        )
        return _cached(self.cache, identity, conversations, ask)

    def score(
        self, prompts: Sequence, responses: Sequence, references: Sequence | None = None
    ) -> list[float | None]:
        return _judge_score(self, prompts, responses, references)

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return _judge_prefer(self, prefixes, a, b)

    def prefer_ordered(
        self, prefixes: Sequence, first: Sequence, second: Sequence
    ) -> list[float | None]:
        return _judge_prefer_ordered(self, prefixes, first, second)


class HTTPJudge:
    """A judge behind an OpenAI-compatible server (vLLM, SGLang, ...): POST
    {base_url}/v1/chat/completions.

    Each request is a serving.post_json, `concurrency` of them in flight: connection errors,
    timeouts (`timeout` seconds per attempt), 408, 429 and 5xx are retried `retries` times with
    exponential backoff (the k-th retry waits backoff * 2^(k-1) seconds); after that, or on another
    4xx, a JudgeError (a serving.ServerError) names the URL and the cause. Same templates and
    parsing as LocalJudge; replies go through `cache` (a VerdictCache) when one is given, and
    `requests` counts the HTTP attempts actually sent.

    Verdicts are generated. Reading them from logprobs (max_tokens 1, top_logprobs, as sail-sg/oat's
    client does) needs the reply to continue the fixed answer prefix, which the OpenAI chat API
    cannot ask for (vLLM's continue_final_message extension can, `transformers serve` cannot); a
    server with logprobs but no such extension would need the raw completions endpoint and the
    judge's chat template on this side.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        api_key: str | None = None,
        backoff: float = 1.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        cache: VerdictCache | None = None,
    ):
        self.url = serving.endpoint_url(base_url, chat=True)
        self.model, self.concurrency, self.timeout = model, max(1, int(concurrency)), float(timeout)
        self.retries, self.api_key, self.backoff = max(0, int(retries)), api_key, float(backoff)
        self.max_tokens, self.temperature, self.top_p, self.cache = (
            max_tokens,
            temperature,
            top_p,
            cache,
        )
        self.calls = 0
        self.invalid = 0
        self.requests = 0  # HTTP attempts sent, retries included
        self._lock = threading.Lock()

    def _count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def _post(self, messages: list[dict]) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        try:
            payload = serving.post_json(
                self.url,
                body,
                timeout=self.timeout,
                retries=self.retries,
                backoff=self.backoff,
                api_key=self.api_key,
                what="judge",
                on_attempt=self._count_request,
            )
        except serving.ServerError as e:
            raise JudgeError(str(e)) from None
        try:
            return payload["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            cause = " ".join(f"unexpected response {str(payload)[:200]}".split())
            raise JudgeError(f"judge {self.url}: {cause}") from None

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Replies to chat conversations, `concurrency` requests in flight."""
        if not conversations:
            return []

        def ask(convs):
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(convs)))
            try:
                return list(pool.map(self._post, convs))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        identity = ("http", self.url, self.model, self.max_tokens, self.temperature, self.top_p)
        return _cached(self.cache, identity, conversations, ask)

    def score(
        self, prompts: Sequence, responses: Sequence, references: Sequence | None = None
    ) -> list[float | None]:
        return _judge_score(self, prompts, responses, references)

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return _judge_prefer(self, prefixes, a, b)

    def prefer_ordered(
        self, prefixes: Sequence, first: Sequence, second: Sequence
    ) -> list[float | None]:
        return _judge_prefer_ordered(self, prefixes, first, second)


class CountedJudge:
    """Adds `calls` / `invalid` (None verdicts) counters to a judge that has none, e.g. the toy
    judges."""

    def __init__(self, judge):
        self.judge = judge
        self.calls = 0
        self.invalid = 0

    def _count(self, verdicts) -> list[float | None]:
        verdicts = list(verdicts)
        self.calls += len(verdicts)
        self.invalid += sum(v is None for v in verdicts)
        return verdicts

    def score(
        self, prompts: Sequence, responses: Sequence, references: Sequence | None = None
    ) -> list[float | None]:
        extra = (
            {} if references is None else {"references": references}
        )  # judges without references stay usable
        return self._count(self.judge.score(prompts, responses, **extra))

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return self._count(self.judge.prefer(prefixes, a, b))

    def prefer_ordered(
        self, prefixes: Sequence, first: Sequence, second: Sequence
    ) -> list[float | None]:
        ask = getattr(self.judge, "prefer_ordered", None) or self.judge.prefer
        return self._count(ask(prefixes, first, second))


def make_judge(
    spec: str,
    pairwise: bool = False,
    model: str | None = None,
    *,
    cache: VerdictCache | str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
    api_key: str | None = None,
    device=None,
    verdict: str = "auto",
):
    """A judge from a command-line string. "toy": toy.AnswerJudge (toy.ContinuationJudge when
    `pairwise`) in a CountedJudge (a program: `verdict` does not apply); "http(s)://host:port[/v1]":
    HTTPJudge (`model` names the served model; the API key also comes from $OPENAI_API_KEY),
    generated verdicts; otherwise a model directory or hub id: LocalJudge on loading.load_model,
    verdicts from logprobs unless `verdict` is "generate" (greedy). `cache`: a VerdictCache or the
    path of its file ("" or None: none); the toy judges are not cached."""
    if verdict not in VERDICT_MODES:
        raise errors.ConfigError(f"--judge-verdict {verdict!r}: one of {', '.join(VERDICT_MODES)}")
    if isinstance(cache, (str, os.PathLike)):
        cache = VerdictCache(cache) if str(cache) else None
    if spec == "toy":
        import toy

        return CountedJudge(toy.ContinuationJudge() if pairwise else toy.AnswerJudge())
    if spec.startswith(("http://", "https://")):
        if verdict == "logprobs":
            raise errors.ConfigError(
                f"--judge-verdict logprobs: a server judge ({spec}) generates its verdict (the "
                f"chat API cannot continue a fixed answer prefix); pass --judge-verdict generate"
            )
        return HTTPJudge(
            spec,
            model=model or "default",
            concurrency=concurrency,
            timeout=timeout,
            retries=retries,
            api_key=api_key or os.environ.get("OPENAI_API_KEY"),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            cache=cache,
        )
    return LocalJudge(
        loading.load_model(spec, device=device),
        loading.load_tokenizer(spec),
        max_new_tokens=max_tokens,
        cache=cache,
        verdict="generate" if verdict == "generate" else "logprobs",
    )


@dataclass
class JudgeArgs:
    """The judge flags of the scripts that train against a judge (dpo_online, rlmt): a script's
    `Args` extends it and cli.TrainArgs."""

    judge: str = ""
    """'toy', an OpenAI-compatible URL, or a model dir / hub id (dpo_online: toy for the toy
    documents, required otherwise)"""
    judge_model: str = ""
    """model name sent to the judge server"""
    judge_concurrency: int = 16
    """judge requests in flight"""
    judge_timeout: float = 120.0
    """seconds per judge request before a retry"""
    judge_retries: int = 3
    """retries of a failed judge request (with backoff)"""
    judge_max_tokens: int = 512
    """verdict length limit"""
    judge_verdict: Literal["auto", "logprobs", "generate"] = "auto"
    """how a model judge run in this process gives its verdict: logprobs (read from the next-token
    probabilities after 'Conclusion: Option ' or 'Score: ', one forward pass, no explanation) or
    generate (an explanation, then the verdict line, parsed); auto: logprobs in process, generate
    for a server"""
    judge_temperature: float = 0.0
    """judge sampling temperature (0 is reproducible; Self-Improving Pretraining sampled at 1.0)"""
    judge_cache: str = "auto"
    """JSONL cache of judge replies; 'auto' = <out>/judge_cache.jsonl, '' = off"""


def from_args(args: JudgeArgs, pairwise: bool = False, device=None):
    """make_judge from a script's judge flags; --judge-cache 'auto' = <--out>/judge_cache.jsonl."""
    cache = args.judge_cache
    if cache == "auto":
        cache = str(Path(args.out) / "judge_cache.jsonl")
    return make_judge(
        args.judge,
        pairwise=pairwise,
        model=args.judge_model or None,
        cache=cache,
        max_tokens=args.judge_max_tokens,
        temperature=args.judge_temperature,
        concurrency=args.judge_concurrency,
        timeout=args.judge_timeout,
        retries=args.judge_retries,
        device=device,
        verdict=args.judge_verdict,
    )


# ---- judges as rewards ---------------------------------------------------------------------------


def judge_reward(judge, prompt_column: str = "prompt") -> rewards.RewardFn:
    """A pointwise judge as a reward: judge.score(prompt column, visible answer); RLMT: the thought
    is not shown."""

    def judge_fn(completions: list, **columns) -> list[float | None]:
        if prompt_column not in columns:
            raise rewards.RewardError(
                f"judge reward needs column {prompt_column!r}; the batch has {sorted(columns)}"
            )
        return list(
            judge.score(list(columns[prompt_column]), [strip_think(c) for c in completions])
        )

    judge_fn.__name__ = "judge"
    return judge_fn


def both_orders(
    judge, prefixes: Sequence, a: Sequence, b: Sequence
) -> list[tuple[float | None, float | None]]:
    """Each pair (a_k, b_k) asked in both orders, all in one judge batch (an HTTP judge keeps
    `concurrency` requests in flight): per pair (P(a_k wins) with a_k shown first, P(b_k wins) with
    b_k shown first), None where a verdict did not parse. Uses judge.prefer_ordered when it exists,
    else judge.prefer (a symmetric judge, like the toy one, then always agrees with itself). No
    pairs, no judge call."""
    if not (len(prefixes) == len(a) == len(b)):
        raise ValueError(
            f"both_orders(): lengths differ: {len(prefixes)} prefixes, {len(a)} a, {len(b)} b"
        )
    if not len(prefixes):
        return []
    ask = getattr(judge, "prefer_ordered", None) or judge.prefer
    verdicts = ask(list(prefixes) * 2, list(a) + list(b), list(b) + list(a))
    return list(zip(verdicts[: len(prefixes)], verdicts[len(prefixes) :]))


def win_tie_loss(judge, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
    """a against b, asked in both orders (both_orders): 1 when both orders prefer a, 0 when both
    prefer b, else 0.5, a tie (RLMT's pairwise reward against a reference, the model card
    Jarrodbarnes/qwen3-0.6B-interleaved-thinking); None when either order has no verdict. Unlike
    dpo_online.full_pairwise, each order is a vote: a probability counts only by its side of 0.5."""
    out: list[float | None] = []
    for first, second in both_orders(judge, prefixes, a, b):
        if first is None or second is None:
            out.append(None)
        else:
            # +1: a better; a judge that always picks one position votes both ways: a tie
            votes = {(first > 0.5) - (first < 0.5), (second < 0.5) - (second > 0.5)}
            out.append(1.0 if votes == {1} else 0.0 if votes == {-1} else 0.5)
    return out
