"""serving.py: post_json's retries and one-line errors, CompletionClient's n / seeded-requests
fallback and map(), first against a scripted server on 127.0.0.1, then against a real `transformers
serve` on the toy base."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, script_env, start_transformers_serve, stop_server

import errors
import serving
import toy


@pytest.fixture
def server(openai_server):
    return openai_server()


SAMPLE = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95}


def test_endpoint_urls():
    for base in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/completions"):
        assert serving.endpoint_url(base, chat=False) == "http://h:1/v1/completions"
    for base in ("http://h:1", "http://h:1/v1/", "http://h:1/v1/chat/completions"):
        assert serving.endpoint_url(base, chat=True) == "http://h:1/v1/chat/completions"


def test_n_honoured_is_one_request(server):
    client = serving.CompletionClient(server.url, "m")
    choices = client.complete("2+2=", n=3, seed=7, **SAMPLE)
    assert [c.text for c in choices] == [f"seed=7 i={i} STOP tail" for i in range(3)]
    assert [c.finish_reason for c in choices] == ["stop"] * 3
    assert (client.requests, client.supports_n) == (1, True)
    path, body = server.bodies()[0]
    assert (
        path == "/v1/completions"
        and body["n"] == 3
        and body["prompt"] == "2+2="
        and body["seed"] == 7
    )
    # transformers serve samples only when told so in its own field, a JSON string
    assert json.loads(body["generation_config"]) == {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 0,
    }
    client.complete("2+2=", n=2, seed=None, max_tokens=16, temperature=0.0, top_p=1.0)
    _, greedy = server.bodies()[-1]
    assert (
        "generation_config" not in greedy and "seed" not in greedy and greedy["temperature"] == 0.0
    )


def test_n_ignored_falls_back_to_seeded_requests(openai_server):
    server = openai_server(honour_n=False)
    client = serving.CompletionClient(server.url + "/v1", "m", chat=True)
    messages = [{"role": "user", "content": "hi"}]
    choices = client.complete(messages, n=3, seed=10, **SAMPLE)
    # the first answer (seed 10) is kept; the rest asked one by one with seed + j
    assert [c.text for c in choices] == [
        "seed=10 i=0 STOP tail",
        "seed=11 i=0 STOP tail",
        "seed=12 i=0 STOP tail",
    ]
    assert (client.requests, client.supports_n) == (3, False)
    assert [b.get("n") for _, b in server.bodies()] == [3, None, None]
    assert all(
        path == "/v1/chat/completions" and b["messages"] == messages for path, b in server.bodies()
    )
    server.requests.clear()
    assert (
        len(client.complete(messages, n=2, seed=None, **SAMPLE)) == 2
    )  # remembered: n never sent again
    assert [("n" in b, "seed" in b) for _, b in server.bodies()] == [(False, False)] * 2

    never = serving.CompletionClient(server.url, "m", use_n="no")
    server.requests.clear()
    assert [c.text for c in never.complete("p", n=2, seed=0, **SAMPLE)] == [
        "seed=0 i=0 STOP tail",
        "seed=1 i=0 STOP tail",
    ]
    assert ["n" in b for _, b in server.bodies()] == [False, False] and never.supports_n is None
    with pytest.raises(serving.ServerError, match=r"asked for n=2 choices, got 1"):
        serving.CompletionClient(server.url, "m", use_n="yes").complete("p", n=2, seed=0, **SAMPLE)


def test_finish_reason_and_stop(server):
    client = serving.CompletionClient(server.url, "m")
    (cut,) = client.complete("p", n=1, seed=1, max_tokens=2, temperature=1.0, top_p=1.0)
    assert cut.finish_reason == "length"
    (stopped,) = client.complete("p", n=1, seed=1, stop=["STOP", "i="], **SAMPLE)
    assert (stopped.text, stopped.finish_reason) == (
        "seed=1 ",
        "stop",
    )  # cut before the first stop string
    assert server.bodies()[-1][1]["stop"] == ["STOP", "i="]


def test_retries_503_then_success(server):
    server.plan = ["503", "503"]
    attempts = []
    payload = serving.post_json(
        server.url + "/v1/completions",
        {"model": "m", "prompt": "p", "max_tokens": 8},
        timeout=5,
        retries=2,
        backoff=0.01,
        on_attempt=lambda: attempts.append(1),
    )
    assert payload["choices"][0]["text"].startswith("seed=None") and len(attempts) == 3
    server.plan = ["503"] * 3
    client = serving.CompletionClient(server.url, "m", retries=2, backoff=0.01)
    with pytest.raises(
        serving.ServerError,
        match=rf"^server {server.url}/v1/completions: HTTP 503 Service "
        r"Unavailable: .*busy.* \(after 3 tries\)$",
    ):
        client.complete("p", n=1, seed=0, **SAMPLE)
    assert client.requests == 3


def test_client_errors_raise_at_once(server):
    server.plan = ["404"]
    client = serving.CompletionClient(server.url, "m", retries=3, backoff=0.01)
    with pytest.raises(serving.ServerError) as e:
        client.complete("p", n=1, seed=0, **SAMPLE)
    assert (
        str(e.value)
        == f'server {server.url}/v1/completions: HTTP 404 Not Found: {{"error": "no such model"}}'
    )
    assert client.requests == 1  # a client error is not retried
    assert (
        isinstance(e.value, errors.UserError)
        and e.value.__cause__ is None
        and e.value.__suppress_context__
    )
    server.plan = ["junk"]
    with pytest.raises(serving.ServerError, match=r"^server .*: response is not JSON \("):
        client.complete("p", n=1, seed=0, **SAMPLE)
    server.plan = ["slow"]
    with pytest.raises(
        serving.ServerError,
        match=rf"^judge {server.url}/x: no answer within 0.2 s \(after 1 try\)$",
    ):
        serving.post_json(server.url + "/x", {}, timeout=0.2, retries=0, backoff=0.01, what="judge")


def test_dead_port_is_connection_refused():
    port = free_port()
    client = serving.CompletionClient(f"http://127.0.0.1:{port}", "m", retries=3, backoff=0.01)
    with pytest.raises(serving.ServerError) as e:
        client.complete("p", n=2, seed=0, **SAMPLE)
    assert (
        str(e.value)
        == f"server http://127.0.0.1:{port}/v1/completions: connection refused (after 4 tries)"
    )
    assert (
        client.requests == 4 and client.supports_n is None
    )  # nothing learnt from a server that never answered


def test_map_delivers_every_job_in_the_callers_thread(openai_server):
    # a delay long enough that requests overlap on a loaded machine
    server = openai_server(delay=0.3, fail_marker="fail")
    client = serving.CompletionClient(server.url, "m", concurrency=3, retries=0)
    jobs = [
        {
            "id": i,
            "request": {
                "prompt": "fail" if i % 4 == 1 else f"p{i}",
                "n": 2,
                "seed": 100 * i,
                **SAMPLE,
            },
        }
        for i in range(10)
    ]
    got, threads = {}, set()

    def on_done(job, result):
        threads.add(threading.get_ident())
        got[job["id"]] = result

    client.map(jobs, on_done)
    assert sorted(got) == list(range(10)) and threads == {threading.get_ident()}
    for i, result in got.items():
        if i % 4 == 1:
            assert isinstance(result, serving.ServerError) and "HTTP 404" in str(result)
        else:
            assert [c.text for c in result] == [f"seed={100 * i} i={j} STOP tail" for j in range(2)]
    assert 1 < server.max_in_flight <= 3


def test_map_interrupted_cancels_the_pending_jobs(openai_server):
    server = openai_server(delay=0.1)
    client = serving.CompletionClient(server.url, "m", concurrency=2, retries=0)
    jobs = [{"request": {"prompt": f"p{i}", "n": 1, "seed": i, **SAMPLE}} for i in range(20)]

    def on_done(job, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.map(jobs, on_done)
    time.sleep(0.5)  # the requests in flight when it stopped finish; nothing new starts
    assert len(server.requests) <= 4
    with pytest.raises(TypeError):  # a malformed job is a bug in the caller: raised, not a result
        client.map([{"request": {"prompt": "p", "n": 1}}], lambda job, result: None)


def test_ctrl_c_during_map_exits_at_once(openai_server):
    """Ctrl-C while map() waits: KeyboardInterrupt at once, not after the requests in flight (5 s
    each) end."""
    server = openai_server(delay=5.0)
    code = (
        "import serving\n"
        f"client = serving.CompletionClient({server.url!r}, 'm', concurrency=2, retries=0)\n"
        "jobs = [{'request': {'prompt': 'p', 'n': 1, 'seed': i, 'max_tokens': 8, 'temperature': "
        "1.0,"
        " 'top_p': 1.0}} for i in range(20)]\n"
        "print('ready', flush=True)\n"
        "client.map(jobs, lambda job, result: None)\n"
    )
    # SIGINT restored to its default: a child of a non-interactive shell may inherit it ignored
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=script_env({"OMP_NUM_THREADS": "1"}),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 10
        while len(server.requests) < 2 and time.time() < deadline:
            time.sleep(0.05)
        t = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert (
            time.perf_counter() - t < 3 and proc.returncode != 0 and "KeyboardInterrupt" in err
        ), err[-2000:]
        assert len(server.requests) == 2  # the pending jobs never started
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()


# --------------------------------------------------------------------------------------------------
# A real OpenAI-compatible server: `transformers serve` on the toy base, CPU, 127.0.0.1
# --------------------------------------------------------------------------------------------------


def test_against_transformers_serve():
    """What the client relies on in `transformers serve`: both endpoints answer; it ignores n (so
    the client falls back to seeded requests); it samples only with "generation_config"; temperature
    0 is greedy; seed, stop and max_tokens take effect, a cut by max_tokens is finish_reason
    "length"; a server killed during map() leaves one-line ServerErrors for the jobs left, not a
    hang."""
    port, model_dir = free_port(), str(toy.base_model_dir())
    proc = start_transformers_serve(port, model_dir, env=script_env({"OMP_NUM_THREADS": "1"}))
    try:
        url = f"http://127.0.0.1:{port}"
        client = serving.CompletionClient(
            url, model_dir, concurrency=1, timeout=60, retries=1, backoff=0.1
        )
        prompt = "The"
        sampled = client.complete(prompt, n=4, seed=0, max_tokens=12, temperature=1.0, top_p=1.0)
        assert len(sampled) == 4 and len({c.text for c in sampled}) > 1, sampled
        assert (client.supports_n, client.requests) == (
            False,
            4,
        )  # n ignored: one choice, then 3 seeded requests
        again = client.complete(prompt, n=4, seed=0, max_tokens=12, temperature=1.0, top_p=1.0)
        assert [c.text for c in again] == [c.text for c in sampled]  # seed honoured
        greedy = client.complete(prompt, n=3, seed=None, max_tokens=12, temperature=0.0, top_p=1.0)
        assert len({c.text for c in greedy}) == 1
        (cut,) = client.complete(prompt, n=1, seed=None, max_tokens=3, temperature=0.0, top_p=1.0)
        assert cut.finish_reason == "length" and len(cut.text) <= len(greedy[0].text)
        stop = greedy[0].text[2:4]
        (stopped,) = client.complete(
            prompt, n=1, seed=None, max_tokens=12, temperature=0.0, top_p=1.0, stop=[stop]
        )
        assert (
            stopped.text == greedy[0].text[: greedy[0].text.find(stop)]
            and stopped.finish_reason == "stop"
        )

        chat = serving.CompletionClient(
            url, model_dir, chat=True, timeout=60, retries=1, backoff=0.1
        )
        (reply,) = chat.complete(
            [{"role": "user", "content": "What is 2+3?"}],
            n=1,
            seed=0,
            max_tokens=8,
            temperature=1.0,
            top_p=1.0,
        )
        assert isinstance(reply.text, str) and reply.finish_reason in ("stop", "length")

        jobs = [
            {
                "i": i,
                "request": {
                    "prompt": f"{i}",
                    "n": 1,
                    "seed": i,
                    "max_tokens": 8,
                    "temperature": 1.0,
                    "top_p": 1.0,
                },
            }
            for i in range(6)
        ]
        results = []

        def on_done(job, result):
            results.append(result)
            if len(results) == 1:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

        t = time.perf_counter()
        client.map(jobs, on_done)
        assert time.perf_counter() - t < 30 and len(results) == 6
        assert isinstance(results[0], list)
        errors = [r for r in results[1:] if isinstance(r, serving.ServerError)]
        assert len(errors) >= 4, results  # the one in flight at the kill may have been answered
        assert all(
            str(e).startswith(f"server {url}/v1/completions: ") and "\n" not in str(e)
            for e in errors
        )
    finally:
        stop_server(proc)
