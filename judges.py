"""LLM judges, duck typed: score(prompts, responses) -> [float | None] in [0, 1] (pointwise) and/or
prefer(prefixes, a, b) -> [float | None] = P(a is better than b) (pairwise). None means no usable verdict; every
judge counts `calls` and `invalid` verdicts, so scripts can log the invalid-judge rate.

- `LocalJudge`: a Hugging Face causal LM prompted as a judge, greedy, in this process;
- `HTTPJudge`: the same prompts sent to an OpenAI-compatible server (vLLM, SGLang, ...), standard library only;
- `CountedJudge`: adds the counters to a judge that has none (the toy world's `toy.AnswerJudge` and
  `toy.ContinuationJudge`, which live in the toy package);
- `make_judge`: one of the above from a `--judge` string ("toy", a URL, a model);
- `judge_reward`: a pointwise judge as a reward function of rewards.py's convention, shown the visible answer only
  (RLMT, arXiv 2509.20357: the thought is not judged);
- `pairwise_scores`: each of K candidates' mean win rate over all the others (full pairwise judging, as in
  Self-Improving Pretraining, arXiv 2601.21343).

A judge that cannot answer at all (its server is down, answers 4xx, or sends something that is not a chat
completion) raises JudgeError, a common.UserError: one line naming the URL and the cause.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import common
import rewards
from answers import completion_text, strip_think


class JudgeError(common.UserError):
    """A judge could not answer at all (e.g. its endpoint is down); an unparseable verdict is not an error."""


# ---- prompts and verdicts ---------------------------------------------------------------------------------------

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


# ---- the judges -------------------------------------------------------------------------------------------------

class LocalJudge:
    """A local Hugging Face causal LM prompted as a judge; greedy decoding with sampling.sample.

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
        import sampling

        rollout = sampling.sample(self.model, self.tokenizer, [self._render(c) for c in conversations], n=1,
                                  max_new_tokens=self.max_new_tokens, greedy=True, batch_size=self.batch_size)
        return rollout.texts(self.tokenizer, skip_special_tokens=True)

    def score(self, prompts: Sequence, responses: Sequence) -> list[float | None]:
        return _judge_score(self, prompts, responses)

    def prefer(self, prefixes: Sequence, a: Sequence, b: Sequence) -> list[float | None]:
        return _judge_prefer(self, prefixes, a, b)


def _network_cause(e: BaseException, timeout: float) -> str:
    """A refused, reset, timed-out or unresolvable connection in a few words (urllib wraps the socket error)."""
    reason = getattr(e, "reason", e)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionResetError):
        return "connection reset"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


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

    def _fail(self, cause: str) -> JudgeError:
        return JudgeError(f"judge {self.url}: {' '.join(cause.split())}")  # one line, whatever the server sent

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
                cause = f"HTTP {e.code} {e.reason}: {e.read()[:200].decode('utf-8', 'replace')}"
                if e.code in (408, 429) or e.code >= 500:
                    continue
                raise self._fail(cause) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                cause = _network_cause(e, self.timeout)
                continue
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise self._fail(f"response is not JSON ({e})") from None
            try:
                return payload["choices"][0]["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError):
                raise self._fail(f"unexpected response {str(payload)[:200]}") from None
        tries = self.retries + 1
        raise self._fail(f"{cause} (after {tries} {'try' if tries == 1 else 'tries'})") from None

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
    return LocalJudge(common.load_model(spec), common.load_tokenizer(spec), **kwargs)


# ---- judges as rewards ------------------------------------------------------------------------------------------

def judge_reward(judge, prompt_column: str = "prompt") -> rewards.RewardFn:
    """A pointwise judge as a reward: judge.score(prompt column, visible answer); RLMT: the thought is not shown."""

    def judge_fn(completions: list, **columns) -> list[float | None]:
        if prompt_column not in columns:
            raise rewards.RewardError(f"judge reward needs column {prompt_column!r}; the batch has {sorted(columns)}")
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
            raise rewards.RewardError(f"judge.prefer returned {p} for candidates ({i}, {j}); "
                              f"expected a probability in [0, 1]")
        wins[i] += p
        wins[j] += 1.0 - p
        counts[i] += 1
        counts[j] += 1
    return [w / c if c else None for w, c in zip(wins, counts)]
