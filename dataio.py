"""Data on disk: JSONL rows checked field by field (errors name file:line and field), strict JSON
written atomically, the held-out rule every script shares, and the order in which a run visits its
rows."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from errors import DataError, DiskError


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
            raise DataError(
                f"{where}: field {field!r}: missing (present: {', '.join(row) or 'none'})"
            )
    for field, expected in (types or {}).items():
        if field in row and not _type_ok(row[field], expected):
            names = "|".join(
                t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,))
            )
            raise DataError(
                f"{where}: field {field!r}: expected {names}, got {type(row[field]).__name__}"
            )
    return row


def iter_jsonl(
    path: str | os.PathLike,
    required: Iterable[str] = (),
    types: dict | None = None,
    line_numbers: bool = False,
) -> Iterator[dict]:
    """Yield one dict per non-blank line, validating required fields and their types (field -> type
    or tuple); with `line_numbers`, each with its line in the file as "_line" (blank lines
    counted), for file:line errors later."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                    f"{e.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            row = _check_row(row, f"{path}:{lineno}", required, types)
            yield {**row, "_line": lineno} if line_numbers else row


def read_jsonl(
    path: str | os.PathLike,
    required: Iterable[str] = (),
    types: dict | None = None,
    line_numbers: bool = False,
) -> list[dict]:
    """All rows of a JSONL file (see iter_jsonl); an empty file is an error, not an empty
    dataset."""
    rows = list(iter_jsonl(path, required, types, line_numbers))
    if not rows:
        raise DataError(f"{path}: empty file (no JSON lines)")
    return rows


def load_rows(
    source: str | os.PathLike,
    split: str = "train",
    required: Iterable[str] = (),
    types: dict | None = None,
    line_numbers: bool = False,
) -> list[dict]:
    """Rows of `--data`: a JSONL file, or a Hugging Face dataset id ("org/name") when `datasets` is
    installed; with `line_numbers`, each with "_line" (its line in the file, its index + 1 in a
    dataset)."""
    name = str(source)
    is_hub_id = (
        not Path(name).exists()
        and name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not name.endswith((".jsonl", ".json"))
    )
    if not is_hub_id:
        return read_jsonl(source, required, types, line_numbers)
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"{name}: no such file, and it cannot be loaded as a dataset id: `datasets` is not "
            "installed"
        )
    import datasets

    try:
        rows = [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as e:  # datasets raises many types; say both things that were tried
        raise DataError(f"{name}: no such file, and loading it as a dataset failed: {e}") from e
    rows = [_check_row(r, f"{name}[{split}] row {i}", required, types) for i, r in enumerate(rows)]
    return [{**r, "_line": i + 1} for i, r in enumerate(rows)] if line_numbers else rows


def train_and_heldout(
    data: str, eval_data: str, eval_size: int, required: Iterable[str] = ()
) -> list[tuple[str, list[dict]]]:
    """[(source, training rows), (source, held-out rows)] of a user's dataset, each row with its
    '_line' (for file:line errors): `eval_data` when given (its first `eval_size` rows), else the
    last tenth of `data` (at most `eval_size` rows, at least one). The one held-out rule of every
    script: a lineage (SFT, then GRPO, then an evaluation) on one file never trains on the rows
    another stage held out. `required`: fields every row must have."""
    rows = load_rows(data, required=required, line_numbers=True)
    if eval_data:
        held = load_rows(eval_data, split="test", required=required, line_numbers=True)
        return [(data, rows), (eval_data, held[:eval_size])]
    n_eval = max(1, min(eval_size, len(rows) // 10))
    if len(rows) <= n_eval:
        raise DataError(
            f"{data}: {len(rows)} rows; need more than {n_eval} to hold some out (or pass "
            "--eval-data)"
        )
    return [(data, rows[: len(rows) - n_eval]), (data, rows[len(rows) - n_eval :])]


def _finite(x):
    """`x` with NaN / Infinity floats (in dicts, lists) as None: JSON has none (RFC 8259); strict
    readers fail."""
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
    """Strict JSON: non-finite floats written as null (see _finite); allow_nan=False guards the
    rule."""
    return json.dumps(
        _finite(obj), ensure_ascii=False, default=_json_default, allow_nan=False, **kw
    )


_UMASK = os.umask(0)
os.umask(_UMASK)
# A new file's usual mode: mkstemp and safetensors make 0600 files, which a server running as
# another user cannot read.
FILE_MODE = 0o666 & ~_UMASK


def make_readable(path: str | os.PathLike) -> None:
    """Give the file `path` (or every file in the directory `path`) the usual mode of a new file."""
    path = Path(path)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, FILE_MODE)


# what a user can fix about a write: a full disk or quota, a read-only file system, permissions
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike):
    """Writes inside turn a full disk, a read-only file system or a missing permission into a
    DiskError naming `path` (one line for the user); every writer here writes beside and renames,
    so what `path` held before is intact. safetensors and torch.save report a full disk in their
    own exception types (torch.save without the cause): there the free space decides."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            cause = e.strerror
        elif "No space left on device" in str(e) or _free_bytes(Path(path)) < 1 << 20:
            cause = "no space left on the device"
        else:
            raise
        raise DiskError(f"{path}: cannot write ({cause}); what was there is intact") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a temp file beside `path`, fsync, then os.replace: readers see the old or the new file,
    never half."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write(path: str, write) -> None:
    """write(tmp) (a writer that takes a path: safetensors, torch), then rename over `path` with the
    usual file mode: a killed run never leaves a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with disk_errors(path):
            write(tmp)
            make_readable(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented strict JSON (tensors, arrays, paths and dataclasses converted; NaN / Infinity as
    null), atomically."""
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One JSON object a line, written atomically (the whole file at once)."""
    atomic_write_text(path, "".join(_dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One line per call, flushed, for logs that grow during a run (a kill can at worst tear the
    last line)."""
    with disk_errors(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(_dumps(row) + "\n")
            f.flush()


def epoch_indices(
    n: int, per_step: int, step: int, seed: int, rank: int = 0, world: int = 1
) -> list[int]:
    """This rank's share of global batch `step` over n items: one seeded permutation per epoch (so
    an epoch sees every item once and a resumed run draws the same batches), the step's slice of
    `per_step` items of it, and of that every world-th item from `rank`."""
    epoch_len = max(1, n // per_step)
    epoch, pos = divmod(step, epoch_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return order[pos * per_step : (pos + 1) * per_step][rank::world]


def markdown_table(rows: list[dict]) -> str:
    """Rows of {column: value} as a Markdown table (floats with 4 significant digits)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
