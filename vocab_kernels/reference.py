"""Plain-PyTorch references of every kernel, with the same signatures as the public API.

They are chunked like the kernels (the same custom autograd.Functions in `vocab_kernels/chunked.py`
walk the rows), so CPU memory stays bounded too: given logits go through in slices of
ROW_CHUNK_ELEMS elements, the fused-linear ops one GEMM chunk at a time (and the row ops within it
in such slices). All math in fp32 whatever the input dtype.

The row ops below (`logprob_stats`, `logprob_grad`, `ce_grad`, `jsd_stats`, `jsd_grad`) are this
backend's half of the contract described in `vocab_kernels/chunked.py`;
`vocab_kernels/triton_kernels.py` implements the same five with Triton.
"""

from __future__ import annotations

import math
import sys

import torch

from vocab_kernels import chunked

# Rows per row-op call (vocab_kernels/chunked.py slices given logits and each fused-linear chunk):
# rows * V <= 2^24, so each fp32 temporary is at most 64 MB, not the size of a 2^27-element GEMM
# chunk. (Measured on 2 cores: slices much smaller than this run several times slower per row.)
ROW_CHUNK_ELEMS = 2**24

_F32_MIN = torch.finfo(torch.float32).min


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """u = z / T in fp32 (a fresh tensor: callers may modify it in place)."""
    u = z.float()
    if temperature != 1.0:
        return u * (1.0 / temperature)
    return u.clone() if u is z else u


def _valid_targets(targets: torch.Tensor, v: int):
    """Targets outside [0, V) (e.g. an ignore index of -100) give logp 0 and no gradient."""
    valid = (targets >= 0) & (targets < v)
    return valid, torch.where(valid, targets, torch.zeros_like(targets)).long()


