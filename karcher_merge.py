"""Karcher-mean merging of models or LoRA adapters: dense, as MergeKit does it, or exactly in factor
space.

The model card Lambent/Qwen3-4B-Base-Continued-GRPO-Style-Karcher trained one adapter per domain
(code, arXiv papers, Wikipedia, news, fiction) and merged them with MergeKit's `karcher` method. The
Karcher (Frechet) mean averages points on a curved space by walking along it (Karcher 1977; on the
sphere, Buss & Fillmore 2001). MergeKit applies it to every weight tensor, flattened: a direction on
the unit sphere and a norm, averaged apart. With weights a_i that sum to 1 (MergeKit: all equal,
1/N):

    n_i = ||W_i||,  u_i = W_i / n_i                  (an input with n_i <= tol is left out)
    m   = normalize(sum_i a_i u_i)                   (the linear mean's direction)
    repeat at most --max-iter times:
        c_i = clamp(<m, u_i>, -1, 1),  theta_i = arccos(c_i)
        T   = sum_i a_i (theta_i / sin theta_i) (u_i - c_i m)
              (the mean of the log maps; an input with theta_i < tol is skipped)
        stop if ||T|| < tol
        m   = cos(||T||) m + sin(||T||) T / ||T||, renormalised      (the exp map)
    W   = (sum_i a_i n_i) m                          (the weighted mean norm restored)

`--method linear` is W = sum_i a_i W_i, for comparison: on base + small-update weights the two are
close.

Adapters. MergeKit merges adapters only after baking each into a dense copy of the base (W_i = W0 +
D_i, D_i = s_i B_i A_i with the adapter's scale s_i) and cannot give an adapter back. Here every
Karcher iterate is a combination of the u_i, so the whole iteration runs on N coefficients and the N
x N Gram matrix G_ij = <u_i, u_j> (`--space factor`, the default), from inner products that never
build a dense D_i:

    <W_i, W_j> = ||W0||^2 + <W0, D_i> + <W0, D_j> + <D_i, D_j>,
    <W0, B A>  = sum((W0 A^T) * B),    <B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T)).

The result is c0 W0 + sum_i c_i D_i. The concatenated adapter [c_1 s_1 B_1 | ... | c_N s_N B_N]
[A_1; ...; A_N] (rank sum r_i, alpha = rank) carries sum_i c_i D_i exactly; (c0 - 1) W0 is the part
no adapter can carry. It is reported per module (`unrepresented`, relative to the merged update) and
kept when the output is a full model (`--output model`). `--rank r` truncates the merged update to
rank r by SVD (of the factors' QR cores: exact and small) with B = U_r sqrt(S_r), A = sqrt(S_r)
V_r^T, and reports the relative error per module. `--space dense` runs MergeKit's dense algorithm on
W0 + D_i instead; the two agree (tests/test_karcher_merge.py; against MergeKit itself:
bench/karcher_vs_mergekit.py).

Every module's log (merge_log.jsonl): iterations, the first tangent norm ||T||, the angles theta_i
to the mean, the widest angle between two inputs, the distance from the linear mean (relative to the
linear merge's update; with --models, to the weight); summary.json sums them up. The toy run then
scores base, specialists and merges: held-out NLL and perplexity per domain, distinct-1 and pairwise
embedding diversity of sampled continuations.

Run:
    python karcher_merge.py            # the toy story, news and code adapters onto the toy base
    python karcher_merge.py --base Qwen/Qwen3-4B-Base --adapters runs/code runs/arxiv runs/news \\
        --eval-data heldout_docs.jsonl --out runs/karcher    # an adapter out, exact; GPU or CPU
    python karcher_merge.py --base Qwen/Qwen3-4B-Base --adapters runs/code runs/arxiv runs/news \\
        --output model                                       # a full model, (c0 - 1) W0 kept
    python karcher_merge.py --models org/model-a org/model-b org/model-c \\
        --out runs/karcher_models                            # full models, as MergeKit
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

import cli
import dataio
import errors
import lifecycle
import likelihood
import loading
import lora
import stats
import toy

# the per-module log columns that summary.json sums up (mean and worst case)
LOG_COLUMNS = ("iterations", "tangent0", "spread", "theta_max", "dist_linear", "c0")
LOG_COLUMNS += ("unrepresented", "svd_error")


# ---- the Karcher mean, dense (MergeKit's algorithm) and on the Gram matrix ----------------------


def no_steps(theta: list[float], **extra) -> dict:
    """The log entry of a mean that needed no iteration (one input, all inputs ~0, or linear)."""
    return {"iterations": 0, "tangent0": 0.0, "theta": theta, **extra}


def angle(x: torch.Tensor, y: torch.Tensor) -> float:
    """arccos <x, y> of two unit vectors."""
    return float(torch.arccos(torch.clamp(x @ y, -1.0, 1.0)))


def karcher_dense(
    tensors: list[torch.Tensor], weights: list[float], max_iter: int = 10, tol: float = 1e-5
):
    """The weighted Karcher mean of `tensors` (flattened) in float64, step for step as MergeKit's
    `karcher`: (mean, logged): logged = what merge_log.jsonl records. `weights` sum to 1."""
    if len(tensors) == 1:
        return tensors[0].double(), no_steps([0.0], spread=0.0)
    flat = [t.double().flatten() for t in tensors]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    keep = [i for i, n in enumerate(norms) if n > tol]
    if not keep:
        return torch.zeros_like(tensors[0], dtype=torch.float64), no_steps([], spread=0.0)
    a = [weights[i] / sum(weights[i] for i in keep) for i in keep]
    units = [flat[i] / norms[i] for i in keep]
    m = sum(ai * u for ai, u in zip(a, units))
    if float(torch.linalg.vector_norm(m)) < tol:
        m = units[0].clone()
    else:
        m = m / torch.linalg.vector_norm(m)
    it, tangent0 = 0, None
    for it in range(1, max_iter + 1):
        tangent = torch.zeros_like(m)
        for ai, u in zip(a, units):
            c = torch.clamp(m @ u, -1.0, 1.0)
            theta = torch.arccos(c)
            if theta < tol:
                continue
            # the log map of u_i at m, weighted
            tangent += ai * (theta / torch.sin(theta)) * (u - c * m)
        tn = torch.linalg.vector_norm(tangent)
        tangent0 = float(tn) if tangent0 is None else tangent0
        if tn < tol:
            break
        # the exp map: walk ||T|| along the sphere
        m = torch.cos(tn) * m + torch.sin(tn) * (tangent / tn)
        if torch.linalg.vector_norm(m) > tol:
            m = m / torch.linalg.vector_norm(m)
    theta = [angle(m, u) for u in units]
    spread = max((angle(u, v) for i, u in enumerate(units) for v in units[:i]), default=0.0)
    # MergeKit: every input's norm, the dropped ones are ~0
    scale = sum(w * n for w, n in zip(weights, norms))
    logged = {"iterations": it, "tangent0": tangent0 or 0.0, "theta": theta, "spread": spread}
    return (scale * m).view_as(tensors[0]), logged


def gram_norm(v: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """||sum_i v_i u_i|| = sqrt(v^T G v)."""
    return (v @ G @ v).clamp_min(0).sqrt()


def karcher_gram(inner: torch.Tensor, weights: list[float], max_iter: int = 10, tol: float = 1e-5):
    """The same iteration on coefficients: with K_ij = <W_i, W_j> (float64), every iterate is m =
    sum_i x_i u_i, so <m, u_i> = (G x)_i and ||v||^2 = v^T G v with G_ij = K_ij / (n_i n_j). Returns
    (w, logged): the mean is sum_i w_i W_i."""
    n = len(weights)
    norms = inner.diagonal().clamp_min(0).sqrt()
    keep = [i for i in range(n) if norms[i] > tol]
    w = torch.zeros(n, dtype=torch.float64)
    if not keep:
        return w, no_steps([])
    idx = torch.tensor(keep)
    G = inner[idx][:, idx] / (norms[idx][:, None] * norms[idx][None, :])
    a = torch.tensor([weights[i] for i in keep], dtype=torch.float64)
    a = a / a.sum()
    eye = torch.eye(len(keep), dtype=torch.float64)  # the u_i themselves
    x = a / gram_norm(a, G) if gram_norm(a, G) >= tol else eye[0].clone()
    it, tangent0 = 0, None
    for it in range(1, max_iter + 1):
        c = (G @ x).clamp(-1.0, 1.0)  # <m, u_i>
        theta = torch.arccos(c)
        tangent = torch.zeros_like(x)
        for i in range(len(keep)):
            if theta[i] < tol:
                continue
            tangent += a[i] * (theta[i] / torch.sin(theta[i])) * (eye[i] - c[i] * x)
        tn = gram_norm(tangent, G)
        tangent0 = float(tn) if tangent0 is None else tangent0
        if tn < tol:
            break
        x = torch.cos(tn) * x + torch.sin(tn) * (tangent / tn)
        if gram_norm(x, G) > tol:
            x = x / gram_norm(x, G)
    theta = torch.arccos((G @ x).clamp(-1.0, 1.0)).tolist()
    scale = sum(weights[i] * float(norms[i]) for i in range(n))
    w[idx] = scale * x / norms[idx]  # m = sum x_i u_i = sum (x_i / n_i) W_i
    return w, {"iterations": it, "tangent0": tangent0 or 0.0, "theta": theta}


def widest_angle(inner: torch.Tensor) -> float:
    """The largest angle between two inputs' directions (0 for one input)."""
    norms = inner.diagonal().clamp_min(1e-300).sqrt()
    cos = (inner / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)
    return float(torch.arccos(cos).max())


