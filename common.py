"""What every script needs, written once: loading, sampling, log-probs, JSONL, logging, checkpoints, torchrun.

Each piece is a plain function or a small class, tested alone in tests/test_common.py and
tests/test_distributed.py. Nothing here knows about a particular algorithm.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

import lora

# ---- Devices, models, tokenizers -----------------------------------------------------------------------------------


def pick_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """"auto"/None: this rank's GPU when CUDA is present (local_rank, default $LOCAL_RANK), else the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", rank)
        return torch.device("cpu")
    return torch.device(device)


def _resolve_source(name_or_path: str | os.PathLike) -> str:
    """"toy" is the embedded toy base; a local directory wins; anything else is a hub id (if online)."""
    name = str(name_or_path)
    if name == "toy":
        import toy  # lazily: scripts pointed at a real model never pay for the toy world

        return str(toy.base_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "name" or "org/name"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if looks_local or offline:
        tried = f"local directory {str(path.resolve())!r}: not found"
        hub = "not a hub id (expected 'org/name')" if looks_local else "hub is offline (HF_HUB_OFFLINE=1)"
        raise FileNotFoundError(f"cannot load {name!r}: tried {tried}; {hub}. Pass an existing model directory.")
    return name


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """Tokenizer of a model; "toy" gives the toy char-level tokenizer. Pad falls back to EOS (masks never use it)."""
    if str(name_or_path) == "toy":
        import toy

        tok = toy.load_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_resolve_source(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None,
               load_in_4bit: bool = False, gradient_checkpointing: bool = False, trust_remote_code: bool = False):
    """A causal LM on `device` (bf16 on CUDA, fp32 on CPU by default); optional 4-bit NF4 base (QLoRA)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        # QLoRA (Dettmers et al. 2023, arXiv 2305.14314): NF4 weights, double-quantised scales, bf16 matmuls.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device}
    source = _resolve_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise OSError(f"cannot load model {str(name_or_path)!r} (tried {source!r}): {e}") from e
    if not load_in_4bit:
        model.to(device)
    if gradient_checkpointing:
        # use_reentrant=False backpropagates into checkpointed blocks even when their inputs do not require grad;
        # enable_input_require_grads also covers models whose checkpointing ignores the flag. LoRA over a frozen
        # base would otherwise get no gradient.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    return model


# ---- Sampling: own KV-cache decoding loop over left-padded prompts -------------------------------------------------


@dataclass
class Rollout:
    """n completions per prompt; row i*n+j is sample j of prompt i (group[row] == i)."""

    prompt_ids: torch.Tensor       # [R, P] left-padded
    prompt_mask: torch.Tensor      # [R, P] 1 on prompt tokens
    completion_ids: torch.Tensor   # [R, C] right-padded
    completion_mask: torch.Tensor  # [R, C] 1 up to and including the first EOS / stop token
    finished: torch.Tensor         # [R] bool: ended by EOS or a stop string (False = cut by max_new_tokens)
    group: torch.Tensor            # [R] long: prompt index

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion side by side, the input of sequence_logprobs(..., logits_to_keep=C)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """prompt_mask and completion_mask side by side (0 on padding and after the end of a completion)."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Decoded completions (masked part only)."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]
        return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def _eos_ids(model, tokenizer, eos_token_ids) -> list[int]:
    if eos_token_ids is not None:
        return [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    ids = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids += [source] if isinstance(source, int) else list(source or [])
    return sorted(set(ids))


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator) -> torch.Tensor:
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest top set whose mass reaches top_p; a token is
        # dropped when the mass strictly before it already exceeds top_p, so the most likely token always stays.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_hits(tokenizer, rows: list[list[int]], stop: list[str]) -> list[bool]:
    """Did the last token of each row complete a stop string? Only text ending in the new characters counts."""
    window = max(len(s.encode("utf-8")) for s in stop) + 2  # a token adds >= 1 byte, so this covers any stop
    longest = max(len(s) for s in stop)
    cur = tokenizer.batch_decode([r[-window:] for r in rows], skip_special_tokens=False)
    prev = tokenizer.batch_decode([r[-window:-1] for r in rows], skip_special_tokens=False)
    hits = []
    for c, p in zip(cur, prev):
        new = len(c) - len(p) if c.startswith(p) else len(c)
        tail = c[max(0, len(c) - new - longest + 1):]
        hits.append(any(s in tail for s in stop))
    return hits