def _work_buffer(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor holding z that may be overwritten: `out` itself when it is fp32 (the result
    then lands in place, also when out aliases z), else a fresh copy."""
    if out.dtype == torch.float32:
        if out.data_ptr() != z.data_ptr() or out.stride() != z.stride():
            out.copy_(z)
        return out
    return z.float() if z.dtype != torch.float32 else z.clone()


def _finish(x: torch.Tensor, out: torch.Tensor) -> None:
    if x.data_ptr() != out.data_ptr():
        out.copy_(x)


# --------------------------------------------------------------------------------------------------
# row ops (see vocab_kernels/chunked.py)


def logprob_stats(z, targets, temperature, want_entropy):
    """Per row: lse = logsumexp(u), logp = u_y - lse, H = -sum p log p, with u = z / T.

    torch.log_softmax is the fastest CPU primitive for this (one cache-resident row at a time); lse
    is
    read back at the target, lse = u_y - log p_y, and taken the long way only where u_y = -inf."""
    v = z.shape[1]
    u = z if temperature == 1.0 else z.float() * (1.0 / temperature)
    lp = torch.log_softmax(
        u, dim=-1, dtype=torch.float32
    )  # upcasts inside: no fp32 copy of bf16 logits
    valid, tgt = _valid_targets(targets, v)
    lp_t = lp.gather(1, tgt[:, None]).squeeze(1)
    lse = u.gather(1, tgt[:, None]).squeeze(1).float() - lp_t
    bad = ~torch.isfinite(lse)
    if bad.any():
        lse[bad] = torch.logsumexp(u[bad].float(), dim=-1)
    logp = torch.where(valid, lp_t, 0.0)
    ent = None
    if want_entropy:
        p = lp.exp()
        lp.clamp_(min=_F32_MIN)  # log p = -inf where p = 0: make p log p = 0 there
        ent = -p.mul_(lp).sum(-1)
    return logp, lse, ent


def logprob_grad(z, targets, lse, ent, g, ge, temperature, out):
    """dL/dz for L = g logp_y + ge H (the contract in vocab_kernels/chunked.py), u = z / T, p =
    softmax(u): dlogp_y/dz = (onehot_y - p) / T and dH/dz = -p (log p + H) / T (H = -sum_j p_j log
    p_j through dp_j/du_k = p_j (1[j=k] - p_k)), so dL/dz = [g (onehot_y - p) - ge p (log p + H)] /
    T. out may alias z."""
    v = z.shape[1]
    x = _work_buffer(z, out)
    if temperature != 1.0:
        x.mul_(1.0 / temperature)
    x.sub_(lse[:, None])  # log p
    coef = None  # dL/du = p * coef (+ g at the target)
    if ge is not None:
        x.clamp_(min=_F32_MIN)  # p = 0 entries: 0 * finite, not 0 * inf
        coef = (x + ent[:, None]).mul_(-ge.float()[:, None])  # dH/du_j = -p_j (log p_j + H)
    x.exp_()  # p
    if g is not None:
        valid, tgt = _valid_targets(targets, v)
        gv = torch.where(valid, g.float(), 0.0)
        coef = (-gv)[:, None] if coef is None else coef.sub_(gv[:, None])
    x.mul_(coef)
    if g is not None:
        x.scatter_add_(1, tgt[:, None], gv[:, None])
    if temperature != 1.0:
        x.mul_(1.0 / temperature)
    _finish(x, out)


def ce_grad(z, targets, lse, out):
    """out = softmax(z) - onehot(y) = -dlogp/dz at temperature 1 (rows with ignored targets: 0).
    Two in-place passes (sub, exp) and a scatter; out may alias z."""
    v = z.shape[1]
    x = _work_buffer(z, out)
    x.sub_(lse[:, None]).exp_()
    valid, tgt = _valid_targets(targets, v)
    x.scatter_add_(1, tgt[:, None], -valid.to(x.dtype)[:, None])
    if not bool(valid.all()):
        x[~valid] = 0.0
    _finish(x, out)


def _log_softmax_lse(z, temperature):
    """(log softmax(z / T), logsumexp(z / T)) in fp32; lse read back at the row max (log p nearest
    0)."""
    u = z if temperature == 1.0 else z.float() * (1.0 / temperature)
    lp = torch.log_softmax(u, dim=-1, dtype=torch.float32)
    mx, arg = u.max(dim=-1)
    return lp, mx.float() - lp.gather(1, arg[:, None]).squeeze(1)


def _xlogy_terms(w, a, b):
    """w * (a - b) per element, 0 where w = 0 (a and b may both be -inf there)."""
    return (a - b).mul_(w).masked_fill_(w == 0, 0.0)


def _log_mixture(ls, lt, beta):
    """log m = log(beta p + (1 - beta) q) = logaddexp(log p + log beta, log q + log(1 - beta))."""
    return torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))


def jsd_stats(zs, zt, beta, temperature):
    """Per row: the GKD divergence with P = teacher, Q = student (Agarwal et al. 2023; TRL's special
    cases): beta 0: KL(P||Q); beta 1: KL(Q||P); else beta KL(P||M) + (1 - beta) KL(Q||M), M = beta P
    + (1-beta) Q. Also the stats backward needs: (lse_s, lse_t, s) with s = KL(Q||M) (KL(Q||P) for
    beta 1)."""
    ls, lse_s = _log_softmax_lse(zs, temperature)
    lt, lse_t = _log_softmax_lse(zt, temperature)
    if beta == 0.0:
        jsd = _xlogy_terms(lt.exp(), lt, ls).sum(-1)
        return jsd, (lse_s, lse_t, jsd)
    if beta == 1.0:
        jsd = _xlogy_terms(ls.exp(), ls, lt).sum(-1)
        return jsd, (lse_s, lse_t, jsd)
    lm = _log_mixture(ls, lt, beta)
    sp = _xlogy_terms(lt.exp(), lt, lm).sum(-1)
    sq = _xlogy_terms(ls.exp(), ls, lm).sum(-1)
    return beta * sp + (1.0 - beta) * sq, (lse_s, lse_t, sq)


def jsd_grad(zs, zt, stats, g, beta, temperature, out):
    """dJ/du_j for the student, u = zs / T, q = softmax(u), times g / T:
    beta 0: q_j - p_j;  beta 1: q_j (log q_j - log p_j - KL(Q||P));
    else: (1 - beta) q_j (log q_j - log m_j - KL(Q||M))   [dJ/dq_k = (1-beta)(log q_k - log m_k),
    then
    through the softmax Jacobian]. out may alias zs."""
    lse_s, lse_t, s_q = stats
    ls = _scaled(zs, temperature).sub_(lse_s[:, None])
    lt = _scaled(zt, temperature).sub_(lse_t[:, None])
    q = ls.exp()
    if beta == 0.0:
        grad = q.sub_(lt.exp_())
    elif beta == 1.0:
        grad = _xlogy_terms(q, ls.sub_(s_q[:, None]), lt)
    else:
        lm = _log_mixture(ls, lt, beta)
        grad = _xlogy_terms(q, ls.sub_(s_q[:, None]), lm).mul_(1.0 - beta)
    grad.mul_((g.float() * (1.0 / temperature))[:, None])
    out.copy_(grad)


# --------------------------------------------------------------------------------------------------
# public references (same signatures as vocab_kernels/__init__.py)

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
