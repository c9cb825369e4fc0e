"""A client for OpenAI-compatible servers (vLLM, SGLang, `transformers serve`), standard library
only.

- `post_json`: one JSON POST with a timeout, retries and exponential backoff; a failure is a
  ServerError, one line
  naming the URL and the cause (a errors.UserError: scripts print it and exit 2);
- `CompletionClient`: n samples of one prompt from /v1/completions (a text prompt) or
  /v1/chat/completions (a list of messages), in one request when the server honours `n`, else in n
  seeded requests; `map` keeps `concurrency` requests in flight over many prompts and hands each
  finished one back in the caller's thread, so the caller can save it at once and a killed run
  resumes where it stopped.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import errors


class ServerError(errors.UserError):
    """A server could not answer (down, timing out, 4xx, 5xx after the retries, not an OpenAI
    reply): one line, "{what} {url}: {cause}"."""


def _error(what: str, url: str, cause: str) -> ServerError:
    return ServerError(
        f"{what} {url}: {' '.join(cause.split())}"
    )  # one line, whatever the server sent


def network_cause(e: BaseException, timeout: float) -> str:
    """A refused, reset, timed-out or unresolvable connection in a few words (urllib wraps the
    socket error)."""
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


def endpoint_url(base_url: str, chat: bool) -> str:
    """.../v1/completions or .../v1/chat/completions from "http://host:port", ".../v1" or the
    endpoint itself."""
    base, path = base_url.rstrip("/"), "/chat/completions" if chat else "/completions"
    if base.endswith(path):
        return base
    return base + path if base.endswith("/v1") else base + "/v1" + path


def post_json(
    url: str,
    body: dict,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    api_key: str | None = None,
    what: str = "server",
    on_attempt=None,
) -> dict:
    """POST `body` as JSON and return the JSON object answered.

    Connection errors, timeouts (`timeout` seconds per attempt), 408, 429 and 5xx are retried
    `retries` times with exponential backoff (the k-th retry waits backoff * 2^(k-1) s): a server
    that is starting, overloaded or restarting gets time to recover. Another 4xx, or an answer that
    is not a JSON object, raises at once: asking again would get the same. on_attempt() is called
    before each HTTP attempt (a request counter)."""
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    cause = "no attempt made"
    for attempt in range(max(0, retries) + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        if on_attempt is not None:
            on_attempt()
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            cause = f"HTTP {e.code} {e.reason}: {e.read()[:200].decode('utf-8', 'replace')}"
            if e.code in (408, 429) or e.code >= 500:
                continue
            raise _error(what, url, cause) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            cause = network_cause(e, timeout)
            continue
        try:
            payload = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise _error(what, url, f"response is not JSON ({e})") from None
        if not isinstance(payload, dict):
            raise _error(what, url, f"unexpected response {str(payload)[:200]}")
        return payload
    tries = max(0, retries) + 1
    raise _error(what, url, f"{cause} (after {tries} {'try' if tries == 1 else 'tries'})")


@dataclass
class Choice:
    """One sample: its text (chat: the message content), why it ended as the server said ("stop",
    "length", ...), and the reasoning a chat server split off the content, if any."""

    text: str
    finish_reason: str | None
    reasoning: str | None = None


class CompletionClient:
    """Samples from an OpenAI-compatible server: POST {base_url}/v1/completions (chat=False; a
    prompt is a string) or /v1/chat/completions (chat=True; a prompt is a list of messages).

    `n`: vLLM and SGLang return n choices for one request, `transformers serve` one. use_n="auto"
    sends n; when fewer come back it keeps the first, asks for the rest one by one and remembers
    (`supports_n` = False) to send separate requests from then on; "yes" always sends n (a short
    answer is an error), "no" never. Separate request j carries seed + j, so a rerun draws the same
    samples from a server that honours `seed`.

    `transformers serve` (transformers 5.x) answers HTTP 422 to a field it does not know, ignores n
    and, unless the request carries its own "generation_config" (a JSON string), lets the model's
    generation config decide whether to sample (the toy base: greedy, whatever temperature says) and
    with which top_k. So a sampled request (temperature > 0) carries generation_config =
    {"do_sample": true, "temperature": T, "top_p": P, "top_k": 0} (top_k 0: no top-k cut, as in the
    OpenAI API; transformers' default is 50). It honours seed (it seeds its one global torch
    generator, so seeded samples repeat only with concurrency=1), max_tokens and stop, and answers
    finish_reason "length" on a max_tokens cut, "stop" otherwise. vLLM and SGLang ignore
    generation_config: vLLM's request models allow extra fields and only log their names
    (OpenAIBaseModel, extra="allow", in vllm/entrypoints/openai), SGLang's are pydantic models with
    the default extra="ignore" (sglang/srt/entrypoints/openai/protocol.py). generation_config=False
    leaves it out, for a server that would reject it. temperature == 0 is greedy everywhere.

    `stop`: vLLM and SGLang cut the text before the stop string, `transformers serve` leaves it in,
    so the text is cut at the first stop string here: every server then gives the same text.

    Errors: each request as post_json (timeout, retries, backoff); `requests` counts the HTTP
    attempts sent.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        chat: bool = False,
        concurrency: int = 8,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 1.0,
        api_key: str | None = None,
        use_n: str = "auto",
        generation_config: bool = True,
    ):
        if use_n not in ("auto", "yes", "no"):
            raise ValueError(f"use_n must be 'auto', 'yes' or 'no', got {use_n!r}")
        self.url, self.model, self.chat = endpoint_url(base_url, chat), model, chat
        self.concurrency, self.timeout = max(1, int(concurrency)), float(timeout)
        self.retries, self.backoff, self.api_key = max(0, int(retries)), float(backoff), api_key
        self.use_n, self.generation_config = use_n, generation_config
        self.supports_n: bool | None = None  # learnt from the first answer to an n > 1 request
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def _request(
        self,
        prompt,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str] | None,
    ) -> list[Choice]:
        body = {
            "model": self.model,
            "messages" if self.chat else "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
        }
        if n > 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = list(stop)
        if temperature > 0 and self.generation_config:
            body["generation_config"] = json.dumps(
                {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            )
        payload = post_json(
            self.url,
            body,
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            api_key=self.api_key,
            on_attempt=self._count,
        )
        try:
            choices = sorted(payload["choices"], key=lambda c: c.get("index", 0))
            out = []
            for c in choices:
                if (
                    self.chat
                ):  # servers name the thought they split off "reasoning" or "reasoning_content"
                    message = c["message"]
                    text, reasoning = (
                        message.get("content") or "",
                        message.get("reasoning") or message.get("reasoning_content"),
                    )
                else:
                    text, reasoning = c["text"] or "", None
                cuts = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
                out.append(
                    Choice(text[: min(cuts)] if cuts else text, c.get("finish_reason"), reasoning)
                )
        except (KeyError, TypeError, AttributeError):
            raise _error("server", self.url, f"unexpected response {str(payload)[:200]}") from None
        if not out:
            raise _error("server", self.url, f"no choices in the response {str(payload)[:200]}")
        return out

    def complete(
        self,
        prompt,
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str] | None = None,
    ) -> list[Choice]:
        """Exactly n samples of `prompt` (a ServerError when the server cannot give them)."""
        return self._complete(
            prompt,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )

    def _complete(
        self, prompt, *, n, max_tokens, temperature, top_p, seed, stop=None, cancel=None
    ) -> list[Choice]:
        args = (max_tokens, temperature, top_p)
        out: list[Choice] = []
        if n > 1 and (
            self.use_n == "yes" or (self.use_n == "auto" and self.supports_n is not False)
        ):
            out = self._request(prompt, n, *args, seed, stop)[:n]
            if len(out) < n and self.use_n == "yes":
                raise _error(
                    "server",
                    self.url,
                    f"asked for n={n} choices, got {len(out)} (use_n='auto' or 'no' "
                    "for a server that ignores n)",
                )
            if self.use_n == "auto":
                self.supports_n = len(out) == n
            out = (
                out if len(out) == n else out[:1]
            )  # the first is what separate request 0 (seed + 0) would draw
        for j in range(len(out), n):
            if cancel is not None and cancel.is_set():
                raise _error("server", self.url, "cancelled")
            out += self._request(prompt, 1, *args, None if seed is None else seed + j, stop)[:1]
        return out

    def map(self, jobs: list[dict], on_done) -> None:
        """complete(**job["request"]) for every job, `concurrency` at a time; on_done(job, result)
        is called in this thread as each job finishes (in completion order), with its list[Choice]
        or the ServerError it ended with. A failed job does not stop the others. An exception out of
        on_done (KeyboardInterrupt included), another exception out of a job (a bug, e.g. a
        malformed request) or a KeyboardInterrupt while waiting cancels the jobs not started and
        propagates."""
        todo, finished, cancel = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
        for job in jobs:
            todo.put(job)

        def work():
            while not cancel.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = self._complete(**job["request"], cancel=cancel)
                except (
                    BaseException
                ) as e:  # handed to the caller's thread: a ServerError as a result, others raised
                    result = e
                finished.put((job, result))

        # daemon threads, not a ThreadPoolExecutor: an interrupted run exits at once instead of
        # waiting at exit for the requests still in flight
        for _ in range(min(self.concurrency, len(jobs))):
            threading.Thread(target=work, daemon=True).start()
        try:
            for _ in range(len(jobs)):
                job, result = finished.get()
                if isinstance(result, BaseException) and not isinstance(result, ServerError):
                    raise result
                on_done(job, result)
        finally:
            cancel.set()