def _sample_rows(model, tokenizer, rows, max_new_tokens, temperature, top_p, stop, eos, greedy, generator,
                 pad_id, device):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long).to(device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).to(device)
    prompt_ids, prompt_mask = ids, mask
    # Left padding shifts real tokens right; positions counted over real tokens keep each row identical to its
    # unpadded run (RoPE is shift-invariant, but absolute-position models and numerics are not).
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    alive = torch.arange(len(rows), device=device)  # rows the model still decodes, in KV-cache order
    tokens, masks, history = [], [], [[] for _ in rows]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, next_pos = out.past_key_values, pos[:, -1:] + 1
    # Finished rows leave the KV cache when it can drop rows (DynamicCache), so the long tail of one slow
    # completion does not pay for the whole batch; otherwise they ride along writing pad tokens.
    compact = hasattr(cache, "batch_select_indices")
    for step in range(max_new_tokens):
        live = ~finished[alive]
        picked = _next_tokens(out.logits[:, -1, :], temperature, top_p, greedy, generator)
        picked = torch.where(live, picked, torch.full_like(picked, pad_id))
        tok = torch.full((len(rows),), pad_id, dtype=torch.long, device=device)
        tok[alive] = picked
        tokens.append(tok)
        masks.append(~finished)  # the EOS / stop token itself stays in the mask
        ended = live & torch.isin(picked, eos_t)
        if stop:
            writing = alive[live].tolist()
            for i, t in zip(writing, tok[writing].tolist()):
                history[i].append(t)
            hits = torch.tensor(_stop_hits(tokenizer, [history[i] for i in writing], stop), device=device)
            ended[live] |= hits
        finished[alive[ended]] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if compact and bool(ended.any()):
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, mask, next_pos, picked = alive[keep], mask[keep], next_pos[keep], picked[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=picked[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        cache, next_pos = out.past_key_values, next_pos + 1
    completion = torch.stack(tokens, 1) if tokens else ids.new_zeros((len(rows), 0))
    comp_mask = torch.stack(masks, 1).long() if masks else ids.new_zeros((len(rows), 0))
    return prompt_ids, prompt_mask, completion, comp_mask, finished


def _pad_to(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([extra, x] if left else [x, extra], dim=1)


def sample(model, tokenizer, prompts: list[str] | list[list[int]], n: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | str | None = None,
           eos_token_ids: int | list[int] | None = None, greedy: bool = False,
           generator: torch.Generator | None = None, batch_size: int | None = None, merge_lora: bool = True) -> Rollout:
    """n completions per prompt with a KV cache (no HF generate), `batch_size` rows at a time; see Rollout.

    merge_lora: sample with each LoRA layer's W + (alpha/r) B A as one weight (lora.merged: ~25% faster on the toy,
    one extra copy of the adapted weights while sampling; 4-bit layers are left as they are)."""
    rows_per_prompt = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
                       else [int(t) for t in p] for p in prompts]
    if not rows_per_prompt:
        raise ValueError("sample() needs at least one prompt")
    for i, r in enumerate(rows_per_prompt):
        if not r:
            raise ValueError(f"prompt {i} is empty: sampling needs at least one prompt token")
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    eos = _eos_ids(model, tokenizer, eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    rows = [r for r in rows_per_prompt for _ in range(n)]
    group = torch.arange(len(prompts), device=device).repeat_interleave(n)
    batch_size = batch_size or len(rows)
    parts = []
    was_training = model.training
    model.eval()  # no dropout while sampling; the caller's mode comes back below
    try:
        with torch.inference_mode(), (lora.merged(model) if merge_lora else contextlib.nullcontext()):
            for start in range(0, len(rows), batch_size):
                parts.append(_sample_rows(model, tokenizer, rows[start:start + batch_size], max_new_tokens,
                                          temperature, top_p, stop, eos, greedy, generator, pad_id, device))
    finally:
        model.train(was_training)
    P = max(p[0].shape[1] for p in parts)
    C = max(p[2].shape[1] for p in parts)
    # clone() outside inference mode: inference tensors cannot be saved for backward (embedding lookups save ids)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(p[0], P, pad_id, left=True) for p in parts]).clone(),
        prompt_mask=torch.cat([_pad_to(p[1], P, 0, left=True) for p in parts]).clone(),
        completion_ids=torch.cat([_pad_to(p[2], C, pad_id, left=False) for p in parts]).clone(),
        completion_mask=torch.cat([_pad_to(p[3], C, 0, left=False) for p in parts]).clone(),
        finished=torch.cat([p[4] for p in parts]).clone(),
        group=group.clone(),
    )


# ---- Log-probs of completions without materialising [B, T, V] logits -----------------------------------------------


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                      temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None):
    """log pi(x_t | x_<t) / T-softmax for the last K tokens: [B, K] fp32 (and the entropy [B, K] if asked).

    The decoder's final hidden states go through the fused LM-head kernel in row chunks, so full-vocabulary logits
    are never held for the whole batch. The hidden state at position t predicts token t+1.
    """
    from kernels import linear_token_logprobs

    K = logits_to_keep
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    if hasattr(head, "lora_A") or getattr(head, "bias", None) is not None:
        raise NotImplementedError("sequence_logprobs needs a plain bias-free LM head (no LoRA on lm_head)")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # same positions as in sample()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    h = hidden[:, -K - 1:-1]
    B, _, H = h.shape
    out = linear_token_logprobs(h.reshape(B * K, H), head.weight, input_ids[:, -K:].reshape(B * K),
                                temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)
    if return_entropy:
        return out[0].view(B, K), out[1].view(B, K)
    return out.view(B, K)


# ---- JSONL and atomic files ----------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad input data; the message names file:line and field."""


def _type_ok(value, expected) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in expected:
        return False  # JSON true is not a number
    if isinstance(value, int) and float in expected:
        return True  # JSON 3 is a valid float
    return isinstance(value, expected)


def _check_row(row, where: str, required: Iterable[str], types: dict | None) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in required:
        if field not in row:
            raise DataError(f"{where}: field {field!r}: missing (present: {', '.join(row) or 'none'})")
    for field, expected in (types or {}).items():
        if field in row and not _type_ok(row[field], expected):
            names = "|".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise DataError(f"{where}: field {field!r}: expected {names}, got {type(row[field]).__name__}")
    return row


def iter_jsonl(path: str | os.PathLike, required: Iterable[str] = (), types: dict | None = None) -> Iterator[dict]:
    """Yield one dict per non-blank line, validating required fields and their types (field -> type or tuple)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield _check_row(row, f"{path}:{lineno}", required, types)


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = (), types: dict | None = None) -> list[dict]:
    """All rows of a JSONL file (see iter_jsonl); an empty file is an error, not an empty dataset."""
    rows = list(iter_jsonl(path, required, types))
    if not rows:
        raise DataError(f"{path}: empty file (no JSON lines)")
    return rows


def load_rows(source: str | os.PathLike, split: str = "train", required: Iterable[str] = (),
              types: dict | None = None) -> list[dict]:
    """Rows of `--data`: a JSONL file, or a Hugging Face dataset id ("org/name") when `datasets` is installed."""
    name = str(source)
    is_hub_id = not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")) \
        and not name.endswith((".jsonl", ".json"))
    if not is_hub_id:
        return read_jsonl(source, required, types)
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{name}: no such file, and it cannot be loaded as a dataset id: `datasets` is not installed")
    import datasets

    try:
        rows = [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as e:  # datasets raises many types; say both things that were tried
        raise DataError(f"{name}: no such file, and loading it as a dataset failed: {e}") from e
    return [_check_row(r, f"{name}[{split}] row {i}", required, types) for i, r in enumerate(rows)]


def _json_default(x):
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, torch.dtype):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def _dumps(obj, **kw) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default, **kw)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a temp file beside `path`, fsync, then os.replace: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON (tensors, arrays, paths and dataclasses converted), written atomically."""
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One JSON object a line, written atomically (the whole file at once)."""
    atomic_write_text(path, "".join(_dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One line per call, flushed, for logs that grow during a run (a kill can at worst tear the last line)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(_dumps(row) + "\n")
        f.flush()


# ---- Metrics -------------------------------------------------------------------------------------------------------


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v.item() if isinstance(v, np.generic) else v


class MetricsLogger:
    """metrics.jsonl rows {"step", name: value} on rank 0, mirrored to wandb / trackio when asked for."""

    def __init__(self, out_dir: str | os.PathLike, report_to: str | list[str] | None = None,
                 project: str = "post-training", run_name: str | None = None, config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = is_main()
        targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
        self.backends = []
        for name in [t for t in targets if t not in ("none", "")] if self.enabled else []:
            if name not in ("wandb", "trackio"):
                raise ValueError(f"report_to: unknown tracker {name!r} (choose wandb, trackio or none)")
            try:
                module = __import__(name)
            except ImportError:
                raise ImportError(f"report_to={name!r} needs the {name} package: pip install {name}") from None
            module.init(project=project, name=run_name, config=config)
            self.backends.append(module)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in metrics.items()}
        append_jsonl(self.path, {"step": step, **row})
        for module in self.backends:
            module.log(row, step=step)

    @staticmethod
    def postfix(metrics: dict, keys: Iterable[str] | None = None) -> dict[str, str]:
        """Short strings for tqdm's set_postfix: 4 significant digits, chosen keys only."""
        keys = list(metrics) if keys is None else [k for k in keys if k in metrics]
        values = {k: _plain(metrics[k]) for k in keys}
        return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}

    def close(self) -> None:
        for module in self.backends:
            module.finish()


