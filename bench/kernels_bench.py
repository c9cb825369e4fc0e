"""Time and peak extra memory of full-vocabulary ops: naive PyTorch vs a TRL-style loop vs this
package.

    # Qwen3's vocab (151,936); about 9 minutes on 2 busy CPU cores
    python bench/kernels_bench.py
    python bench/kernels_bench.py --linear-rows 1024 --out bench_small --only linear_token_logprobs
    # N=16,384, H=2,560 (a GPU run)
    python bench/kernels_bench.py --preset qwen3-4b --out bench_qwen3_4b

Every measurement runs in a fresh subprocess, so one never inherits another's allocations:
- CPU: peak extra memory = RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after the
  inputs are built) minus the RSS before the op; the op runs once, after a small warm-up. On CPU
  this package's numbers are its PyTorch references (vocab_kernels/reference.py), the path CPU
  tensors take.
- CUDA: peak = torch.cuda.max_memory_allocated minus the allocation before the op; time = median of
  --repeat runs after one warm-up, as wall time and as device time between CUDA events; this
  package's numbers are the Triton kernels. Achieved FLOP/s (GEMM-bound ops) or bytes/s
  (logits-bound ops) are compared with the device's peak, looked up by its exact name (PEAKS: the
  vendor's dense bf16 tensor FLOP/s and memory bandwidth; an H100 SXM, PCIe and NVL differ) or given
  with --peak-tflops/--peak-gbs.

Every non-naive side is checked in its own process against the naive result on the same inputs
(outputs and input gradients): the max abs error is a column, and an error above the tolerance
(relative to the largest naive value of that tensor: 1e-3 for fp32, 5e-2 for bf16/fp16) marks the
row WRONG and the run exits with status 1 after writing the tables.

Implementations compared:
- naive: `log_softmax(logits.float()).gather` (+ `-(p * logp).sum` for entropy; TRL's
  generalized_jsd_loss
  formula for GKD), on the whole [N, V];
- trl: the per-row pattern of TRL's `selective_log_softmax` (bf16/fp16: a log_softmax per row; fp32:
  a logsumexp per row) and its row-chunked `entropy_from_logits`; the fused-linear variants first
  build the whole logits with `h @ W.T`, as TRL does (its fwd+bwd for the fused-linear op, autograd
  through one op per row of 4096, takes many minutes on CPU: only with --trl-linear-backward);
- ours: `vocab_kernels.token_logprobs`, `vocab_kernels.linear_token_logprobs`,
  `vocab_kernels.generalized_jsd`, ...

Writes DIR/bench.md and DIR/bench.json (--out, default bench_results/).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_VOCAB = 151_936
# Dense (no sparsity) bf16 tensor-core FLOP/s and memory bytes/s from NVIDIA's datasheets, keyed by
# the exact name torch.cuda.get_device_name reports. Exact names on purpose: a substring match takes
# an H100 PCIe (756 TFLOP/s, 2.0 TB/s) for an SXM (989, 3.35).
PEAKS = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # H100 SXM5
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H200": (989e12, 4.8e12),  # H200 SXM
    "NVIDIA H200 NVL": (835e12, 4.8e12),
    "NVIDIA GH200 480GB": (989e12, 4.0e12),
    "NVIDIA B200": (2250e12, 8.0e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 1.555e12),
    "NVIDIA A100 80GB PCIe": (312e12, 1.935e12),
    "NVIDIA L40S": (362e12, 0.864e12),
    "NVIDIA L40": (181e12, 0.864e12),
    "NVIDIA L4": (121e12, 0.3e12),
    "NVIDIA A10": (125e12, 0.6e12),
}
# Defaults of the size flags; a preset replaces them (explicit flags still win).
PRESETS = {
    "default": dict(logits_rows=1024, linear_rows=4096, jsd_rows=1024, hidden=256),
    # Qwen3-4B (hidden 2,560): 16 rollouts x 1,024 tokens through the LM head; the logits-only ops
    # at 4,096 rows, where naive's fp32 copies of [N, V] still fit next to the inputs on an 80 GB
    # GPU.
    "qwen3-4b": dict(logits_rows=4096, linear_rows=16_384, jsd_rows=4096, hidden=2560),
}
# Tolerance of the check against naive: max |got - naive| <= TOL * max |naive|, per compared tensor.
CHECK_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


# --------------------------------------------------------------------------------------------------
# the implementations (each builds its loss and runs backward when the op is timed with gradients)


def _trl_selective_log_softmax(logits, index):
    """TRL's pattern: fp32 gathers then one logsumexp per row; bf16/fp16 one log_softmax per row."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index[:, None]).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, -1) for row in logits])
    rows = [F.log_softmax(row, -1).gather(-1, i[None]).squeeze(-1) for row, i in zip(logits, index)]
    return torch.stack(rows)


