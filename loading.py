"""Devices, tokenizers and models: a hub id, a local directory, 'toy' (the embedded toy base) or
'smollm2' (the offline real model, offline.py); new tokens' embedding rows; a teacher's and a
student's shared tokenizer; a model's safetensors read tensor by tensor and written back as a model
directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

import dataio
from distributed import pick_device
from errors import ConfigError, DataError, MissingError


def _resolve_source(name_or_path: str | os.PathLike) -> str:
    """ "toy" is the embedded toy base, "smollm2" the offline real model (offline.py); a local
    directory wins; anything else is a hub id (if online)."""
    name = str(name_or_path)
    if name == "toy":
        import toy  # lazily: scripts pointed at a real model never pay for the toy world

        return str(toy.base_model_dir())
    if name == "smollm2":
        import offline

        try:
            return str(offline.smollm2_dir())
        except FileNotFoundError as e:
            raise MissingError(f"cannot load 'smollm2': {e}") from e
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = (
        name.startswith((".", "/", "~")) or name.count("/") > 1
    )  # hub ids are "name" or "org/name"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if looks_local or offline:
        tried = f"local directory {str(path.resolve())!r}: not found"
        hub = (
            "not a hub id (expected 'org/name')"
            if looks_local
            else "hub is offline (HF_HUB_OFFLINE=1)"
        )
        raise MissingError(
            f"cannot load {name!r}: tried {tried}; {hub}. Pass an existing model directory."
        )
    return name


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """Tokenizer of a model; "toy" gives the toy char-level tokenizer. Pad falls back to EOS (masks
    never use it)."""
    if str(name_or_path) == "toy":
        import toy

        tok = toy.load_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(
            _resolve_source(name_or_path), trust_remote_code=trust_remote_code
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
):
    """A causal LM on `device` (bf16 on CUDA, fp32 on CPU by default); optional 4-bit NF4 base
    (QLoRA)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        # QLoRA (Dettmers et al. 2023, arXiv 2305.14314): NF4 weights, double-quantised scales, bf16
        # matmuls.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    source = _resolve_source(name_or_path)
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise MissingError(
            f"{name_or_path}: a directory with neither a model (config.json) nor an adapter "
            f"(adapter_model.safetensors)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise MissingError(
            f"cannot load model {str(name_or_path)!r} (tried {source!r}): {e}"
        ) from e
    if not load_in_4bit:
        model.to(device)
    if gradient_checkpointing:
        # use_reentrant=False backpropagates into checkpointed blocks even when their inputs do not
        # require grad; enable_input_require_grads also covers models whose checkpointing ignores
        # the flag. LoRA over a frozen base would otherwise get no gradient.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.enable_input_require_grads()
        model.config.use_cache = False
    return model


def embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding and the LM head, once when the head is tied to the embedding (SmolLM2,
    Qwen3), so a hook or an optimizer state on them is not doubled."""
    heads = (model.get_input_embeddings(), model.get_output_embeddings())
    return list({id(e.weight): e.weight for e in heads}.values())


def grow_embeddings(model, tokenizer, added: dict[str, list[int]]) -> None:
    """Rows for the tokens that chat.add_marker_tokens added to `tokenizer`, each starting at the
    mean of its former pieces."""
    new_ids = [tokenizer.convert_tokens_to_ids(n) for n in added]
    if max(new_ids) >= model.get_input_embeddings().weight.shape[0]:
        # resize keeps a tied head tied (SmolLM2, Qwen3); the new rows are set just below
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
    with torch.no_grad():
        for w in embedding_weights(model):
            for i, old in zip(new_ids, added.values()):
                w[i] = w[old].mean(0)


def load_tokenizers(student: str, teacher: str):
    """The student's tokenizer, and the teacher's when the teacher is another model (else None)."""
    tokenizer = load_tokenizer(student)
    teacher_tokenizer = load_tokenizer(teacher) if teacher != student else None
    return tokenizer, teacher_tokenizer


def shared_vocab(tokenizer, teacher_tokenizer, student, teacher) -> int:
    """How many LM-head rows are tokens: len(tokenizer), after checking that teacher and student
    share it and both heads have that many rows (distillation compares their next-token
    distributions). Rows past it (checkpoint padding) are to be cut from the heads, which is the
    same as giving them a -inf logit."""
    n = len(tokenizer)
    if teacher_tokenizer is not None and len(teacher_tokenizer) != n:
        raise ConfigError(
            f"--teacher: its tokenizer has {len(teacher_tokenizer)} tokens, the student's {n}: "
            f"distillation compares next-token distributions, so both need one tokenizer"
        )
    if teacher_tokenizer is not None:
        mine, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if mine != theirs:
            tok = next(t for t in mine if theirs.get(t) != mine[t])
            raise ConfigError(
                f"--teacher: the tokenizers differ (token {tok!r} is id {mine[tok]} for the "
                f"student, {theirs.get(tok)} for the teacher): distillation needs one tokenizer"
            )
    for name, m in (("--model", student), ("--teacher", teacher)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise ConfigError(f"{name}: its LM head has {rows} rows but the tokenizer {n} tokens")
    return n


# ---- a model's tensors one at a time, and a model directory written from tensors ----------------


def model_dir(name_or_path: str) -> Path:
    """A local directory with the model's safetensors: 'toy', a directory, or a hub id
    (downloaded)."""
    source = _resolve_source(name_or_path)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.model"]
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as e:  # no network, unknown id, gated repo: one line with the cause
        raise MissingError(f"cannot fetch {name_or_path!r} from the hub: {e}") from e


class Weights:
    """The tensors of a model directory (one safetensors file or a sharded index), read one at a
    time; with `updates` ({weight name: [(A, s B)]}, lora.weight_updates of an --init-adapter) each
    weight comes with those low-rank updates (s B A, in order) added as it is read."""

    def __init__(self, name_or_path: str, updates: dict | None = None):
        from safetensors import safe_open

        self.name, self.dir = name_or_path, model_dir(name_or_path)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise MissingError(
                f"{self.dir}: no *.safetensors files (merging reads safetensors only)"
            )
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self.where = {k: f for f, h in self._handles.items() for k in h.keys()}
        # weight -> [(A, s B)], kept factored
        self.init: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = updates or {}

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ConfigError(f"{self.name}: no tensor {key!r}")
        w = self._handles[self.where[key]].get_tensor(key)
        for a, sb in self.init.get(key, []):
            w = (w.double() + sb.double() @ a.double()).to(w.dtype)
        return w


def write_model(src: Weights, tensors: dict[str, torch.Tensor], out: Path) -> Path:
    """A full model directory: the merged tensors (one safetensors file) and the source's config and
    tokenizer files; written beside and renamed into place, so a killed run leaves no half model."""
    from safetensors.torch import save_file

    final, tmp = out / "model", out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.dir.iterdir():
        config_like = f.suffix in (".json", ".txt", ".jinja", ".model")
        if f.is_file() and config_like and not f.name.endswith(".index.json"):
            shutil.copyfile(f, tmp / f.name)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    with dataio.disk_errors(final):
        save_file(contiguous, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    dataio.make_readable(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or foreign file is a DataError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise MissingError(f"{path}: no such file") from None
    except Exception as e:  # safetensors' own error type: a torn or foreign file
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