# ---- Seeds and atomic checkpoints ----------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's key array as a tensor, so the file loads with torch.load(weights_only=True)
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | os.PathLike, step: int, model, optimizer, scheduler=None,
                    data_state: Any = None) -> Path:
    """Save trainable weights, optimiser, scheduler, RNG and position to out_dir/checkpoint; call on every rank.

    Crash safety: everything goes to checkpoint.tmp; then checkpoint -> checkpoint.old, tmp -> checkpoint, and
    .old is deleted. At every instant either checkpoint or checkpoint.old is complete (load_checkpoint tries both).
    """
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    rank = dist.get_rank() if _distributed() else 0
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")  # each rank has its own sampling / dropout streams
    if is_main():
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    if is_main():
        # state.json last: its presence marks a complete checkpoint
        atomic_write_json(tmp / "state.json", {"step": step, "data_state": data_state,
                                               "world_size": dist.get_world_size() if _distributed() else 1})
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    # Fault injection for the resume tests: die like a SIGKILLed process right after this step's checkpoint
    # (no cleanup, no final outputs), so "killed then resumed == uninterrupted" is tested deterministically.
    if os.environ.get("KILL_AFTER_CHECKPOINT") == str(step):
        os._exit(137)
    return final


def load_checkpoint(out_dir: str | os.PathLike, model, optimizer=None, scheduler=None) -> dict | None:
    """Restore what save_checkpoint wrote; returns {"step", "data_state"} or None when there is none.

    Also trims out_dir/metrics.jsonl and samples.jsonl to rows with "step" up to the restored step, so a resumed
    run logs each step once.
    """
    out_dir = Path(out_dir)
    ckpt = next((d for d in (out_dir / "checkpoint", out_dir / "checkpoint.old") if (d / "state.json").is_file()),
                None)
    if ckpt is None:
        return None
    state = json.loads((ckpt / "state.json").read_text())
    saved = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise ValueError(f"{ckpt}: checkpoint does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{ckpt}: {name}: shape {tuple(value.shape)} != model {tuple(params[name].shape)}")
            params[name].copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None and (ckpt / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    for log in (out_dir / "metrics.jsonl", out_dir / "samples.jsonl"):
        if is_main() and log.is_file():
            # rows logged after this checkpoint will be logged again; a torn last line (killed mid-write) goes too
            rows = []
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            write_jsonl(log, [r for r in rows if not isinstance(r, dict) or not isinstance(r.get("step"), int)
                              or r["step"] <= state["step"]])
    rank = dist.get_rank() if _distributed() else 0
    rng_file = ckpt / f"rng_rank{rank}.pt"
    _set_rng_state(torch.load(rng_file if rng_file.is_file() else ckpt / "rng_rank0.pt", weights_only=True))
    return {"step": state["step"], "data_state": state["data_state"]}


# ---- torchrun: data parallel by hand (all-reduce of trainable gradients; no DDP wrapper around the model) ----------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the torchrun group (nccl on CUDA, gloo on CPU) when launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not _distributed():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_main() -> bool:
    """True on rank 0, and in a single process: the rank that writes files and prints."""
    return not _distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _distributed():
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group at the end of a torchrun script."""
    if _distributed():
        dist.destroy_process_group()


def rank0_print(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (torchrun interleaves the ranks' output)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average .grad of trainable params over ranks: g <- (1/W) sum_r g_r, as DDP does.

    The gradients are flattened into one buffer per dtype (one collective instead of one per tensor). A missing
    grad counts as zero, so every rank issues the same collectives.
    """
    if not _distributed():
        return
    world = dist.get_world_size()
    groups: dict[tuple, list] = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


def broadcast_parameters(params: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank src's values into every rank (start from identical weights, e.g. freshly initialised LoRA)."""
    if not _distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x):
    """Sum of a number or tensor over ranks (e.g. token counts for a global normaliser); identity alone."""
    if not _distributed():
        return x
    t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    device = t.device
    t = t.to(_comm_device())  # nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if isinstance(x, torch.Tensor):
        return t.to(device)
    return int(t.item()) if isinstance(x, int) else t.item()


def all_reduce_mean(x):
    """Mean over ranks of a number or tensor (a metric every rank computed on its own shard)."""
    world = dist.get_world_size() if _distributed() else 1
    total = all_reduce_sum(x)
    return total / world if world > 1 else x


# ---- Small script helpers: CLI from a dataclass, run directory, LR schedule, memory --------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _flag_kwargs(tp) -> dict:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_kwargs(inner[0]) if len(inner) == 1 else {"type": str}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if origin in (list, tuple):
        return {"type": (typing.get_args(tp) or (str,))[0], "nargs": "+"}
    return {"type": tp}


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """An instance of dataclass `cls` from the command line: field foo_bar -> --foo-bar, help from metadata."""
    hints = typing.get_type_hints(cls)
    doc = description if description is not None else sys.modules[cls.__module__].__doc__
    parser = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        kwargs = _flag_kwargs(hints[f.name])
        if kwargs.get("action") is argparse.BooleanOptionalAction and f.name.startswith("no_"):
            # argparse reads any flag spelled --no-... as False: a field named no_x is a plain switch
            kwargs = {"action": "store_true"}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        help_text = f.metadata.get("help", " ").replace("%", "%%")  # argparse %-formats help strings
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs)
    return cls(**vars(parser.parse_args(argv)))


def prepare_out_dir(out: str | os.PathLike, args: Any = None, resume: bool = False) -> Path:
    """Create the run directory and record the arguments in args.json (rank 0).

    A fresh run (resume=False) removes the logs and checkpoint an earlier run left there, so metrics.jsonl and
    samples.jsonl never mix two runs; with resume=True they stay for load_checkpoint and the appends.
    """
    out = Path(out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            (out / "samples.jsonl").unlink(missing_ok=True)
            for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
                shutil.rmtree(out / name, ignore_errors=True)
        if args is not None:
            atomic_write_json(out / "args.json", dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args)
    barrier()
    return out


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warmup to the peak LR, then cosine decay to min_ratio * peak at total_steps (Loshchilov & Hutter)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_mb(device: str | torch.device | None = None) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU device, else the peak resident set size."""
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available() and torch.cuda.is_initialized()
    if on_cuda:
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