# ---- one adapted module, all modules, and the adapter that carries the result -------------------


def module_inner(w0: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor] | None]):
    """K_ij = <W0 + D_i, W0 + D_j> and Q_ij = <D_i, D_j> from the factors (D_i = B A; None = no
    update)."""
    n = len(deltas)
    p = torch.zeros(n, dtype=torch.float64)
    Q = torch.zeros(n, n, dtype=torch.float64)
    for i, d in enumerate(deltas):
        if d is None:
            continue
        a, b = d
        p[i] = ((w0 @ a.T) * b).sum()  # <W0, B A>
        for j in range(i + 1):
            if deltas[j] is not None:
                aj, bj = deltas[j]
                Q[i, j] = Q[j, i] = ((b.T @ bj) * (a @ aj.T)).sum()  # <B_i A_i, B_j A_j>
    # ||W0||^2 as a dot product: no temporary copy of W0
    return w0.flatten() @ w0.flatten() + p[:, None] + p[None, :] + Q, Q


def merge_module(w0, deltas, weights, method, space, max_iter, tol):
    """Merge one adapted module. Returns (c0, c, delta, logged): the mean is c0 W0 + sum c_i D_i
    (factor space; delta is None) or W0 + delta (dense space; delta in fp32, so a merge of a large
    model keeps one update per module)."""
    K, Q = module_inner(w0, deltas)
    a = torch.tensor(weights, dtype=torch.float64)
    logged = {"spread": widest_angle(K)}
    # ||sum a_i D_i||: the size of the linear merge's update
    lin_norm = float((a @ Q @ a).clamp_min(0).sqrt())
    if space == "dense":
        full = [w0 + (d[1] @ d[0] if d is not None else 0) for d in deltas]
        if method == "linear":
            dense, it = sum(wi * f for wi, f in zip(weights, full)), no_steps([])
        else:
            dense, it = karcher_dense(full, weights, max_iter, tol)
        lin = sum(wi * f for wi, f in zip(weights, full))
        dist = float(torch.linalg.vector_norm(dense - lin)) / max(lin_norm, 1e-30)
        logged.update(it, dist_linear=dist)
        return None, None, (dense - w0).float(), logged
    if method == "linear":
        w, it = a.clone(), no_steps([])
    else:
        w, it = karcher_gram(K, weights, max_iter, tol)
    diff = w - a  # the mean minus the linear mean, as a combination of the W_i
    logged.update(
        it, dist_linear=float((diff @ K @ diff).clamp_min(0).sqrt()) / max(lin_norm, 1e-30)
    )
    c = w.clone()
    for i, d in enumerate(deltas):
        if d is None:
            c[i] = 0.0  # this input is W0 alone here: its coefficient lives in c0 only
    return float(w.sum()), c, None, logged


