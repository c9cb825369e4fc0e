"""A resumable cache of drawn samples: generations.jsonl, one sample a line, appended and flushed as
it is drawn and read back on a rerun, so a killed evaluation draws only what is missing. Each line
is keyed by a hash of what the sample depends on (model, benchmark, problem, prompt, sampling
parameters, sample index)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def key(*parts) -> str:
    """A stable 32-hex-digit key of JSON-encodable parts (sha256 of their JSON)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def identity(spec: str, base: str) -> str:
    """What the samples come from: the spec, plus the size and head of each adapter's weights (a
    retrained adapter in the same directory is another model)."""
    parts = []
    for p in spec.split("+"):
        weights = Path(p) / "adapter_model.safetensors"
        if p and weights.is_file():
            with open(weights, "rb") as f:
                head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
            parts.append(f"{p}:{weights.stat().st_size}:{head}")
        else:
            parts.append(p)
    return f"{base}|{'+'.join(parts)}"


def sample_row(key: str, bench: str, problem: dict, j: int, text: str, tokens, finish) -> dict:
    """One line of generations.jsonl."""
    row = {"key": key, "benchmark": bench, "problem": problem["id"], "sample": j, "text": text}
    return {**row, "tokens": int(tokens), "finish_reason": finish}


class Cache:
    """generations.jsonl: one sample a line, appended (and flushed) as it is drawn; read back on a
    rerun."""

    def __init__(self, path: Path):
        self.path, self.rows, line = path, {}, "\n"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # the torn last line of a killed run: drawn again
                        continue
                    self.rows[row["key"]] = row
        self.file = open(path, "a", encoding="utf-8")
        if not line.endswith("\n"):  # end the torn line, or the next row would be appended to it
            self.file.write("\n")

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