def _trl_entropy(logits, chunk=128):
    """TRL's entropy_from_logits pattern: log_softmax over chunks of 128 rows."""
    out = []
    for c in logits.split(chunk, 0):
        lp = F.log_softmax(c.float(), -1)
        out.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(out)


def _naive_gjsd(zs, zt, beta, temperature):
    """TRL's generalized_jsd_loss formula, full vocabulary, per token."""
    ls = F.log_softmax(zs.float() / temperature, -1)
    lt = F.log_softmax(zt.float() / temperature, -1)
    if beta == 0:
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=ls.dtype)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
    return (
        beta * F.kl_div(lm, lt, reduction="none", log_target=True)
        + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True)
    ).sum(-1)


def _run(spec: dict, x: dict) -> list:
    """One forward (and backward) of `spec` on inputs `x`; returns the outputs."""
    import vocab_kernels

    op, impl, grad = spec["op"], spec["impl"], spec["grad"]
    with torch.set_grad_enabled(grad):
        if op == "token_logprobs":
            z, t = x["logits"], x["targets"]
            if impl == "naive":
                lp = torch.log_softmax(z.float(), -1)
                out = [lp.gather(-1, t[:, None]).squeeze(-1)]
                if spec["entropy"]:
                    out.append(-(lp.exp() * lp).sum(-1))
            elif impl == "trl":
                out = [_trl_selective_log_softmax(z, t)]
                if spec["entropy"]:
                    out.append(_trl_entropy(z))
            else:
                out = vocab_kernels.token_logprobs(z, t, return_entropy=spec["entropy"])
                out = list(out) if spec["entropy"] else [out]
        elif op == "linear_token_logprobs":
            h, w, t = x["hidden"], x["weight"], x["targets"]
            if impl == "naive":
                out = [torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None]).squeeze(-1)]
            elif impl == "trl":
                out = [_trl_selective_log_softmax(h @ w.T, t)]
            else:
                out = [vocab_kernels.linear_token_logprobs(h, w, t)]
        elif op == "generalized_jsd":
            if impl == "naive":
                out = [_naive_gjsd(x["student"], x["teacher"], 0.5, 1.0)]
            else:
                out = [vocab_kernels.generalized_jsd(x["student"], x["teacher"], 0.5, 1.0)]
        elif op == "linear_generalized_jsd":
            hs, ws, ht, wt = x["hs"], x["ws"], x["ht"], x["wt"]
            if impl == "naive":
                with torch.no_grad():
                    zt = ht @ wt.T
                out = [_naive_gjsd(hs @ ws.T, zt, 0.5, 1.0)]
            else:
                out = [vocab_kernels.linear_generalized_jsd(hs, ws, ht, wt, 0.5, 1.0)]
        else:
            raise ValueError(f"kernels_bench: unknown op {op!r}")
        if grad:
            loss = sum((o.float() * x["g"]).sum() for o in out)
            loss.backward()
    return out


