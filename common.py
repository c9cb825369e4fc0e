"""What every script needs, written once: loading, JSONL, errors, run setup, logging, checkpoints, torchrun.

Each piece is a plain function or a small class, tested alone in tests/test_common.py and
tests/test_distributed.py. Nothing here knows about a particular algorithm.
"""
from __future__ import annotations

import argparse
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

# ---- Errors a user can fix, and the command line around main() ----------------------------------------------------

TRACEBACK_ENV = "POSTTRAIN_TRACEBACK"  # set to 1 to see the full traceback of a UserError


class UserError(Exception):
    """Input a user can fix (data, a flag, a path, an unreachable server): scripts print one line and exit 2."""


class DataError(UserError, ValueError):
    """Bad input data; the message names file:line and field."""


class ConfigError(UserError, ValueError):
    """A flag value, or a combination of flags, that cannot work; the message names the flag."""


class MissingError(UserError, FileNotFoundError):
    """A model, adapter, checkpoint or data path that is not there; the message names it and how to make it."""


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradient stayed non-finite for several steps in a row; the last checkpoint is intact."""


def run_cli(main, args_cls, argv: list[str] | None = None):
    """`main(parse_args(args_cls))`, where a UserError ends in one line `error: <message>` and exit status 2
    (the traceback only with POSTTRAIN_TRACEBACK=1). Other exceptions are bugs and keep their traceback."""
    args = parse_args(args_cls, argv)
    try:
        return main(args)
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("0", ""):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# ---- Devices, models, tokenizers -----------------------------------------------------------------------------------


def pick_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """"auto"/None: this rank's GPU when CUDA is present (local_rank, default $LOCAL_RANK), else the CPU.

    A CUDA device with an index also becomes the current device: Triton kernels (vocab_kernels/) and any
    allocation without an explicit device go to the current one, so `--device cuda:1` must make it current."""
    if device is None or str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available():
        torch.cuda.set_device(dev)
    return dev


def _resolve_source(name_or_path: str | os.PathLike) -> str:
    """"toy" is the embedded toy base, "smollm2" the offline real model (offline.py); a local directory wins;
    anything else is a hub id (if online)."""
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
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "name" or "org/name"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if looks_local or offline:
        tried = f"local directory {str(path.resolve())!r}: not found"
        hub = "not a hub id (expected 'org/name')" if looks_local else "hub is offline (HF_HUB_OFFLINE=1)"
        raise MissingError(f"cannot load {name!r}: tried {tried}; {hub}. Pass an existing model directory.")
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
        raise MissingError(f"cannot load model {str(name_or_path)!r} (tried {source!r}): {e}") from e
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


# ---- JSONL and atomic files ----------------------------------------------------------------------------------------


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


def train_and_heldout(data: str, eval_data: str, eval_size: int) -> list[tuple[str, list[dict]]]:
    """[(source, training rows), (source, held-out rows)] of a user's dataset, each row with its '_line' (for
    file:line errors): `eval_data` when given (its first `eval_size` rows), else the last tenth of `data` (at most
    `eval_size` rows, at least one)."""
    rows = [{**r, "_line": i + 1} for i, r in enumerate(load_rows(data))]
    if eval_data:
        held = [{**r, "_line": i + 1} for i, r in enumerate(load_rows(eval_data, split="test"))]
        return [(data, rows), (eval_data, held[:eval_size])]
    n_eval = max(1, min(eval_size, len(rows) // 10))
    if len(rows) <= n_eval:
        raise DataError(f"{data}: {len(rows)} rows; need more than {n_eval} to hold some out (or pass --eval-data)")
    return [(data, rows[: len(rows) - n_eval]), (data, rows[len(rows) - n_eval:])]


def _finite(x):
    """`x` with NaN / Infinity floats (in dicts, lists) as None: JSON has none (RFC 8259); strict readers fail."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return [_finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def _json_default(x):
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return _finite(x.tolist())
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return _finite(dataclasses.asdict(x))
    if isinstance(x, torch.dtype):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def _dumps(obj, **kw) -> str:
    """Strict JSON: non-finite floats written as null (see _finite); allow_nan=False guards the rule."""
    return json.dumps(_finite(obj), ensure_ascii=False, default=_json_default, allow_nan=False, **kw)