def merge_adapters(
    base: loading.Weights, adapters, weights, method, space, max_iter, tol, desc="merge"
):
    """Every adapted module merged: {module: (c0, c, dense)} and the per-module log rows."""
    modules = sorted({m for ad in adapters for m in ad})
    results, log = {}, []
    for name in tqdm(modules, desc=desc):
        t0 = time.perf_counter()
        w0 = base.get(name + ".weight").double()
        deltas = [ad.get(name) for ad in adapters]
        c0, c, dense, logged = merge_module(w0, deltas, weights, method, space, max_iter, tol)
        results[name] = (c0, c, dense)
        th = logged.pop("theta")
        row = {"module": name, **logged, "theta_mean": sum(th) / len(th) if th else 0.0}
        row["theta_max"] = max(th, default=0.0)
        if c0 is not None:
            row["c0"] = c0
        row["seconds"] = time.perf_counter() - t0
        log.append(row)
    return results, log


def merged_delta(w0, deltas, result) -> torch.Tensor:
    """The merged weight minus W0, dense (for evaluation and full-model output)."""
    c0, c, delta = result
    if delta is not None:
        return delta.double()
    out = (c0 - 1.0) * w0
    for ci, d in zip(c.tolist(), deltas):
        if d is not None:
            out = out + ci * (d[1] @ d[0])
    return out