def _inputs(spec: dict, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, v = spec["n"], spec["v"]
    dt = getattr(torch, spec["dtype"])
    grad = spec["grad"]

    def randn(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = {"g": torch.randn(n, generator=gen).to(device)}
    if spec["op"] == "token_logprobs":
        x["logits"] = randn(n, v, scale=2.0).requires_grad_(grad)
        x["targets"] = torch.randint(0, v, (n,), generator=gen).to(device)
    elif spec["op"] == "linear_token_logprobs":
        h = spec["h"]
        x["hidden"] = randn(n, h).requires_grad_(grad)
        x["weight"] = randn(v, h, scale=2.0 / math.sqrt(h)).requires_grad_(
            grad and spec.get("wgrad", True)
        )
        x["targets"] = torch.randint(0, v, (n,), generator=gen).to(device)
    elif spec["op"] == "generalized_jsd":
        x["student"] = randn(n, v, scale=2.0).requires_grad_(grad)
        x["teacher"] = randn(n, v, scale=2.0)
    elif spec["op"] == "linear_generalized_jsd":
        h = spec["h"]
        x["hs"], x["ht"] = randn(n, h).requires_grad_(grad), randn(n, h)
        x["ws"] = randn(v, h, scale=2.0 / math.sqrt(h)).requires_grad_(
            grad and spec.get("wgrad", True)
        )
        x["wt"] = randn(v, h, scale=2.0 / math.sqrt(h))
    return x


# --------------------------------------------------------------------------------------------------
# one measurement (in its own process)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _results(spec: dict, x: dict, out: list) -> dict:
    """What a side must get right: its outputs, then the gradients of the inputs that require
    grad."""
    got = {f"out{i}": o.detach() for i, o in enumerate(out)}
    for k, v in x.items():
        if spec["grad"] and v.requires_grad and v.grad is not None:
            got[f"d{k}"] = v.grad.detach()
    return got


def _check_against_naive(spec: dict, x: dict, got: dict) -> dict:
    """Run naive on the same inputs (this process) and compare; errors are max |got - naive| per
    tensor."""
    for v in x.values():
        v.grad = None
    want = _results(spec, x, _run(dict(spec, impl="naive"), x))
    if set(want) != set(got):
        return {"check_error": f"compared tensors differ: {sorted(got)} vs naive's {sorted(want)}"}
    errs, rel = {}, {}
    for k in want:
        diff = (got[k].double() - want[k].double()).abs().max().item()
        errs[k] = diff
        rel[k] = diff / max(want[k].double().abs().max().item(), 1e-30)
    tol = CHECK_TOL.get(spec["dtype"], 5e-2)
    return {
        "max_abs_err": max(errs.values()),
        "abs_err": errs,
        "rel_err": rel,
        "tol": tol,
        "wrong": sorted(k for k, r in rel.items() if not r <= tol),
    }


def measure(spec: dict) -> dict:
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, streams and Triton launches use the current device
    small = dict(spec, n=min(spec["n"], 8), v=min(spec["v"], 4096))
    _run(small, _inputs(small, device))  # warm-up: library init, thread pools, compiled kernels
    x = _inputs(spec, device)
    if device.type == "cuda":
        _run(spec, x)
        for v in x.values():
            v.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        times, dev_times = [], []
        for _ in range(spec["repeat"]):
            for v in x.values():
                v.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            start.record()
            out = _run(spec, x)
            end.record()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            dev_times.append(start.elapsed_time(end) / 1e3)
        r = {
            "time_s": statistics.median(times),
            "device_s": statistics.median(dev_times),
            "peak_extra_bytes": torch.cuda.max_memory_allocated(device) - base,
        }
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        base = _rss_kb("VmRSS")
        times, cpu = [], []
        for _ in range(spec["repeat"]):
            for v in x.values():
                v.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            out = _run(spec, x)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        # process CPU time is reported beside wall time: on a shared machine it is the steadier of
        # the two
        r = {
            "time_s": min(times),
            "cpu_s": min(cpu),
            "peak_extra_bytes": (_rss_kb("VmHWM") - base) * 1024,
        }
    if spec["impl"] != "naive":  # after the timing and the memory high-water mark
        got = _results(spec, x, out)
        del out
        try:
            r.update(_check_against_naive(spec, x, got))
        except torch.OutOfMemoryError:
            r["check_error"] = "not checked: naive ran out of memory"
    return r


def _measure_in_subprocess(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (
            "killed (out of memory?)"
            if proc.returncode < 0
            else proc.stderr.strip().splitlines()[-1:]
        )
        return {"error": f"exit {proc.returncode}: {why}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------
# the table


def _work(spec: dict) -> tuple[str, float]:
    """('flop', useful FLOPs) for GEMM-bound ops, ('bytes', minimal bytes moved) for logits-bound
    ones."""
    n, v = spec["n"], spec["v"]
    esize = torch.finfo(getattr(torch, spec["dtype"])).bits // 8
    gemms_bwd = (2 if spec.get("wgrad", True) else 1) if spec["grad"] else 0  # dh (and dW)
    if spec["op"] == "linear_token_logprobs":
        return "flop", 2.0 * n * spec["h"] * v * (1 + gemms_bwd)  # the naive GEMM count
    if spec["op"] == "linear_generalized_jsd":
        return "flop", 2.0 * n * spec["h"] * v * (2 + gemms_bwd)  # student and teacher logits
    if spec["op"] == "token_logprobs":
        return "bytes", n * v * esize * (3 if spec["grad"] else 1)  # read (+ read, write dlogits)
    if spec["op"] == "generalized_jsd":
        return "bytes", n * v * esize * (5 if spec["grad"] else 2)  # 2 reads (+ 2 reads, 1 write)
    raise ValueError(f"kernels_bench: unknown op {spec['op']!r}")


def peak_for(device_name: str, tflops: float | None = None, gbs: float | None = None) -> tuple:
    """(FLOP/s, bytes/s) peaks of a GPU by its exact name; the flags, when given, win; None where
    unknown."""
    flops, bw = PEAKS.get(device_name.strip(), (None, None))
    return (tflops * 1e12 if tflops else flops, gbs * 1e9 if gbs else bw)


def _specs(args, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    lin_dt = args.linear_dtype or ("bfloat16" if cuda else "float32")
    v = args.vocab
    groups = [
        (
            "token_logprobs",
            dict(n=args.logits_rows, dtype=args.dtype, grad=False, entropy=False),
            ("naive", "trl", "ours"),
        ),
        (
            "token_logprobs",
            dict(n=args.logits_rows, dtype=args.dtype, grad=False, entropy=True),
            ("naive", "trl", "ours"),
        ),
        (
            "token_logprobs",
            dict(n=args.logits_rows, dtype=args.dtype, grad=True, entropy=False),
            ("naive", "trl", "ours"),
        ),
        (
            "linear_token_logprobs",
            dict(n=args.linear_rows, h=args.hidden, dtype=lin_dt, grad=False),
            ("naive", "trl", "ours"),
        ),
        (
            "linear_token_logprobs",
            dict(n=args.linear_rows, h=args.hidden, dtype=lin_dt, grad=True, wgrad=True),
            ("naive", "trl", "ours") if args.trl_linear_backward else ("naive", "ours"),
        ),
        (
            "linear_token_logprobs",
            dict(n=args.linear_rows, h=args.hidden, dtype=lin_dt, grad=True, wgrad=False),
            ("naive", "ours"),
        ),
        ("generalized_jsd", dict(n=args.jsd_rows, dtype=args.dtype, grad=True), ("naive", "ours")),
        (
            "linear_generalized_jsd",
            dict(n=args.jsd_rows, h=args.hidden, dtype=lin_dt, grad=True),
            ("naive", "ours"),
        ),
    ]
    specs = []
    for op, kw, impls in groups:
        if args.only and op not in args.only:
            continue
        for impl in impls:
            spec = dict(
                op=op, impl=impl, v=v, device=str(device), repeat=args.repeat, entropy=False
            )
            spec.update(kw)
            specs.append(spec)
    return specs


def _label(spec: dict) -> str:
    what = {"token_logprobs": "logits [N, V]", "generalized_jsd": "logits [N, V] x2"}.get(
        spec["op"], "hidden [N, H], W [V, H]"
    )
    extra = " + entropy" if spec.get("entropy") else ""
    mode = "fwd+bwd" if spec["grad"] else "fwd"
    if spec["grad"] and "h" in spec:
        mode += ", W trained" if spec.get("wgrad", True) else ", W frozen"
    dims = f"N={spec['n']}" + (f" H={spec['h']}" if "h" in spec else "")
    return f"{spec['op']}{extra} ({mode}; {what}; {dims}; {spec['dtype']})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/kernels_bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="bench_results", help="directory for bench.md and bench.json")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="sizes: default (N=4096, H=256 for the fused-linear ops; 1024 rows of logits) or "
        "qwen3-4b "
        "(N=16,384, H=2,560; 4,096 rows of logits); the size flags below override it",
    )
    p.add_argument(
        "--vocab", type=int, default=QWEN3_VOCAB, help="vocabulary size V (Qwen3: 151,936)"
    )
    p.add_argument(
        "--logits-rows", type=int, default=None, help="rows N for the ops that take logits (preset)"
    )
    p.add_argument(
        "--linear-rows", type=int, default=None, help="rows N for linear_token_logprobs (preset)"
    )
    p.add_argument(
        "--jsd-rows", type=int, default=None, help="rows N for the GKD divergence ops (preset)"
    )
    p.add_argument(
        "--hidden", type=int, default=None, help="hidden size H of the fused-linear ops (preset)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak in TFLOP/s, for a device not in PEAKS (or to override it)",
    )
    p.add_argument(
        "--peak-gbs",
        type=float,
        default=None,
        help="the GPU's memory bandwidth in GB/s, for a device not in PEAKS (or to override it)",
    )
    p.add_argument(
        "--dtype", default="bfloat16", help="dtype of given logits (bfloat16, float16, float32)"
    )
    p.add_argument(
        "--linear-dtype",
        default=None,
        help="dtype of hidden/weight (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed runs per measurement (default: 1 on CPU, 5 on CUDA)",
    )
    p.add_argument("--only", nargs="*", default=None, help="restrict to these op names")
    p.add_argument(
        "--trl-linear-backward",
        action="store_true",
        help="also time the TRL-style row loop for linear_token_logprobs fwd+bwd (minutes on CPU)",
    )
    p.add_argument(
        "--measure", default=None, help=argparse.SUPPRESS
    )  # internal: one measurement, JSON spec
    args = p.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return

    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    args.repeat = args.repeat or (5 if device.type == "cuda" else 1)
    peak_note = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_for(name, args.peak_tflops, args.peak_gbs)
        if None in peak:
            peak_note = (
                f"no peak figures for {name!r} (not in PEAKS): pass --peak-tflops and --peak-gbs "
                "for the "
                "fraction of peak"
            )
            print(f"kernels_bench: {peak_note}", file=sys.stderr)
        backend = f"{name}: Triton kernels (vocab_kernels/triton_kernels.py)"
    else:
        name, peak = "CPU", (None, None)
        backend = (
            f"CPU ({torch.get_num_threads()} threads): PyTorch references "
            "(vocab_kernels/reference.py); "
            "Triton is not timed on CPU"
        )
    rows = []
    naive = {}
    for spec in _specs(args, device):
        print(f"measuring {spec['impl']:5s} {_label(spec)} ...", file=sys.stderr, flush=True)
        r = _measure_in_subprocess(spec)
        key = _label(spec)
        row = dict(spec=spec, label=key, **r)
        if "error" not in r:
            kind, work = _work(spec)
            row["achieved"] = work / r["time_s"]
            row["achieved_unit"] = "FLOP/s" if kind == "flop" else "B/s"
            ref = peak[0] if kind == "flop" else peak[1]
            if ref:
                row["fraction_of_peak"] = row["achieved"] / ref
            if spec["impl"] == "naive":
                naive[key] = r
            if key in naive:
                row["mem_vs_naive"] = r["peak_extra_bytes"] / max(naive[key]["peak_extra_bytes"], 1)
                row["time_vs_naive"] = r["time_s"] / naive[key]["time_s"]
        rows.append(row)
        print(f"  -> {r}", file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=name,
        backend=backend,
        torch=torch.__version__,
        vocab=args.vocab,
        preset=args.preset,
        peak_flops=peak[0],
        peak_bytes_per_s=peak[1],
        peak_note=peak_note,
        command=" ".join(
            ["python bench/kernels_bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    )
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = _markdown(meta, rows)
    (out / "bench.md").write_text(md)
    print(md)
    wrong = []
    for r in rows:
        if r.get("wrong"):
            rel = ", ".join(f"{k} {r['rel_err'][k]:.3g}" for k in r["wrong"])
            wrong.append(
                f"{r['label']} [{r['spec']['impl']}]: off naive beyond {r['tol']:g} of its scale "
                f"({rel})"
            )
    unchecked = [
        f"{r['label']} [{r['spec']['impl']}]: {r['check_error']}"
        for r in rows
        if r.get("check_error")
    ]
    for line in unchecked:
        print(f"kernels_bench: {line}", file=sys.stderr)
    if wrong:
        print("kernels_bench: WRONG RESULTS\n  " + "\n  ".join(wrong), file=sys.stderr)
        sys.exit(1)


def _markdown(meta: dict, rows: list[dict]) -> str:
    cuda = meta["device"] != "CPU"
    peaks = ""
    if cuda and meta.get("peak_flops") and meta.get("peak_bytes_per_s"):
        peaks = (
            f"- peak for the fraction: {meta['peak_flops'] / 1e12:,.0f} TFLOP/s dense bf16, "
            f"{meta['peak_bytes_per_s'] / 1e9:,.0f} GB/s"
        )
    elif cuda:
        peaks = f"- {meta.get('peak_note') or 'no peak figures'}"
    lines = [
        f"# kernels bench: {meta['device']}",
        "",
        f"- backend for `ours`: {meta['backend']}",
        f"- torch {meta['torch']}, V = {meta['vocab']:,}, preset {meta.get('preset', 'default')}",
        f"- command: `{meta['command']}`",
        "- peak extra memory: the op's high-water mark above what the inputs already held",
        "- max abs err: largest |side - naive| over outputs and input gradients, same inputs, same "
        "process",
        *([peaks] if peaks else []),
        "",
        f"| op | impl | time (s) | {'CUDA time' if cuda else 'CPU time'} (s) | peak extra (MB) | "
        "mem / naive "
        "| time / naive | max abs err | achieved |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['spec']['impl']} | {r['error']} | | | | | | |")
            continue
        unit = r["achieved_unit"]
        ach = f"{r['achieved'] / 1e9:.1f} G{unit}"
        if "fraction_of_peak" in r:
            ach += f" ({100 * r['fraction_of_peak']:.0f}% of peak)"
        mem_r = f"{r['mem_vs_naive']:.1%}" if "mem_vs_naive" in r else ""
        time_r = f"{r['time_vs_naive']:.2f}x" if "time_vs_naive" in r else ""
        second = r.get("device_s", r.get("cpu_s"))
        second = f"{second:.3f}" if second is not None else ""
        err = (
            ""
            if r["spec"]["impl"] == "naive"
            else (r.get("check_error") or f"{r['max_abs_err']:.2g}")
        )
        if r.get("wrong"):
            err += " WRONG"
        lines.append(
            f"| {r['label']} | {r['spec']['impl']} | {r['time_s']:.3f} | {second} "
            f"| {r['peak_extra_bytes'] / 2**20:,.0f} | {mem_r} | {time_r} | {err} | {ach} |"
        )
    checks = [
        ("linear_token_logprobs", True, 0.15, 1.2),
        ("generalized_jsd", True, 0.25, None),
        ("linear_generalized_jsd", True, 0.25, None),
    ]
    targets = []
    for op, grad, mem_max, time_max in checks:
        for r in rows:
            s = r["spec"]
            if s["op"] == op and s["grad"] == grad and s["impl"] == "ours" and "mem_vs_naive" in r:
                ok = r["mem_vs_naive"] <= mem_max and (
                    time_max is None or r["time_vs_naive"] <= time_max
                )
                goal = f"memory <= {mem_max:.0%}" + (f", time <= {time_max}x" if time_max else "")
                targets.append(
                    f"- {r['label']}: memory {r['mem_vs_naive']:.1%}, time "
                    f"{r['time_vs_naive']:.2f}x "
                    f"(goal: {goal}): {'PASS' if ok else 'FAIL'}"
                )
    if targets:
        lines += ["", "Targets (ours vs naive):", ""] + targets
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