_UMASK = os.umask(0)
os.umask(_UMASK)


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented strict JSON (tensors, arrays, paths and dataclasses converted; NaN / Infinity as null), atomically."""
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
    """metrics.jsonl rows {"step", name: value} on rank 0, mirrored to wandb / trackio when asked for. The file is
    strict JSON: a NaN or infinite metric is written as null (trackers get the float itself)."""

    def __init__(self, out_dir: str | os.PathLike, report_to: str | list[str] | None = None,
                 project: str = "post-training", run_name: str | None = None, config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = is_main()
        targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
        self.backends = []
        for name in [t for t in targets if t not in ("none", "")] if self.enabled else []:
            if name not in ("wandb", "trackio"):
                raise ConfigError(f"--report-to: unknown tracker {name!r} (choose wandb, trackio or none)")
            try:
                module = __import__(name)
            except ImportError:
                raise ConfigError(f"--report-to {name}: needs the {name} package: pip install {name}") from None
            module.init(project=project, name=run_name, config=config)
            self.backends.append(module)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in metrics.items()}
        append_jsonl(self.path, {"step": step, **row})
        for module in self.backends:
            module.log(row, step=step)

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
        raise ConfigError(f"{ckpt}: checkpoint does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise ConfigError(f"{ckpt}: {name}: shape {tuple(value.shape)} != model {tuple(params[name].shape)}")
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


def max_param_difference_across_ranks(params: Iterable[torch.Tensor]) -> float:
    """max |p - p on rank 0| over the parameters, summed over ranks: 0.0 when every rank holds the same weights."""
    if not _distributed():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    first = flat.clone()
    dist.broadcast(first, src=0)
    return float(all_reduce_sum((flat - first).abs().max().cpu()))


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


# ---- Small script helpers: CLI from a dataclass, run directory, LR schedule, memory --------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows (default: X), except for None: a default that depends on the model is spelled out in the help text."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


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


# ---- One run, from setup to summary: the plumbing every training script shares -------------------------------------


@dataclass
class Run:
    """Where a run is: this process's rank, the world size, its device, the run directory, the start time."""

    rank: int
    world: int
    device: torch.device
    out: Path
    t_start: float


def start_run(out: str | os.PathLike, args: Any, seed: int, device: str = "auto", resume: bool = False) -> Run:
    """Join torchrun's group (if launched by it), seed everything, pick this rank's device, prepare the run
    directory (args.json; a fresh run clears the old logs and checkpoint)."""
    import time

    t_start = time.perf_counter()
    rank, world, local_rank = init_distributed()
    set_seed(seed)
    dev = pick_device(device, local_rank)
    return Run(rank=rank, world=world, device=dev, out=prepare_out_dir(out, args, resume=resume), t_start=t_start)


def require_adapter(path: str | os.PathLike, flag: str = "--init-adapter", hint: str = "") -> str:
    """`path` if it holds a PEFT adapter (adapter_model.safetensors), else a MissingError naming the flag."""
    import lora

    if not (Path(path) / lora.WEIGHTS_NAME).is_file():
        raise MissingError(f"{flag} {path}: no {lora.WEIGHTS_NAME} there. {hint}".strip())
    return str(path)


def load_arm(spec: str, base: str, device=None, load_in_4bit: bool = False, flag: str = "--arms"):
    """A model to evaluate from a spec: '' = `base`; adapter dirs joined by '+' = `base` with each merged in turn,
    each after the adapters it was trained on (lora.lineage: an RL adapter brings its SFT adapter); else a model
    dir or hub id.
    Returns (model, where its tokenizer is)."""
    import lora  # lora is a sibling building block; imported here so common stays importable on its own
    parts = [p for p in spec.split("+") if p]
    if parts and not all((Path(p) / lora.WEIGHTS_NAME).is_file() for p in parts):
        if len(parts) > 1:
            raise MissingError(f"{flag} {spec!r}: joined with '+' but {parts} are not all adapter dirs")
        return load_model(parts[0], device=device, load_in_4bit=load_in_4bit), parts[0]
    model = load_model(base, device=device, load_in_4bit=load_in_4bit)
    lora.merge_adapters(model, spec, flag=flag)  # each adapter after the ones it was trained on (its args.json)
    return model, base