def weights_of(base: loading.Weights, adapters, results):
    """weight_of(key): a tensor of the merged model, built when asked for (in the base's dtype)."""

    def weight_of(key: str) -> torch.Tensor:
        name, w0 = key.removesuffix(".weight"), base.get(key)
        if name not in results:
            return w0
        delta = merged_delta(w0.double(), [ad.get(name) for ad in adapters], results[name])
        return (w0.double() + delta).to(w0.dtype)

    return weight_of


def as_is(adapter) -> dict:
    """Merge results that give one adapter back unchanged (W0 + D): to score an input or the written
    adapter."""
    return {m: (1.0, torch.ones(1, dtype=torch.float64), None) for m in adapter}


def adapter_factors(base: loading.Weights, adapters, results, log, rank: int):
    """The output adapter {module: (A, B)} (scale 1), padded to one rank; fills the log's error
    columns."""
    factors = {}
    for row in log:
        name = row["module"]
        w0 = base.get(name + ".weight").double()
        deltas = [ad.get(name) for ad in adapters]
        c0, c, delta = results[name]
        if delta is not None:
            # dense space: the update is full rank in principle; SVD at --rank or the summed rank
            r = rank or sum(d[0].shape[0] for d in deltas if d is not None)
            a, b, err = lora.svd_factors(delta.double(), r)
            row["svd_error"] = err
        else:
            parts = [(d[0], ci * d[1]) for ci, d in zip(c.tolist(), deltas) if d is not None]
            a, b = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1)
            carried = float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())
            w0_norm = float(torch.linalg.vector_norm(w0))
            row["unrepresented"] = abs(c0 - 1.0) * w0_norm / max(carried, 1e-30)
            if rank:
                a, b, row["svd_error"] = lora.low_rank(a, b, min(rank, a.shape[0]))
        factors[name] = (a, b)
    width = max(a.shape[0] for a, _ in factors.values())
    return {k: lora.pad_rank(a, b, width) for k, (a, b) in factors.items()}


def merge_models(models: list[loading.Weights], weights, method, max_iter, tol):
    """Full models, tensor by tensor (dense): ({name: merged tensor in the input dtype}, log
    rows)."""
    keys = models[0].keys()
    for m in models[1:]:
        if set(m.keys()) != set(keys):
            raise errors.ConfigError(
                f"--models: {m.name} has other tensors than {models[0].name} "
                f"({sorted(set(m.keys()) ^ set(keys))[:3]} ...)"
            )
    merged, log = {}, []
    for key in tqdm(keys, desc="merge"):
        t0 = time.perf_counter()
        ts = [m.get(key) for m in models]
        if any(t.shape != ts[0].shape for t in ts):
            shapes = [tuple(t.shape) for t in ts]
            raise errors.ConfigError(f"--models: tensor {key!r} has shapes {shapes}")
        if not ts[0].is_floating_point():
            merged[key] = ts[0]
            continue
        lin = sum(w * t.double() for w, t in zip(weights, ts))
        # its angles go to the log, whichever the method
        out, it = karcher_dense(ts, weights, max_iter, tol)
        if method == "linear":
            out, it["iterations"] = lin, 0
        th = it.pop("theta")
        # relative to the weight
        dist = torch.linalg.vector_norm(out - lin) / torch.linalg.vector_norm(lin).clamp_min(1e-30)
        row = {"module": key, **it, "theta_mean": sum(th) / max(len(th), 1)}
        row.update(theta_max=max(th, default=0.0), dist_linear=float(dist))
        row["seconds"] = time.perf_counter() - t0
        log.append(row)
        merged[key] = out.to(ts[0].dtype)
    return merged, log


