"""Karcher merge of LoRA adapters at a real model's shapes: in factor space (karcher_merge.py's
default) against the dense algorithm MergeKit runs on adapters baked into copies of the base. Time
and peak extra memory per side.

The inputs are one transformer layer of Qwen3-4B (hidden 2560, q 4096, k/v 1024, MLP 9728: seven
adapted modules) with a random fp32 base and N random LoRA adapters of rank r (the model card
Lambent/Qwen3-4B-Base-Continued-GRPO-Style-Karcher trained rank 128), each update about 5% of its
base weight's norm. Sides, each in a fresh subprocess (so one never inherits another's allocations):

- factor: the Gram-matrix iteration, then the concatenated adapter (what `--output adapter` writes);
- factor+model: the same, then the dense merged weight c0 W0 + sum c_i B_i A_i (what `--output
  model` writes);
- dense: W0 + B_i A_i built for every adapter, then MergeKit's dense iteration (`--space dense`).

Time: wall seconds for the seven modules (inputs built before the clock starts). Memory: the peak
resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus the resident
set then; on a GPU, CUDA max allocated minus allocated. The dense and factor+model results are
compared (max |difference| / max |W|).

    python bench/karcher_factor_vs_dense.py                  # 3 adapters, rank 128, CPU
    python bench/karcher_factor_vs_dense.py --adapters 8 --rank 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {
    "q_proj": (4096, 2560),
    "k_proj": (1024, 2560),
    "v_proj": (1024, 2560),
    "o_proj": (2560, 4096),
    "gate_proj": (9728, 2560),
    "up_proj": (9728, 2560),
    "down_proj": (2560, 9728),
}  # Qwen3-4B, [out, in]


def inputs(n: int, rank: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in SHAPES.items():
        w0 = torch.randn(o, i, generator=g) * 0.02
        ads = []
        for _ in range(n):
            a = torch.randn(rank, i, generator=g) / i**0.5
            b = torch.randn(o, rank, generator=g)
            b *= 0.05 * float(w0.norm()) / float((b @ a).norm())
            ads.append((a, b))
        out[name] = (w0, ads)
    return out


def side(kind: str, n: int, rank: int, seed: int) -> dict:
    import torch
    from peak_memory import vm

    import karcher_merge as km

    data = inputs(n, rank, seed)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        data = {
            k: (w.cuda(), [(a.cuda(), b.cuda()) for a, b in ads]) for k, (w, ads) in data.items()
        }
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = vm("VmRSS")
    weights = [1.0 / n] * n
    t0 = time.perf_counter()
    result = {}
    for name, (w0, ads) in data.items():
        w0d, deltas = w0.double(), [(a.double(), b.double()) for a, b in ads]
        c0, c, dense, _ = km.merge_module(
            w0d, deltas, weights, "karcher", "dense" if kind == "dense" else "factor", 10, 1e-5
        )
        if kind == "factor":
            parts = [(d[0], ci * d[1]) for ci, d in zip(c.tolist(), deltas)]
            result[name] = (
                torch.cat([p[0] for p in parts]).float(),
                torch.cat([p[1] for p in parts], 1).float(),
            )
        else:
            result[name] = (w0d + km.merged_delta(w0d, deltas, (c0, c, dense))).float()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if on_gpu else vm("VmHWM") - before
    if kind != "factor":
        torch.save({k: v.cpu() for k, v in result.items()}, os.environ["BENCH_RESULT"])
    return {"seconds": seconds, "peak_extra_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench_results"))
    p.add_argument("--side", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(side(a.side, a.adapters, a.rank, a.seed)))
        return
    import tempfile

    import torch

    report = {
        "shapes": SHAPES,
        "adapters": a.adapters,
        "rank": a.rank,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "sides": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("factor", "factor+model", "dense"):
            env = {**os.environ, "BENCH_RESULT": str(Path(tmp) / f"{kind}.pt")}
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    kind,
                    "--adapters",
                    str(a.adapters),
                    "--rank",
                    str(a.rank),
                    "--seed",
                    str(a.seed),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            report["sides"][kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(kind, report["sides"][kind], flush=True)
        f, d = torch.load(Path(tmp) / "factor+model.pt"), torch.load(Path(tmp) / "dense.pt")
        report["max_rel_difference"] = max(
            float((f[k] - d[k]).abs().max() / d[k].abs().max()) for k in d
        )
    s = report["sides"]
    report["ratios"] = {
        f"{k} / dense": {
            "seconds": s[k]["seconds"] / s["dense"]["seconds"],
            "peak_extra_mb": s[k]["peak_extra_mb"] / s["dense"]["peak_extra_mb"],
        }
        for k in ("factor", "factor+model")
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "karcher_factor_vs_dense.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("ratios", "max_rel_difference")}, indent=1))


if __name__ == "__main__":
    main()
