"""Triton kernels: one program per row walks the vocabulary in BLOCK-wide slices.

Imported lazily by `vocab_kernels/__init__.py` (only for CUDA tensors or when TRITON_INTERPRET=1,
which must be set before triton is first imported: `triton.jit` reads it when a kernel is defined).

Conservative Triton on purpose, so the same source runs on an H100 and under the CPU interpreter:
every load is cast to fp32 at once (the interpreter mishandles bf16 arithmetic), row offsets are
int64 (N * V overflows int32 beyond about 14k rows at Qwen's vocab), the vocab tail is masked
(151,936 is not a multiple of 256), temperature and beta are constexpr (a Python float passed as a
runtime argument may be typed fp64 on some compile paths), and there is no autotuning.

The five row ops follow the contract in `vocab_kernels/chunked.py`.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import triton
import triton.language as tl

from vocab_kernels import chunked

NEG_INF = tl.constexpr(float("-inf"))  # jit code may only read constexpr globals
ROW_CHUNK_ELEMS = None  # one launch covers all rows; memory is bounded per program, not per call


def _block(v: int) -> int:
    # 4096 fp32 per slice: 16 KB of registers per program at 8 warps, few slices per Qwen row (38).
    return min(4096, triton.next_power_of_2(max(v, 16)))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _on_device_of(t: torch.Tensor):
    """Triton launches on the *current* CUDA device and stream, not the tensor's: make the tensor's
    device current for the launch (a tensor on cuda:1 while cuda:0 is current would otherwise be
    read from the wrong device). Host tensors (the interpreter) need nothing."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# token log-probs