@dataclass
class Args:
    base: str = "toy"
    """hub id or local dir of the model the --adapters were trained on; 'toy' = the toy base"""
    adapters: list[str] = field(default_factory=list)
    """PEFT LoRA adapter dirs (this repo's or PEFT's) to merge onto --base (default with the toy
    base: toy/story toy/news toy/code)"""
    init_adapter: str = ""
    """PEFT adapter dir(s), joined by '+', merged into --base first: the model the --adapters were
    trained on"""
    models: list[str] = field(default_factory=list)
    """full models (hub ids or dirs, same architecture) to merge instead of adapters; output: a full
    model"""
    weights: list[float] = field(default_factory=list)
    """one weight per input, normalised to sum to 1 (default: equal, as MergeKit)"""
    method: Literal["karcher", "linear"] = "karcher"
    """what is written to --out"""
    space: Literal["factor", "dense"] = "factor"
    """adapters: factor = the Gram-matrix iteration, exact, no dense update built; dense =
    MergeKit's algorithm on W0 + B A"""
    output: Literal["auto", "adapter", "model"] = "auto"
    """adapter (PEFT format) or model (safetensors, loads with from_pretrained); auto = adapter for
    --adapters, model for --models"""
    rank: int = 0
    """adapter output: 0 = exact concatenated adapter (dense space: SVD at the summed rank); r > 0 =
    truncated SVD to rank r"""
    max_iter: int = 10
    """Karcher iterations at most (MergeKit's default)"""
    tol: float = 1e-5
    """stop when the tangent norm is below it (MergeKit's default)"""
    out: str = "runs/karcher_merge"
    """run directory"""
    no_eval: bool = False
    """merge only: no NLL or diversity table"""
    eval_data: str = ""
    """held-out JSONL {'text', 'domain'?} for NLL per domain (default with the toy base: toy
    documents)"""
    eval_size: int = 100
    """held-out documents per domain (toy)"""
    prompts: int = 16
    """prompts per domain for the diversity samples (0 = none)"""
    samples: int = 4
    """samples per prompt (k) for distinct-1 and pairwise diversity"""
    max_new_tokens: int = 128
    """length of the diversity samples"""
    temperature: float = 1.0
    """sampling temperature of the diversity samples"""
    seed: int = 0
    """random seed (samples)"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""


def main(args: Args):
    adapter_paths = checked_inputs(args)
    run = lifecycle.start_run(args)
    names = args.models or adapter_paths
    weights = normalised(args.weights, len(names))
    other = "linear" if args.method == "karcher" else "karcher"
    iterate = (args.max_iter, args.tol)
    t0 = time.perf_counter()
    arms = {}
    if args.models:
        models = [loading.Weights(m) for m in args.models]
        tensors, log = merge_models(models, weights, args.method, *iterate)
        merge_seconds = time.perf_counter() - t0
        loading.write_model(models[0], tensors, run.out)
        base_name, keys = args.models[0], models[0].keys()
        if not args.no_eval and args.eval_data:
            arms = {Path(m).name or m: w.get for m, w in zip(args.models, models)}
            arms[args.method] = tensors.__getitem__
            arms[other] = merge_models(models, weights, other, *iterate)[0].__getitem__
    else:
        base = loading.Weights(args.base, lora.weight_updates(args.init_adapter))
        adapters = lora.read_adapters(adapter_paths, base)
        merge = (base, adapters, weights)
        results, log = merge_adapters(*merge, args.method, args.space, *iterate)
        merge_seconds = time.perf_counter() - t0
        if args.output == "adapter":
            factors = adapter_factors(base, adapters, results, log, args.rank)
            lora.write_adapter(str(run.out), factors, base_model_name_or_path=args.base)
        merged = weights_of(base, adapters, results)
        if args.output == "model":
            loading.write_model(base, {k: merged(k) for k in base.keys()}, run.out)
        base_name, keys = args.base, [m + ".weight" for m in results]
        if not args.no_eval:
            arms["base"] = base.get
            for p, ad in zip(adapter_paths, adapters):
                arms[Path(p).name] = weights_of(base, [ad], as_is(ad))
            arms[args.method] = merged
            if args.output == "adapter":
                # what the written adapter gives: without (c0 - 1) W0, truncated if --rank
                written = {m: (a.double(), b.double()) for m, (a, b) in factors.items()}
                arms[f"{args.method} adapter"] = weights_of(base, [written], as_is(written))
            results_other = merge_adapters(*merge, other, args.space, *iterate, desc=other)[0]
            arms[other] = weights_of(base, adapters, results_other)
    dataio.write_jsonl(run.out / "merge_log.jsonl", log)
    summary = {"inputs": names, "weights": weights, "method": args.method, "output": args.output}
    summary["space"] = "dense" if args.models else args.space
    modules = {"modules": len(log), **stats.column_summary(log, LOG_COLUMNS, minima=("c0",))}
    summary.update(merge_seconds=merge_seconds, modules=modules)
    print(json.dumps(summary["modules"], indent=1), flush=True)
    sets = None
    if not args.no_eval:
        sets = likelihood.domain_sets(
            args.eval_data, base_name, args.eval_size, args.prompts, args.seed
        )
    if sets and arms:
        # every arm put into one copy of --base in turn (with --init-adapter merged: the modules no
        # arm sets keep the starting model's weights), then scored
        samples = args.samples if args.prompts else 0
        sampled = (samples, args.max_new_tokens, args.temperature, args.seed)
        on_base = (base_name, run.device, args.init_adapter)
        rows = likelihood.score_arms(*on_base, keys, arms, sets, *sampled)
        summary.update(report_eval(rows, sets, run.out))
    lifecycle.finish_run(run, summary)
    where = f"{run.out}{'/model' if args.output == 'model' else ''}"
    print(f"\n{args.method} merge of {len(names)} inputs -> {where} ({merge_seconds:.1f} s)")
    return summary


# ---- plumbing: flags and weights, the evaluation's report -------------------------------------


def checked_inputs(args: Args) -> list[str]:
    """The adapter dirs to merge (none with --models), after the flags are checked; settles
    --output auto."""
    if args.models and args.adapters:
        raise errors.ConfigError(
            "give --models (full models) or --adapters (onto --base), not both"
        )
    if args.max_iter < 1 or args.rank < 0 or args.tol <= 0:
        raise errors.ConfigError("--max-iter must be >= 1, --rank >= 0, --tol > 0")
    adapter_paths = args.adapters
    if not adapter_paths and not args.models and args.base == "toy":
        adapter_paths = [str(p) for p in toy.domain_adapter_dirs()]
    if not args.models and not adapter_paths:
        raise errors.ConfigError("nothing to merge: pass --adapters (onto --base) or --models")
    if args.models and args.init_adapter:
        raise errors.ConfigError(
            "--init-adapter goes with --adapters (onto --base); full --models merge as they are"
        )
    if args.models and args.output == "adapter":
        raise errors.ConfigError(
            "--output adapter needs --adapters: full models (--models) merge into a full model"
        )
    if args.output == "auto":
        args.output = "model" if args.models else "adapter"
    return adapter_paths


def normalised(weights: list[float], n: int) -> list[float]:
    """--weights scaled to sum to 1; none = all equal."""
    if not weights:
        return [1.0 / n] * n
    if len(weights) != n or any(not (w > 0) for w in weights):
        raise errors.ConfigError(
            f"--weights: need {n} positive numbers (one per input), got {weights}"
        )
    return [w / sum(weights) for w in weights]


def report_eval(rows: list[dict], sets: dict, out: Path) -> dict:
    """samples.jsonl and the printed table; returns summary.json's eval rows and, with a base arm,
    every other arm against it per domain: the mean paired difference arm - base of each unit's
    figure (a document's NLL per token, a prefix's distinct-1 and pairwise diversity) with its 95%
    interval (stats.paired_interval), and whether the Karcher merge's NLL beats the base's."""
    units = {r["arm"]: r.get("_units", {}) for r in rows}
    rows = likelihood.report_domains(rows, list(sets), out)
    summary = {"eval": rows}
    if "base" not in units:
        return summary

    def against_base(arm: str, d: str) -> dict:
        pairs = ((m, units["base"][d][m], units[arm][d][m]) for m in units["base"][d])
        keys = ("diff", "se", "interval")
        return {m: dict(zip(keys, stats.paired_interval(b, a, math.inf))) for m, b, a in pairs}

    summary["vs_base"] = {
        arm: {d: against_base(arm, d) for d in sets} for arm in units if arm != "base"
    }
    by = {r["arm"]: r for r in rows}
    summary["karcher_beats_base_nll"] = {
        d: by["karcher"][f"{d}/nll"] < by["base"][f"{d}/nll"] for d in sets
    }
    return summary


if __name__ == "__main__":
    cli.run_cli(main, Args)