def log_eval(run: Run, logger: "MetricsLogger", step: int, stage: str, metrics: dict) -> dict:
    """Log held-out metrics as eval/<name> at `step`; the `_samples` they carry go to samples.jsonl."""
    samples = metrics.pop("_samples", [])
    if is_main():
        for s in samples:
            append_jsonl(run.out / "samples.jsonl", {"split": "heldout", "stage": stage, "step": step, **s})
        logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})
    return metrics


def resume_or_evaluate(run: Run, resume: bool, model, optimizer, scheduler, evaluate, logger) -> tuple[int, dict]:
    """(first step, data_state). A resumed run continues from its checkpoint, whose data_state keeps the held-out
    metrics measured before training under "before"; a fresh run measures them now (rank 0), at step 0."""
    state = load_checkpoint(run.out, model, optimizer, scheduler) if resume else None
    if state is not None:
        return state["step"], dict(state["data_state"] or {})
    before = log_eval(run, logger, 0, "before", evaluate()) if is_main() else None
    return 0, {"before": before}


def epoch_indices(n: int, per_step: int, step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's share of global batch `step` over n items: one seeded permutation per epoch (so an epoch sees
    every item once and a resumed run draws the same batches), the step's slice of `per_step` items of it, and of
    that every world-th item from `rank`."""
    epoch_len = max(1, n // per_step)
    epoch, pos = divmod(step, epoch_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return order[pos * per_step: (pos + 1) * per_step][rank::world]


class OptimizerStep:
    """The end of every training step: average gradients over ranks, clip, check they are finite, step.

    A non-finite loss or gradient norm skips the update (gradients dropped, optimizer untouched, LR schedule
    advanced so it stays a function of the step) and is counted in `skipped`; `max_bad_steps` of them in a row
    raise NonFiniteError. A caller that checkpoints only after good steps keeps its last good checkpoint."""

    def __init__(self, params, optimizer, scheduler=None, max_grad_norm: float = 1.0, max_bad_steps: int = 3):
        self.params, self.optimizer, self.scheduler = list(params), optimizer, scheduler
        self.max_grad_norm, self.max_bad_steps = max_grad_norm, max_bad_steps
        self.skipped, self.streak = 0, 0

    def __call__(self, loss: float, step: int | None = None) -> dict:
        for p in self.params:  # a parameter no row reached: a zero gradient, so Adam's moments step as they would
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_gradients(self.params)
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        bad = float(not (math.isfinite(loss) and math.isfinite(grad_norm)))
        ok = all_reduce_sum(bad) == 0  # every rank takes the same decision
        if ok:
            self.optimizer.step()
            self.streak = 0
        else:
            self.skipped += 1
            self.streak += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.streak >= self.max_bad_steps:
            where = f" (up to step {step})" if step is not None else ""
            raise NonFiniteError(f"loss or gradient not finite on {self.streak} steps in a row{where}: the run stops; "
                                 f"the last checkpoint is intact. Lower --lr or check the data, then --resume.")
        return {"grad_norm": grad_norm, "skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))


def markdown_table(rows: list[dict]) -> str:
    """Rows of {column: value} as a Markdown table (floats with 4 significant digits)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def finish_run(run: Run, summary: dict, table: dict | None = None) -> dict:
    """Write summary.json atomically (with wall time and peak memory) and print the run's results table."""
    import time

    summary = {**summary, "wall_seconds": time.perf_counter() - run.t_start,
               "peak_memory_mb": peak_memory_mb(run.device), "world_size": run.world}
    atomic_write_json(run.out / "summary.json", summary)
    if table:
        print("\n" + markdown_table([table]), flush=True)
    return summary