@triton.jit
def _logprob_fwd_kernel(
    z_ptr,
    z_stride,
    tgt_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    V,
    INV_T: tl.constexpr,
    WANT_ENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Online log-sum-exp (Milakov & Gimelshein 2018): m = running max, d = sum exp(u - m),
    # t = sum (u - m) exp(u - m); lse = m + log d, entropy H = lse - E_p[u] = log d - t / d.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    m = tl.full([], NEG_INF, tl.float32)
    d = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        u = tl.load(z_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * INV_T
        m_new = tl.maximum(m, tl.max(u, axis=0))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)  # all -inf so far: keep exp() finite
        scale = tl.exp(m - m_safe)
        e = tl.exp(u - m_safe)
        if WANT_ENT:
            # move t's reference point from m to m_new: t' = (t + (m - m_new) d) exp(m - m_new)
            t = (t + tl.where(d > 0.0, m - m_safe, 0.0) * d) * scale
            t += tl.sum(tl.where(e > 0.0, u - m_safe, 0.0) * e, axis=0)
        d = d * scale + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(d)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    ok = (tgt >= 0) & (
        tgt < V
    )  # an ignore index (e.g. -100) gives logp 0 and never reads out of bounds
    u_t = tl.load(z_row + tl.where(ok, tgt, 0)).to(tl.float32) * INV_T
    tl.store(logp_ptr + row, tl.where(ok, u_t - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if WANT_ENT:
        tl.store(ent_ptr + row, tl.log(d) - t / d)


@triton.jit
def _logprob_bwd_kernel(
    z_ptr,
    z_stride,
    tgt_ptr,
    lse_ptr,
    ent_ptr,
    g_ptr,
    ge_ptr,
    out_ptr,
    out_stride,
    V,
    INV_T: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # u = z / T, p = softmax(u): dlogp_y/du = onehot_y - p; dH/du = -p (log p + H) (from dp_j/du_k =
    # p_j (1[j=k] - p_k)); both times 1/T for dz. out = g dlogp_y/dz + ge dH/dz
    # (vocab_kernels/chunked.py contract).
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    out_row = out_ptr + row * out_stride
    lse = tl.load(lse_ptr + row)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    g = 0.0
    ge = 0.0
    ent = 0.0
    if HAS_G:
        g = tl.where((tgt >= 0) & (tgt < V), tl.load(g_ptr + row).to(tl.float32), 0.0)
    if HAS_GE:
        ge = tl.load(ge_ptr + row).to(tl.float32)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < V
        # masked lanes load 0 (finite, never stored); a -inf logit gives p = 0 and no gradient
        logp = tl.load(z_row + cols, mask=inb, other=0.0).to(tl.float32) * INV_T - lse
        p = tl.exp(logp)
        grad = tl.zeros([BLOCK], tl.float32)
        if HAS_G:
            grad = tl.where(cols == tgt, g, 0.0) - p * g
        if HAS_GE:
            grad -= ge * tl.where(p > 0.0, logp + ent, 0.0) * p
        tl.store(out_row + cols, (grad * INV_T).to(out_ptr.dtype.element_ty), mask=inb)


def logprob_stats(z, targets, temperature, want_entropy):
    n, v = z.shape
    logp = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    if n:
        block = _block(v)
        with _on_device_of(z):
            _logprob_fwd_kernel[(n,)](
                z,
                z.stride(0),
                targets.contiguous(),
                logp,
                lse,
                ent if want_entropy else lse,
                v,
                INV_T=1.0 / temperature,
                WANT_ENT=bool(want_entropy),
                BLOCK=block,
                num_warps=_warps(block),
            )
    return logp, lse, ent


def logprob_grad(z, targets, lse, ent, g, ge, temperature, out):
    n, v = z.shape
    if not n:
        return
    if out.stride(1) != 1:
        raise ValueError("vocab_kernels: gradient buffer must have a unit stride on the vocab dim")
    block = _block(v)
    dummy = lse
    with _on_device_of(z):
        _logprob_bwd_kernel[(n,)](
            z,
            z.stride(0),
            targets.contiguous(),
            lse,
            dummy if ent is None else ent,
            dummy if g is None else g.contiguous(),
            dummy if ge is None else ge.contiguous(),
            out,
            out.stride(0),
            v,
            INV_T=1.0 / temperature,
            HAS_G=g is not None,
            HAS_GE=ge is not None,
            BLOCK=block,
            num_warps=_warps(block),
        )


def ce_grad(z, targets, lse, out):
    """out = softmax(z) - onehot(y) (-dlogp/dz at T = 1; 0 for ignored targets): the g = -1 case."""
    minus_one = torch.full((z.shape[0],), -1.0, dtype=torch.float32, device=z.device)
    logprob_grad(z, targets, lse, None, minus_one, None, 1.0, out)


# --------------------------------------------------------------------------------------------------
# generalized JSD


@triton.jit
def _log_mix(ls, lt, LOG_BETA: tl.constexpr, LOG_1MBETA: tl.constexpr):
    # log m = log(beta p + (1 - beta) q) = logaddexp(log p + log beta, log q + log(1 - beta))
    a = lt + LOG_BETA
    b = ls + LOG_1MBETA
    mx = tl.maximum(a, b)
    mx = tl.where(mx == NEG_INF, 0.0, mx)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _jsd_fwd_kernel(
    zs_ptr,
    zs_stride,
    zt_ptr,
    zt_stride,
    jsd_ptr,
    lse_s_ptr,
    lse_t_ptr,
    sq_ptr,
    V,
    INV_T: tl.constexpr,
    MODE: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_1MBETA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # MODE 0: KL(P||Q) (beta 0), 1: KL(Q||P) (beta 1), 2: beta KL(P||M) + (1-beta) KL(Q||M),
    # P = teacher, Q = student, M = beta P + (1-beta) Q (GKD, arXiv 2306.13649). Two passes: the
    # lse's first (online, as in _logprob_fwd_kernel), then the divergence sum with log-probs known.
    row = tl.program_id(0).to(tl.int64)
    s_row = zs_ptr + row * zs_stride
    t_row = zt_ptr + row * zt_stride
    ms = tl.full([], NEG_INF, tl.float32)
    mt = tl.full([], NEG_INF, tl.float32)
    ds = tl.zeros([], tl.float32)
    dt = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < V
        us = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * INV_T
        ut = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * INV_T
        ms_new = tl.maximum(ms, tl.max(us, axis=0))
        mt_new = tl.maximum(mt, tl.max(ut, axis=0))
        ms_safe = tl.where(ms_new == NEG_INF, 0.0, ms_new)
        mt_safe = tl.where(mt_new == NEG_INF, 0.0, mt_new)
        ds = ds * tl.exp(ms - ms_safe) + tl.sum(tl.exp(us - ms_safe), axis=0)
        dt = dt * tl.exp(mt - mt_safe) + tl.sum(tl.exp(ut - mt_safe), axis=0)
        ms = ms_new
        mt = mt_new
    lse_s = ms + tl.log(ds)
    lse_t = mt + tl.log(dt)
    acc_p = tl.zeros([], tl.float32)
    acc_q = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < V
        # masked lanes load 0 (finite) and get p = q = 0; zero-probability terms contribute 0
        ls = tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32) * INV_T - lse_s
        lt = tl.load(t_row + cols, mask=inb, other=0.0).to(tl.float32) * INV_T - lse_t
        q = tl.where(inb, tl.exp(ls), 0.0)
        p = tl.where(inb, tl.exp(lt), 0.0)
        if MODE == 0:
            acc_p += tl.sum(tl.where(p > 0.0, lt - ls, 0.0) * p, axis=0)
        elif MODE == 1:
            acc_q += tl.sum(tl.where(q > 0.0, ls - lt, 0.0) * q, axis=0)
        else:
            lm = _log_mix(ls, lt, LOG_BETA, LOG_1MBETA)
            acc_p += tl.sum(tl.where(p > 0.0, lt - lm, 0.0) * p, axis=0)
            acc_q += tl.sum(tl.where(q > 0.0, ls - lm, 0.0) * q, axis=0)
    if MODE == 0:
        jsd = acc_p
    elif MODE == 1:
        jsd = acc_q
    else:
        jsd = BETA * acc_p + (1.0 - BETA) * acc_q
    tl.store(jsd_ptr + row, jsd)
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(sq_ptr + row, acc_q)


@triton.jit
def _jsd_bwd_kernel(
    zs_ptr,
    zs_stride,
    zt_ptr,
    zt_stride,
    lse_s_ptr,
    lse_t_ptr,
    sq_ptr,
    g_ptr,
    out_ptr,
    out_stride,
    V,
    INV_T: tl.constexpr,
    MODE: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_1MBETA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dJ/du_j (u = zs / T): MODE 0: q_j - p_j; MODE 1: q_j (log q_j - log p_j - KL(Q||P));
    # MODE 2: (1 - beta) q_j (log q_j - log m_j - KL(Q||M)). Times g / T.
    row = tl.program_id(0).to(tl.int64)
    s_row = zs_ptr + row * zs_stride
    t_row = zt_ptr + row * zt_stride
    out_row = out_ptr + row * out_stride
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    sq = tl.load(sq_ptr + row)
    coef = tl.load(g_ptr + row).to(tl.float32) * INV_T
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < V
        ls = tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32) * INV_T - lse_s
        lt = tl.load(t_row + cols, mask=inb, other=0.0).to(tl.float32) * INV_T - lse_t
        q = tl.exp(ls)
        if MODE == 0:
            grad = q - tl.exp(lt)
        elif MODE == 1:
            grad = tl.where(q > 0.0, ls - lt - sq, 0.0) * q
        else:
            lm = _log_mix(ls, lt, LOG_BETA, LOG_1MBETA)
            grad = (1.0 - BETA) * tl.where(q > 0.0, ls - lm - sq, 0.0) * q
        tl.store(out_row + cols, (grad * coef).to(out_ptr.dtype.element_ty), mask=inb)


def _jsd_consts(beta: float, temperature: float) -> dict:
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    return dict(
        INV_T=1.0 / temperature,
        MODE=mode,
        BETA=float(beta),
        LOG_BETA=math.log(beta) if mode == 2 else 0.0,
        LOG_1MBETA=math.log1p(-beta) if mode == 2 else 0.0,
    )


def jsd_stats(zs, zt, beta, temperature):
    n, v = zs.shape
    jsd = torch.empty(n, dtype=torch.float32, device=zs.device)
    lse_s, lse_t, sq = torch.empty_like(jsd), torch.empty_like(jsd), torch.empty_like(jsd)
    if n:
        block = _block(v)
        with _on_device_of(zs):
            _jsd_fwd_kernel[(n,)](
                zs,
                zs.stride(0),
                zt,
                zt.stride(0),
                jsd,
                lse_s,
                lse_t,
                sq,
                v,
                BLOCK=block,
                num_warps=_warps(block),
                **_jsd_consts(beta, temperature),
            )
    return jsd, (lse_s, lse_t, sq)


def jsd_grad(zs, zt, stats, g, beta, temperature, out):
    n, v = zs.shape
    if not n:
        return
    if out.stride(1) != 1:
        raise ValueError("vocab_kernels: gradient buffer must have a unit stride on the vocab dim")
    lse_s, lse_t, sq = stats
    block = _block(v)
    with _on_device_of(zs):
        _jsd_bwd_kernel[(n,)](
            zs,
            zs.stride(0),
            zt,
            zt.stride(0),
            lse_s,
            lse_t,
            sq,
            g.contiguous(),
            out,
            out.stride(0),
            v,
            BLOCK=block,
            num_warps=_warps(block),
            **_jsd_consts(beta, temperature),
        )


# --------------------------------------------------------------------------------------------------
# public functions (same signatures as vocab_kernels/__init__.py; the chunk drivers are shared with
# the reference)

_OPS = sys.modules[__name__]


def token_logprobs(logits, targets, temperature=1.0, return_entropy=False):
    return chunked.token_logprobs(_OPS, logits, targets, temperature, return_entropy)


def linear_token_logprobs(
    hidden,
    weight,
    targets,
    temperature=1.0,
    return_entropy=False,
    chunk_size=None,
    weight_grad_rows=None,
):
    return chunked.linear_token_logprobs(
        _OPS, hidden, weight, targets, temperature, return_entropy, chunk_size, weight_grad_rows
    )


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    return chunked.generalized_jsd(_OPS, student_logits, teacher_logits, beta, temperature)


def linear_generalized_jsd(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    beta=0.5,
    temperature=1.0,
    chunk_size=None,
):
    return chunked.linear_generalized_jsd(
        _OPS,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        beta,
        temperature,
        chunk_size,
    )
