"""Row-chunked autograd wrappers shared by the PyTorch reference and the Triton backend.

The full-vocabulary tensor [N, V] is never built here. Each op is split into per-row parts that a
backend supplies as functions on a slice of rows (`ops` is the backend module):

    ops.logprob_stats(z, targets, T, want_entropy) -> (logp, lse, entropy or None)
    ops.logprob_grad(z, targets, lse, entropy, g, ge, T, out)      out = dL/dz for L = g.logp + ge.H
    ops.ce_grad(z, targets, lse, out)                              out = softmax(z) - onehot
                                                                   = -dlogp/dz
    ops.jsd_stats(zs, zt, beta, T) -> (jsd, (lse_s, lse_t, s))
    ops.jsd_grad(zs, zt, stats, g, beta, T, out)                   out = dL/dzs for L = g.jsd
    ops.ROW_CHUNK_ELEMS                                            rows * V per row-op call, on
                                                                   given logits and within a
                                                                   fused-linear chunk (None: all
                                                                   rows in one call)

`out` may be `z` itself: the fused-linear ops turn their logits buffer into the gradient in place.
Backward recomputes the softmax from the saved per-row log-sum-exp (Liger-Kernel, verl), so the
saved state is a few floats per row. For the fused-linear ops the logits of one row chunk are a GEMM
into a reused buffer; the temperature and the upstream per-row gradient g are folded into the small
[rows, H] operands (u = (h / T) W^T; dL/dh_i = c_i C_i W and dL/dW = C^T (c * h) with c_i = -g_i / T
and C = softmax - onehot), so the only [rows, V] work in backward is C itself.
"""

from __future__ import annotations

import math

import torch

# Elements of the one [rows, V] logits buffer of the fused-linear ops: 2^27 (512 rows at Qwen's
# vocab; 311 MB fp32 on CPU, 155 MB bf16 on CUDA, where bigger GEMMs are faster still). It is the
# only buffer of that size alive at once (the row ops' temporaries are per ROW_CHUNK_ELEMS slice),
# so with a trained head the peak is this buffer plus the fp32 [V, H] weight gradient. Measured on 2
# busy CPU cores, fwd+bwd at V = 151,936 (N=4096 H=256 / N=2048 H=1024, head trained): 2^26 cuts the
# peak by 29% / 15% (456 -> 324 MB, 912 -> 773 MB) for 11% / 12% more CPU time, 2^25 by 48% / 25%
# for 25% / 26% more: no setting halves the peak within ~10% of the time, so CPU keeps 2^27 too.
LINEAR_CHUNK_ELEMS = 2**27


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: a power of two (GEMM-friendly) with rows * vocab <= LINEAR_CHUNK_ELEMS."""
    rows = max(1, LINEAR_CHUNK_ELEMS // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n_rows, rows))


def _row_slices(n: int, v: int, ops):
    elems = getattr(ops, "ROW_CHUNK_ELEMS", None)
    rows = n if not elems else max(1, elems // max(v, 1))
    for s in range(0, n, max(rows, 1)):
        yield s, min(s + rows, n)


def _mm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Dtype of the chunk GEMMs: the inputs' own on CUDA (bf16 in, fp32 accumulate, as the model's
    lm_head does); fp32 on CPU, where low-precision GEMMs are slow or missing and exactness is
    cheap."""
    if hidden.is_cuda:
        return torch.promote_types(hidden.dtype, weight.dtype)
    return torch.float32


def _scaled_rows(x: torch.Tensor, coef) -> torch.Tensor:
    """x * coef (a scalar or one factor per row), in x's dtype."""
    if isinstance(coef, float):
        return x if coef == 1.0 else x * coef
    return x * coef.to(x.dtype)[:, None]


_FP32_OUT_ADDMM: dict[torch.device, bool] = {}


def _fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=torch.float32, out=acc_fp32) runs
    here and adds in place (CUDA only; older torch releases lack out_dtype or require `input` in the
    inputs' dtype). Probed once per device on exactly representable values."""
    if device not in _FP32_OUT_ADDMM:
        ok = False
        try:
            acc = torch.full((2, 3), 0.5, dtype=torch.float32, device=device)
            a = torch.arange(8, dtype=torch.bfloat16, device=device).view(4, 2)
            b = torch.ones(4, 3, dtype=torch.bfloat16, device=device)
            torch.addmm(acc, a.T, b, out_dtype=torch.float32, out=acc)
            want = torch.tensor([[12.5] * 3, [16.5] * 3], device=device)
            ok = acc.dtype == torch.float32 and bool(torch.equal(acc, want))
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _FP32_OUT_ADDMM[device] = ok
    return _FP32_OUT_ADDMM[device]


def _accumulate_weight_grad(grad_w: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w += c.T @ h (grad_w fp32, c and h in the GEMM dtype), in place.

    Same dtypes (fp32 on CPU): addmm_. bf16/fp16 chunks on CUDA: one GEMM with fp32 output that adds
    into the fp32 accumulator (torch.addmm's out_dtype), so no [V, H] low-precision temporary per
    chunk and no
    rounding of each chunk's sum to bf16. Without that (older torch, CPU): through a temporary."""
    if c.numel() == 0 or h.numel() == 0:
        return
    if grad_w.dtype == c.dtype:
        grad_w.addmm_(c.T, h)
    elif (
        grad_w.is_cuda
        and grad_w.dtype == torch.float32
        and c.dtype in (torch.bfloat16, torch.float16)
        and h.dtype == c.dtype
        and _fp32_out_addmm_works(grad_w.device)
    ):
        torch.addmm(grad_w, c.T, h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.add_(c.T @ h)


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(
            f"vocab_kernels: temperature must be a positive finite number, got {temperature!r}"
        )
    return t


def check_beta(beta: float) -> float:
    b = float(beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"vocab_kernels: generalized_jsd beta must lie in [0, 1], got {beta!r}")
    return b


def flatten_logits(logits: torch.Tensor, targets: torch.Tensor | None = None):
    """[..., V] -> [N, V] with a unit stride on V (the kernels walk a row contiguously)."""
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"vocab_kernels: logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"vocab_kernels: logits must be floating point, got {logits.dtype}")
    if targets is not None and tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"vocab_kernels: targets shape {tuple(targets.shape)} must equal logits shape without "
            "the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    z = logits.reshape(-1, logits.shape[-1])
    if z.stride(-1) != 1:
        z = z.contiguous()
    return z


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, name: str = "hidden") -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"vocab_kernels: {name} must be [N, H] and its weight [V, H] with the same H, got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )


# --------------------------------------------------------------------------------------------------
# token log-probs from logits


class TokenLogprobs(torch.autograd.Function):
    """logp_i = z_iy/T - lse_i (+ entropy H_i = lse_i - E_p[z_i/T]); backward from the saved lse."""

    @staticmethod
    def forward(ctx, z, targets, temperature, want_entropy, ops):
        n, v = z.shape
        logp = torch.empty(n, dtype=torch.float32, device=z.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else None
        for s, e in _row_slices(n, v, ops):
            lp_c, lse_c, ent_c = ops.logprob_stats(z[s:e], targets[s:e], temperature, want_entropy)
            logp[s:e], lse[s:e] = lp_c, lse_c
            if want_entropy:
                ent[s:e] = ent_c
        ctx.save_for_backward(z, targets, lse, ent if want_entropy else lse)
        ctx.temperature, ctx.want_entropy, ctx.ops = temperature, want_entropy, ops
        ctx.set_materialize_grads(False)
        return (logp, ent) if want_entropy else logp

    @staticmethod
    def backward(ctx, g, ge=None):
        z, targets, lse, ent = ctx.saved_tensors
        if g is None and ge is None:
            return None, None, None, None, None
        ent = ent if ctx.want_entropy else None
        grad = torch.empty_like(z)
        for s, e in _row_slices(*z.shape, ctx.ops):
            ctx.ops.logprob_grad(
                z[s:e],
                targets[s:e],
                lse[s:e],
                None if ent is None else ent[s:e],
                None if g is None else g[s:e],
                None if ge is None else ge[s:e],
                ctx.temperature,
                grad[s:e],
            )
        return grad, None, None, None, None


# --------------------------------------------------------------------------------------------------
# token log-probs from hidden states and the LM head


class LinearTokenLogprobs(torch.autograd.Function):
    """Row chunks of u = (h / T) @ W.T through the row ops; only lse (and entropy) per row are kept.

    When forward can finish the logp gradient itself, it does, and backward needs no recompute (2
    GEMMs in all, as naive autograd): a frozen LM head (LoRA, the common case) keeps B_i = C_i @ W
    ([N, H]) and backward is dL/dh_i = -(g_i / T) B_i; with `rows` (gradient for k <= H rows of W
    only) it also keeps D = C[:, rows] ([N, k]) and backward is dL/dW[rows] = D^T (c * h). Otherwise
    backward recomputes each chunk's logits: 4 GEMMs in all against naive's 3, for memory O(chunk *
    V) instead of O(N * V). Within a chunk the row ops see slices of ops.ROW_CHUNK_ELEMS, so their
    temporaries stay small.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, temperature, want_entropy, chunk, ops, grad_enabled, rows
    ):
        n, v = hidden.shape[0], weight.shape[0]
        dt = _mm_dtype(hidden, weight)
        w = weight.to(dt)
        inv_t = 1.0 / temperature
        # needs_input_grad is also True under torch.no_grad(), hence grad_enabled from the caller
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        rows = rows if need_w else None
        small_rows = rows is not None and rows.numel() <= hidden.shape[1]  # D no bigger than B
        grads_in_forward = (need_h or need_w) and (not need_w or small_rows)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else None
        b = (
            torch.empty(n, hidden.shape[1], dtype=dt, device=hidden.device)
            if grads_in_forward and need_h
            else None
        )
        d = (
            torch.empty(n, rows.numel(), dtype=dt, device=hidden.device)
            if grads_in_forward and need_w
            else None
        )
        zbuf = torch.empty(min(chunk, n), v, dtype=dt, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = zbuf[: e - s]
            torch.mm(_scaled_rows(hidden[s:e].to(dt), inv_t), w.T, out=z)
            for a, c in _row_slices(e - s, v, ops):
                lp_c, lse_c, ent_c = ops.logprob_stats(
                    z[a:c], targets[s + a : s + c], 1.0, want_entropy
                )
                logp[s + a : s + c], lse[s + a : s + c] = lp_c, lse_c
                if want_entropy:
                    ent[s + a : s + c] = ent_c
                if grads_in_forward:  # z <- C = softmax - onehot, in place
                    ops.ce_grad(z[a:c], targets[s + a : s + c], lse_c, z[a:c])
            if b is not None:
                torch.mm(z, w, out=b[s:e])
            if d is not None:
                torch.index_select(z, 1, rows, out=d[s:e])
        del zbuf, w
        ctx.save_for_backward(
            hidden,
            weight,
            targets,
            lse,
            ent if want_entropy else lse,
            b if b is not None else lse,
            d if d is not None else lse,
            rows if rows is not None else lse,
        )
        ctx.temperature, ctx.want_entropy, ctx.chunk, ctx.ops = (
            temperature,
            want_entropy,
            chunk,
            ops,
        )
        ctx.grads_in_forward, ctx.has_b, ctx.has_d = grads_in_forward, b is not None, d is not None
        ctx.has_rows = rows is not None
        ctx.set_materialize_grads(False)
        return (logp, ent) if want_entropy else logp

    @staticmethod
    def backward(ctx, g, ge=None):
        hidden, weight, targets, lse, ent, b, d, rows = ctx.saved_tensors
        ent = ent if ctx.want_entropy else None
        rows = rows if ctx.has_rows else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / ctx.temperature
        rest = (None,) * 7  # targets, temperature, want_entropy, chunk, ops, grad_enabled, rows
        dt = _mm_dtype(hidden, weight)
        # dlogp_i/du_i = -C_i: the per-row factor c_i = -g_i / T (0 for ignored targets) goes on [N,
        # H] sides
        coef = None
        if g is not None:
            valid = (targets >= 0) & (targets < v)
            coef = torch.where(valid, g.float() * -inv_t, 0.0)
        grad_h = grad_w = None
        if need_w:  # fp32 accumulator: all of W, or only the selected rows
            grad_w = torch.zeros(
                (v if rows is None else rows.numel(), weight.shape[1]),
                dtype=torch.float32,
                device=weight.device,
            )
        if ctx.grads_in_forward:
            if coef is not None:
                if ctx.has_b:
                    grad_h = _scaled_rows(b, coef).to(hidden.dtype)
                if ctx.has_d:
                    _accumulate_weight_grad(grad_w, d, _scaled_rows(hidden.to(dt), coef))
            coef = None  # the logp part is done; only an entropy gradient can remain
        if need_h and grad_h is None:
            grad_h = torch.zeros_like(hidden)
        if coef is not None or ge is not None:
            w = weight.to(dt)
            zbuf = torch.empty(min(ctx.chunk, n), v, dtype=dt, device=hidden.device)
            for s in range(0, n, ctx.chunk):
                e = min(s + ctx.chunk, n)
                z = zbuf[: e - s]
                h_c = hidden[s:e].to(dt)
                torch.mm(_scaled_rows(h_c, inv_t), w.T, out=z)
                for a, c in _row_slices(e - s, v, ctx.ops):
                    sl = slice(s + a, s + c)
                    if ge is None:  # the common case: z <- C, per-row factors on the small side
                        ctx.ops.ce_grad(z[a:c], targets[sl], lse[sl], z[a:c])
                    else:  # entropy gradient too: z <- dL/du in full
                        ctx.ops.logprob_grad(
                            z[a:c],
                            targets[sl],
                            lse[sl],
                            ent[sl],
                            None if coef is None else g[sl],
                            ge[sl],
                            1.0,
                            z[a:c],
                        )
                row_coef = coef[s:e] if ge is None else inv_t
                if need_h:
                    grad_h[s:e] += _scaled_rows(z @ w, row_coef).to(hidden.dtype)
                if need_w:
                    _accumulate_weight_grad(
                        grad_w,
                        z if rows is None else z.index_select(1, rows),
                        _scaled_rows(h_c, row_coef),
                    )
            del zbuf, w
        if grad_w is not None:
            if rows is None:
                grad_w = grad_w.to(weight.dtype)
            else:  # zero outside the selected rows
                full = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
                grad_w = full.index_copy_(0, rows, grad_w.to(weight.dtype))
        return (grad_h, grad_w) + rest


# --------------------------------------------------------------------------------------------------
# generalized JSD (GKD)


class GeneralizedJSD(torch.autograd.Function):
    """Per-row generalized JSD from student logits zs and teacher logits zt; gradient w.r.t. zs
    only."""

    @staticmethod
    def forward(ctx, zs, zt, beta, temperature, ops):
        n, v = zs.shape
        jsd = torch.empty(n, dtype=torch.float32, device=zs.device)
        stats = [torch.empty_like(jsd) for _ in range(3)]
        for s, e in _row_slices(n, v, ops):
            j_c, st_c = ops.jsd_stats(zs[s:e], zt[s:e], beta, temperature)
            jsd[s:e] = j_c
            for dst, src in zip(stats, st_c):
                dst[s:e] = src
        ctx.save_for_backward(zs, zt, *stats)
        ctx.beta, ctx.temperature, ctx.ops = beta, temperature, ops
        ctx.set_materialize_grads(False)
        return jsd

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None, None
        zs, zt, *stats = ctx.saved_tensors
        grad = torch.empty_like(zs)
        for s, e in _row_slices(*zs.shape, ctx.ops):
            ctx.ops.jsd_grad(
                zs[s:e],
                zt[s:e],
                [st[s:e] for st in stats],
                g[s:e],
                ctx.beta,
                ctx.temperature,
                grad[s:e],
            )
        return grad, None, None, None, None


class LinearGeneralizedJSD(torch.autograd.Function):
    """Row chunks of us = (hs / T) @ Ws.T and ut = (ht / T) @ Wt.T (teacher: no gradient) through
    the JSD row ops. Same plan as LinearTokenLogprobs: with Ws frozen, forward keeps B_i =
    (dJ_i/dus_i) @ Ws and backward is dL/dhs_i = (g_i / T) B_i; otherwise backward recomputes both
    chunks' logits.
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, beta, temperature, chunk, ops, grad_enabled):
        n, v = hs.shape[0], ws.shape[0]
        dt, dtt = _mm_dtype(hs, ws), _mm_dtype(ht, wt)
        w, w_t = ws.to(dt), wt.to(dtt)
        inv_t = 1.0 / temperature
        grads_in_forward = grad_enabled and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        jsd = torch.empty(n, dtype=torch.float32, device=hs.device)
        stats = [torch.empty_like(jsd) for _ in range(3)]
        b = torch.empty(n, hs.shape[1], dtype=dt, device=hs.device) if grads_in_forward else None
        zs_buf = torch.empty(min(chunk, n), v, dtype=dt, device=hs.device)
        zt_buf = torch.empty(min(chunk, n), v, dtype=dtt, device=hs.device)
        ones = torch.ones(min(chunk, n), dtype=torch.float32, device=hs.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            zs, zt = zs_buf[: e - s], zt_buf[: e - s]
            torch.mm(_scaled_rows(hs[s:e].to(dt), inv_t), w.T, out=zs)
            torch.mm(_scaled_rows(ht[s:e].to(dtt), inv_t), w_t.T, out=zt)
            # the JSD row ops hold several [rows, V] temporaries: give them backend-sized slices
            for a, c in _row_slices(e - s, v, ops):
                j_c, st_c = ops.jsd_stats(zs[a:c], zt[a:c], beta, 1.0)
                jsd[s + a : s + c] = j_c
                for dst, src in zip(stats, st_c):
                    dst[s + a : s + c] = src
                if grads_in_forward:  # zs <- dJ/dus in place
                    ops.jsd_grad(zs[a:c], zt[a:c], st_c, ones[a:c], beta, 1.0, zs[a:c])
            if grads_in_forward:
                torch.mm(zs, w, out=b[s:e])
        del zs_buf, zt_buf, w, w_t
        ctx.save_for_backward(hs, ws, ht, wt, *stats, b if grads_in_forward else jsd)
        ctx.beta, ctx.temperature, ctx.chunk, ctx.ops = beta, temperature, chunk, ops
        ctx.grads_in_forward = grads_in_forward
        ctx.set_materialize_grads(False)
        return jsd

    @staticmethod
    def backward(ctx, g):
        rest = (None,) * 7  # ht, wt, beta, temperature, chunk, ops, grad_enabled
        if g is None:
            return (None, None) + rest
        hs, ws, ht, wt, lse_s, lse_t, s_q, b = ctx.saved_tensors
        coef = g.float() / ctx.temperature  # dL/dhs_i = (g_i / T) (dJ_i/dus_i) Ws
        if ctx.grads_in_forward:
            return (_scaled_rows(b, coef).to(hs.dtype), None) + rest
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = hs.shape[0], ws.shape[0]
        dt, dtt = _mm_dtype(hs, ws), _mm_dtype(ht, wt)
        w, w_t = ws.to(dt), wt.to(dtt)
        inv_t = 1.0 / ctx.temperature
        zs_buf = torch.empty(min(ctx.chunk, n), v, dtype=dt, device=hs.device)
        zt_buf = torch.empty(min(ctx.chunk, n), v, dtype=dtt, device=hs.device)
        ones = torch.ones(min(ctx.chunk, n), dtype=torch.float32, device=hs.device)
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            zs, zt = zs_buf[: e - s], zt_buf[: e - s]
            h_c = hs[s:e].to(dt)
            torch.mm(_scaled_rows(h_c, inv_t), w.T, out=zs)
            torch.mm(_scaled_rows(ht[s:e].to(dtt), inv_t), w_t.T, out=zt)
            for a, c in _row_slices(e - s, v, ctx.ops):
                st = (lse_s[s + a : s + c], lse_t[s + a : s + c], s_q[s + a : s + c])
                ctx.ops.jsd_grad(zs[a:c], zt[a:c], st, ones[a:c], ctx.beta, 1.0, zs[a:c])
            if need_h:
                grad_h[s:e] = _scaled_rows(zs @ w, coef[s:e]).to(hs.dtype)
            if need_w:
                _accumulate_weight_grad(grad_w, zs, _scaled_rows(h_c, coef[s:e]))
        if grad_w is not None:
            grad_w = grad_w.to(ws.dtype)
        return (grad_h, grad_w) + rest


# --------------------------------------------------------------------------------------------------
# argument checks and reshaping shared by both backends' public functions


def token_logprobs(ops, logits, targets, temperature, return_entropy):
    temperature = check_temperature(temperature)
    z = flatten_logits(logits, targets)
    out = TokenLogprobs.apply(z, targets.reshape(-1), temperature, bool(return_entropy), ops)
    shape = logits.shape[:-1]
    if return_entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)


def linear_token_logprobs(
    ops, hidden, weight, targets, temperature, return_entropy, chunk_size, weight_grad_rows=None
):
    temperature = check_temperature(temperature)
    check_linear(hidden, weight)
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(
            f"vocab_kernels: targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}"
        )
    chunk = _chunk(chunk_size, hidden, weight)
    rows = check_weight_rows(weight_grad_rows, weight)
    return LinearTokenLogprobs.apply(
        hidden,
        weight,
        targets,
        temperature,
        bool(return_entropy),
        chunk,
        ops,
        torch.is_grad_enabled(),
        rows,
    )


def check_weight_rows(rows, weight):
    """weight_grad_rows as a 1-D int64 tensor on the weight's device, every id in [0, V); None stays
    None."""
    if rows is None:
        return None
    ints = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
    if not torch.is_tensor(rows) or rows.dim() != 1 or rows.dtype not in ints:
        got = (
            f"{rows.dtype} of shape {tuple(rows.shape)}"
            if torch.is_tensor(rows)
            else type(rows).__name__
        )
        raise ValueError(
            f"vocab_kernels: weight_grad_rows must be a 1-D integer tensor of row ids, got {got}"
        )
    rows = rows.to(device=weight.device, dtype=torch.long)
    if rows.numel():
        lo, hi = torch.stack(torch.aminmax(rows)).tolist()  # one host sync on CUDA
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"vocab_kernels: weight_grad_rows must lie in [0, {weight.shape[0]}), got ids from "
                f"{lo} to {hi}"
            )
    return rows


def generalized_jsd(ops, student_logits, teacher_logits, beta, temperature):
    beta, temperature = check_beta(beta), check_temperature(temperature)
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(
            f"vocab_kernels.generalized_jsd: student logits {tuple(student_logits.shape)} and "
            "teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary)"
        )
    zs = flatten_logits(student_logits)
    zt = flatten_logits(teacher_logits.detach())
    return GeneralizedJSD.apply(zs, zt, beta, temperature, ops).view(student_logits.shape[:-1])


def linear_generalized_jsd(
    ops,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    beta,
    temperature,
    chunk_size,
):
    beta, temperature = check_beta(beta), check_temperature(temperature)
    check_linear(student_hidden, student_weight, "student_hidden")
    check_linear(teacher_hidden, teacher_weight, "teacher_hidden")
    if (
        student_hidden.shape[0] != teacher_hidden.shape[0]
        or student_weight.shape[0] != teacher_weight.shape[0]
    ):
        raise ValueError(
            "vocab_kernels.linear_generalized_jsd: student and teacher need the same rows and "
            "vocab, got hidden "
            f"{tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}, weight "
            f"{tuple(student_weight.shape)} vs {tuple(teacher_weight.shape)}"
        )
    chunk = _chunk(chunk_size, student_hidden, student_weight)
    return LinearGeneralizedJSD.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        beta,
        temperature,
        chunk,
        ops,
        torch.is_grad_enabled(),
    )


def _chunk(chunk_size, hidden, weight) -> int:
    if chunk_size is None:
        return default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    if int(chunk_size) < 1:
        raise ValueError(
            f"vocab_kernels: chunk_size must be a positive number of rows, got {chunk_size!r}"
        )
    return int(chunk_size)
