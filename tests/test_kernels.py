"""vocab_kernels/ against unchunked float64 oracles written here, independently of the kernels.

Two backends, one set of cases:
- the PyTorch reference (`vocab_kernels.reference`), in this process;
- the Triton kernels under the CPU interpreter, in ONE subprocess with TRITON_INTERPRET=1 set before
  anything imports triton (`triton.jit` reads the variable when a kernel is defined, so setting it
  here would be too late, and it must not leak into other test modules). The subprocess runs this
  file as a script and reports one result per case as JSON.

Tolerances (|got - want| <= rtol * |want| + atol * max|want|, elementwise):
- values (logp, entropy, jsd), any input dtype: rtol 2e-5, atol 2e-5. The oracle sees the same
  bf16-rounded inputs in float64 and every kernel accumulates in fp32, so bf16 inputs are as exact
  here.
- gradients, fp32 inputs: rtol 1e-4, atol 1e-5; gradients stored in bf16 (the input dtype):
  rtol 1e-2, atol 4e-3 (bf16 keeps 8 bits: 2^-8 = 3.9e-3 relative).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QWEN_V = 151_936

TOL_VALUE = (2e-5, 2e-5)
TOL_GRAD = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-2, 4e-3)}


# --------------------------------------------------------------------------------------------------
# float64 oracles: the textbook formulas on the whole [N, V], autograd for gradients


def oracle_token_logprobs(z, targets, temperature):
    u = z.double() / temperature
    logp_all = torch.log_softmax(u, dim=-1)
    valid = (targets >= 0) & (targets < z.shape[-1])
    picked = logp_all.gather(-1, targets.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, picked, torch.zeros_like(picked))
    p = logp_all.exp()
    u_finite = torch.where(torch.isinf(u), torch.zeros_like(u), u)  # p = 0 there
    entropy = torch.logsumexp(u, -1) - (p * u_finite).sum(-1)
    return logp, entropy


def oracle_gjsd(zs, zt, beta, temperature):
    ls = torch.log_softmax(zs.double() / temperature, -1)
    lt = torch.log_softmax(zt.double() / temperature, -1)
    p, q = lt.exp(), ls.exp()
    if beta == 0:
        return (p * (lt - ls)).sum(-1)
    if beta == 1:
        return (q * (ls - lt)).sum(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
    return beta * (p * (lt - lm)).sum(-1) + (1 - beta) * (q * (ls - lm)).sum(-1)


# --------------------------------------------------------------------------------------------------
# cases


def _cases():
    cases = []
    for v in (37, 1000, 5000):
        for dtype in ("float32", "bfloat16"):
            for t in (1.0, 0.7):
                for ent in (False, True):
                    cases.append(dict(op="token", v=v, shape=(2, 3), dtype=dtype, t=t, ent=ent))
    cases.append(
        dict(op="token", v=1000, shape=(7,), dtype="float32", t=1.0, ent=True, special=True)
    )
    cases.append(
        dict(op="token", v=1000, shape=(5,), dtype="float32", t=0.7, ent=True, ent_only=True)
    )
    for dtype in ("float32", "bfloat16"):
        cases.append(dict(op="token", v=QWEN_V, shape=(2,), dtype=dtype, t=0.7, ent=True))
    for v, dtype, t, ent, wgrad in [
        (37, "float32", 1.0, True, True),
        (1000, "float32", 0.7, False, True),
        (5000, "float32", 0.7, True, False),
        (1000, "bfloat16", 1.0, True, True),
        (5000, "bfloat16", 0.7, False, False),
        (37, "float32", 0.7, False, False),
        (QWEN_V, "float32", 0.7, True, True),
    ]:
        n = 3 if v == QWEN_V else 10
        cases.append(
            dict(
                op="linear",
                v=v,
                n=n,
                h=8,
                chunk=2 if v == QWEN_V else 4,
                dtype=dtype,
                t=t,
                ent=ent,
                wgrad=wgrad,
            )
        )
    for wgrad in (
        True,
        False,
    ):  # only the entropy reaches the loss: logp's incoming gradient is None
        cases.append(
            dict(
                op="linear",
                v=1000,
                n=7,
                h=8,
                chunk=3,
                dtype="float32",
                t=0.7,
                ent=True,
                wgrad=wgrad,
                ent_only=True,
            )
        )
    # weight_grad_rows: k <= H rows (gradient kept from forward) and k > H rows (recomputed in
    # backward)
    for v, dtype, t, ent, k, ent_only in [
        (1000, "float32", 0.7, False, 3, False),
        (1000, "float32", 1.0, True, 3, False),
        (1000, "bfloat16", 0.7, True, 12, False),
        (5000, "float32", 0.7, False, 12, False),
        (1000, "float32", 0.7, True, 3, True),
        (QWEN_V, "float32", 0.7, False, 4, False),
    ]:
        n = 3 if v == QWEN_V else 10
        cases.append(
            dict(
                op="linear",
                v=v,
                n=n,
                h=8,
                chunk=2 if v == QWEN_V else 4,
                dtype=dtype,
                t=t,
                ent=ent,
                wgrad=True,
                rows=k,
                **({"ent_only": True} if ent_only else {}),
            )
        )
    for v in (37, 1000, 5000):
        for beta in (0.0, 0.5, 1.0, 0.1):
            for dtype, t in (("float32", 1.0), ("bfloat16", 0.7)):
                cases.append(dict(op="jsd", v=v, n=5, beta=beta, dtype=dtype, t=t))
    cases.append(dict(op="jsd", v=QWEN_V, n=2, beta=0.5, dtype="bfloat16", t=0.9))
    for v, beta, dtype, wgrad in [
        (1000, 0.5, "float32", True),
        (5000, 0.0, "float32", False),
        (37, 1.0, "bfloat16", True),
        (1000, 0.3, "bfloat16", False),
    ]:
        cases.append(
            dict(
                op="linear_jsd",
                v=v,
                n=9,
                hs=8,
                ht=12,
                chunk=4,
                beta=beta,
                dtype=dtype,
                t=0.8,
                wgrad=wgrad,
            )
        )
    for c in cases:
        c["id"] = "-".join(f"{k}={v}" for k, v in c.items())
    return cases


CASES = _cases()


def _close(name, got, want, tol):
    rtol, atol = tol
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs()
    bound = rtol * want.abs() + atol * max(scale, 1e-12)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{name}: max error {err.max().item():.3g} (bound {bound[bad].min().item():.3g} "
        f"at a failing element, scale {scale:.3g})"
    )


def check_case(case, api):
    """Run one case through `api` (a module with the public functions) and compare with the
    oracle."""
    gen = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    dtype = getattr(torch, case.get("dtype", "float32"))
    grad_tol = TOL_GRAD[dtype]
    op = case["op"]
    if op == "token":
        v, shape = case["v"], case["shape"]
        z = (torch.randn(*shape, v, generator=gen) * 4).to(dtype)
        tgt = torch.randint(0, v, shape, generator=gen)
        if case.get("special"):
            tgt[0] = -100  # ignore index: logp 0, no gradient
            tgt[1] = v - 1  # last element of the ragged tail
            z[2, 5] = float("-inf")  # a masked logit
            z[3, :] = 0.0  # uniform row: entropy log V
        z.requires_grad_(True)
        out = api.token_logprobs(z, tgt, temperature=case["t"], return_entropy=case["ent"])
        logp, ent = out if case["ent"] else (out, None)
        zz = z.detach().double().requires_grad_(True)
        o_logp, o_ent = oracle_token_logprobs(zz, tgt, case["t"])
        assert logp.dtype == torch.float32
        _close("logp", logp, o_logp, TOL_VALUE)
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * (
            0.0 if case.get("ent_only") else 1.0
        )
        loss, o_loss = (logp.double() * g).sum(), (o_logp * g).sum()
        if case.get("ent_only"):
            loss = 0.0
        if case["ent"]:
            _close("entropy", ent, o_ent, TOL_VALUE)
            ge = torch.randn(shape, generator=gen, dtype=torch.float64)
            loss, o_loss = loss + (ent.double() * ge).sum(), o_loss + (o_ent * ge).sum()
        loss.backward()
        o_loss.backward()
        assert z.grad.dtype == dtype
        _close("dlogits", z.grad, zz.grad, grad_tol)
    elif op == "linear":
        n, h, v = case["n"], case["h"], case["v"]
        hid = torch.randn(n, h, generator=gen).to(dtype).requires_grad_(True)
        w = (torch.randn(v, h, generator=gen) * 0.5).to(dtype).requires_grad_(case["wgrad"])
        tgt = torch.randint(0, v, (n,), generator=gen)
        rows = None
        if case.get("rows"):  # some targets, some other ids, one repeated
            k = case["rows"]
            rows = torch.cat([tgt[:2], torch.randint(0, v, (k - 2,), generator=gen)])
            rows[-1] = rows[0]
        out = api.linear_token_logprobs(
            hid,
            w,
            tgt,
            temperature=case["t"],
            return_entropy=case["ent"],
            chunk_size=case["chunk"],
            weight_grad_rows=rows,
        )
        logp, ent = out if case["ent"] else (out, None)
        hh, ww = (
            hid.detach().double().requires_grad_(True),
            w.detach().double().requires_grad_(case["wgrad"]),
        )
        o_logp, o_ent = oracle_token_logprobs(hh @ ww.T, tgt, case["t"])
        _close("logp", logp, o_logp, TOL_VALUE)
        g = torch.randn(n, generator=gen, dtype=torch.float64) * (
            0.0 if case.get("ent_only") else 1.0
        )
        loss, o_loss = (logp.double() * g).sum(), (o_logp * g).sum()
        if case.get("ent_only"):
            loss = 0.0
        if case["ent"]:
            _close("entropy", ent, o_ent, TOL_VALUE)
            ge = torch.randn(n, generator=gen, dtype=torch.float64)
            loss, o_loss = loss + (ent.double() * ge).sum(), o_loss + (o_ent * ge).sum()
        loss.backward()
        o_loss.backward()
        _close("dhidden", hid.grad, hh.grad, grad_tol)
        if case["wgrad"] and rows is None:
            _close("dweight", w.grad, ww.grad, grad_tol)
        elif case[
            "wgrad"
        ]:  # the full gradient on the selected rows, exactly zero on every other row
            assert w.grad.dtype == dtype and w.grad.shape == w.shape
            _close("dweight[rows]", w.grad[rows], ww.grad[rows], grad_tol)
            others = torch.ones(v, dtype=torch.bool)
            others[rows] = False
            assert not w.grad[others].any(), "dweight: nonzero outside weight_grad_rows"
    elif op == "jsd":
        n, v = case["n"], case["v"]
        zs = (torch.randn(n, v, generator=gen) * 3).to(dtype).requires_grad_(True)
        zt = (torch.randn(n, v, generator=gen) * 3).to(dtype)
        jsd = api.generalized_jsd(zs, zt, beta=case["beta"], temperature=case["t"])
        ss = zs.detach().double().requires_grad_(True)
        o_jsd = oracle_gjsd(ss, zt, case["beta"], case["t"])
        _close("jsd", jsd, o_jsd, TOL_VALUE)
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        (jsd.double() * g).sum().backward()
        (o_jsd * g).sum().backward()
        _close("dstudent", zs.grad, ss.grad, grad_tol)
    elif op == "linear_jsd":
        n, v = case["n"], case["v"]
        hs = torch.randn(n, case["hs"], generator=gen).to(dtype).requires_grad_(True)
        ws = (
            (torch.randn(v, case["hs"], generator=gen) * 0.5)
            .to(dtype)
            .requires_grad_(case["wgrad"])
        )
        ht = torch.randn(n, case["ht"], generator=gen).to(dtype)
        wt = (torch.randn(v, case["ht"], generator=gen) * 0.5).to(dtype)
        jsd = api.linear_generalized_jsd(
            hs, ws, ht, wt, beta=case["beta"], temperature=case["t"], chunk_size=case["chunk"]
        )
        h2, w2 = (
            hs.detach().double().requires_grad_(True),
            ws.detach().double().requires_grad_(case["wgrad"]),
        )
        o_jsd = oracle_gjsd(h2 @ w2.T, ht.double() @ wt.double().T, case["beta"], case["t"])
        _close("jsd", jsd, o_jsd, TOL_VALUE)
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        (jsd.double() * g).sum().backward()
        (o_jsd * g).sum().backward()
        _close("dhidden", hs.grad, h2.grad, grad_tol)
        if case["wgrad"]:
            _close("dweight", ws.grad, w2.grad, grad_tol)
    else:
        raise ValueError(op)


# --------------------------------------------------------------------------------------------------
# the PyTorch reference (this process)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_reference_matches_oracle(case):
    from vocab_kernels import reference

    check_case(case, reference)


SLICED = [c for c in CASES if c["op"] in ("token", "jsd", "linear_jsd") and c.get("v") == 1000][:6]


@pytest.mark.parametrize("case", SLICED, ids=[c["id"] for c in SLICED])
def test_reference_row_slicing(case, monkeypatch):
    # The reference walks given logits in slices of ROW_CHUNK_ELEMS elements (2^24 by default, more
    # than these small cases ever reach): force 3-row slices with a ragged last slice.
    from vocab_kernels import reference

    monkeypatch.setattr(reference, "ROW_CHUNK_ELEMS", 3 * case["v"])
    check_case(case, reference)


def test_dispatch_uses_reference_for_cpu_without_interpreter():
    import vocab_kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for this whole run")
    assert vocab_kernels._backend(torch.zeros(1)).__name__ == "vocab_kernels.reference"


def test_import_is_cheap_and_shadows_nothing():
    # Importing our package must not import triton. And it must not shadow a PyPI package:
    # transformers (5.25+) imports the PyPI `kernels` package whenever a model module loads, with
    # the repo root on sys.path as it is for every script here (a package of ours called `kernels`
    # broke that).
    code = (
        "import sys, vocab_kernels\nassert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "from transformers import Qwen3ForCausalLM\nprint('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter-worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, (
        f"interpreter worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return json.loads(lines[-1])


def test_interpreter_dispatches_to_triton(interpreter_results):
    assert interpreter_results["__backend__"] == "vocab_kernels.triton_kernels"


def test_interpreter_warns_once_for_cuda_tensors(interpreter_results):
    # TRITON_INTERPRET=1 with CUDA tensors: the kernels run on the host, far slower; said once per
    # process
    warned = interpreter_results["__cuda_warnings__"]
    assert len(warned) == 1 and "interpreter" in warned[0], warned


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_interpreter_matches_oracle(case, interpreter_results):
    err = interpreter_results[case["id"]]
    assert err is None, err


def _interpreter_worker():
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    import vocab_kernels

    results = {"__backend__": vocab_kernels._backend(torch.zeros(1)).__name__}

    class _CudaLike:  # all _backend reads of a tensor
        is_cuda = True

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            vocab_kernels._backend(_CudaLike(), None)
    results["__cuda_warnings__"] = [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
    ]
    for case in CASES:
        try:
            check_case(case, vocab_kernels)  # the public API, which dispatches to Triton here
            results[case["id"]] = None
        except Exception as exc:  # reported per case by the parent test
            results[case["id"]] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


# --------------------------------------------------------------------------------------------------
# the compiler: every kernel variant compiles for an H100 (sm_90), no GPU needed. The interpreter
# accepts code the compiler rejects (a non-constexpr global, for one), so this runs here too.
#
# It compiles the specialisations that run at Qwen's vocabulary, not a hand-written signature:
# Triton specialises each launch on its arguments (triton/runtime/jit.py): an int is i32 when it
# fits in 32 bits (else i64), becomes a constant when it equals 1, and is marked divisible by 16
# (tt.divisibility) when it is; a pointer is marked when its address is 16-byte aligned. V = 151,936
# = 16 x 9,496, so the vocab size and every row stride there are i32 with the divisibility hint
# (vectorised loads), unlike a toy V. The worker records the launches the public functions make
# (kernels replaced by recorders, inputs at V = 151,936 on the host, the GEMM dtype as on CUDA),
# specialises each argument with Triton's own rule and compiles each distinct specialisation.


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--compile-worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if "SKIP:" in out.stdout:
        pytest.skip(out.stdout.split("SKIP:", 1)[1].strip())
    assert out.returncode == 0 and "compiled" in out.stdout, (
        f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    )


def _record_qwen_launches(tk):
    """(kernel, args, kwargs) of every launch the public functions of `tk` make at V = 151,936."""
    from vocab_kernels import chunked

    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    names = ("_logprob_fwd_kernel", "_logprob_bwd_kernel", "_jsd_fwd_kernel", "_jsd_bwd_kernel")
    saved = {n: getattr(tk, n) for n in names}
    mm_dtype = chunked._mm_dtype
    try:
        for n in names:
            setattr(tk, n, Recorder(saved[n]))
        # the fused-linear ops' logits buffer in the inputs' dtype, as on CUDA (fp32 on the host
        # otherwise)
        chunked._mm_dtype = lambda h, w: torch.promote_types(h.dtype, w.dtype)
        gen = torch.Generator().manual_seed(0)
        v, n, hid = (
            QWEN_V,
            8,
            16,
        )  # 2 chunks of 4 rows: the second chunk's per-row slices start off row 0
        for dt in (torch.bfloat16, torch.float32):

            def randn(*shape, grad=True):
                return torch.randn(*shape, generator=gen).to(dt).requires_grad_(grad)

            tgt = torch.randint(0, v, (n,), generator=gen)
            z = randn(n, v)
            lp, ent = tk.token_logprobs(z, tgt, 0.7, True)
            (lp.sum() + ent.sum()).backward()
            tk.token_logprobs(z, tgt, 1.0).sum().backward()
            tk.token_logprobs(z, tgt, 0.7, True)[1].sum().backward()
            h, w = randn(n, hid), randn(v, hid)
            lp, ent = tk.linear_token_logprobs(h, w, tgt, 0.7, True, chunk_size=4)
            (lp.sum() + ent.sum()).backward()
            tk.linear_token_logprobs(
                h, w, tgt, chunk_size=4, weight_grad_rows=tgt[:3]
            ).sum().backward()
            tk.linear_token_logprobs(h, w.detach(), tgt, chunk_size=4).sum().backward()
            zt, ht, wt = (
                randn(n, v, grad=False),
                randn(n, hid, grad=False),
                randn(v, hid, grad=False),
            )
            for beta, t in ((0.0, 1.0), (1.0, 0.9), (0.5, 1.0)):
                tk.generalized_jsd(z, zt, beta, t).sum().backward()
                tk.linear_generalized_jsd(h, w, ht, wt, beta, t, chunk_size=4).sum().backward()
    finally:
        for n_, fn in saved.items():
            setattr(tk, n_, fn)
        chunked._mm_dtype = mm_dtype
    return launches


def _compile_worker():
    sys.path.insert(0, str(ROOT))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import native_specialize_impl
    except ImportError as exc:
        print(f"SKIP: no Triton compiler (or not this Triton's specialisation API) here ({exc})")
        return
    from vocab_kernels import triton_kernels as tk

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    variants = {}
    for fn, args, kwargs in _record_qwen_launches(tk):
        bound = dict(
            zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k in fn.arg_names}
        )
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(fn.params):  # what JITFunction.run does for a launch (Triton 3.x)
            value = bound[param.name]
            if param.is_constexpr:
                ty, spec = "constexpr", ""
            else:
                ty, spec = native_specialize_impl(
                    backend,
                    value,
                    param.is_const,
                    not param.do_not_specialize,
                    not param.do_not_specialize_on_alignment,
                )
            signature[param.name] = ty
            if ty == "constexpr":
                constexprs[param.name], spec = value, ""
            if isinstance(spec, str):
                attrs[(i,)] = backend.parse_attr(spec)
        hinted = {name for i, name in enumerate(fn.arg_names) if attrs.get((i,))}
        assert signature["V"] == "i32" and "V" in hinted, (fn.__name__, signature, attrs)
        assert {a for a in fn.arg_names if a.endswith("stride")} <= hinted, (fn.__name__, hinted)
        key = (
            fn.__name__,
            tuple(signature.items()),
            repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())),
            repr(sorted(options.items())),
        )
        variants[key] = (fn, signature, constexprs, attrs, options)
    for fn, signature, constexprs, attrs, options in variants.values():
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            triton.compile(src, target=target, options=options)
        except Exception as exc:
            if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
                print(f"SKIP: {exc}")
                return
            raise
    print("compiled", len(variants), "kernel specialisations for sm_90 at V =", QWEN_V)


# --------------------------------------------------------------------------------------------------
# the benchmark script


def test_kernels_bench_runs_as_a_script_from_anywhere(tmp_path):
    # bench/kernels_bench.py puts the repository root on sys.path itself; each measurement is a
    # subprocess of it
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "kernels_bench.py"),
            "--only",
            "generalized_jsd",
            "--vocab",
            "64",
            "--jsd-rows",
            "8",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["spec"]["impl"] for r in rows] == ["naive", "ours"] and not any(
        "error" in r for r in rows
    )
    assert rows[1]["max_abs_err"] < 1e-2 and rows[1]["wrong"] == [] and "check_error" not in rows[1]
    assert "python bench/kernels_bench.py" in (out / "bench.md").read_text()


def test_kernels_bench_checks_each_side_and_looks_peaks_up_by_exact_name():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import kernels_bench as kb
    finally:
        sys.path.remove(str(ROOT / "bench"))
    spec = dict(
        op="linear_token_logprobs",
        impl="ours",
        v=64,
        n=6,
        h=8,
        dtype="float32",
        grad=True,
        wgrad=True,
        entropy=False,
        device="cpu",
        repeat=1,
    )
    x = kb._inputs(spec, torch.device("cpu"))
    got = kb._results(spec, x, kb._run(spec, x))
    assert sorted(got) == ["dhidden", "dweight", "out0"]
    ok = kb._check_against_naive(spec, x, {k: v.clone() for k, v in got.items()})
    assert ok["wrong"] == [] and ok["max_abs_err"] < 1e-4
    got["dweight"] = got["dweight"] * 1.1  # a side 10% off in one gradient
    assert kb._check_against_naive(spec, x, got)["wrong"] == ["dweight"]
    assert kb.peak_for("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert kb.peak_for("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert kb.peak_for("NVIDIA H100 PCIe", tflops=700, gbs=1900) == (700e12, 1.9e12)
    assert kb.peak_for("Some Future GPU") == (None, None)


# --------------------------------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without CUDA by tests/conftest.py)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.get("dtype") == "bfloat16"], ids=lambda c: c["id"]
)
def test_gpu_triton_matches_oracle_bf16(case):
    import vocab_kernels

    _check_on_cuda(case, vocab_kernels)


def _check_on_cuda(case, api):
    # Inputs go to the GPU and results come back (both differentiable copies), so check_case and the
    # oracle stay on the CPU while the public API dispatches to the compiled kernels.
    def move(x, dev):
        if torch.is_tensor(x):
            return x.to(dev)
        return tuple(move(y, dev) for y in x) if isinstance(x, tuple) else x

    class _Cuda:
        def __getattr__(self, name):
            fn = getattr(api, name)
            return lambda *args, **kwargs: move(
                fn(*[move(a, "cuda") for a in args], **kwargs), "cpu"
            )

    check_case(case, _Cuda())


@pytest.mark.gpu
def test_gpu_triton_matches_reference_large_bf16():
    # Qwen-sized vocab, 16k rows: N * V > 2^31 exercises the int64 row offsets.
    from vocab_kernels import reference, triton_kernels

    torch.manual_seed(0)
    n, v = 16_384, QWEN_V
    z = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
    tgt = torch.randint(0, v, (n,), device="cuda")
    got, got_h = triton_kernels.token_logprobs(z, tgt, 0.7, True)
    rows = torch.arange(n - 8, n, device="cuda")  # the last rows sit beyond the int32 range
    want, want_h = oracle_token_logprobs(z[rows].double(), tgt[rows], 0.7)
    _close("logp", got[rows], want, (1e-5, 1e-5))
    _close("entropy", got_h[rows], want_h, (1e-5, 1e-5))
    ref = reference.token_logprobs(z[:64], tgt[:64], 0.7)
    _close("logp vs reference", got[:64], ref, (1e-5, 1e-5))


# Qwen3 sizes: V = 151,936, H = 1,024 (Qwen3-0.6B) and 2,560 (Qwen3-4B), bf16. The compiled kernels
# against the PyTorch reference on the same CUDA tensors: both run the same chunk GEMMs
# (vocab_kernels/chunked.py), so any difference is the row ops'. Values are fp32 from the same bf16
# logits; gradients are bf16.
QWEN3_HIDDEN = (1024, 2560)
GPU_TOL = {"value": (1e-4, 1e-5), "grad": (2e-2, 1e-2)}


def _qwen_inputs(n, hidden, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(QWEN_V, hidden, device=device, generator=gen) * hidden**-0.5 * 4).to(
        torch.bfloat16
    )
    tgt = torch.randint(0, QWEN_V, (n,), device=device, generator=gen)
    tgt[1] = -100  # an ignored position
    g = torch.randn(n, device=device, generator=gen)
    ge = torch.randn(n, device=device, generator=gen)
    return h, w, tgt, g, ge


@pytest.mark.gpu
def test_gpu_logits_ops_match_reference_qwen_vocab():
    from vocab_kernels import reference, triton_kernels

    n = 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(n, QWEN_V, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    zt = (torch.randn(n, QWEN_V, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    tgt = torch.randint(0, QWEN_V, (n,), device="cuda", generator=gen)
    tgt[1] = -100
    g, ge = (
        torch.randn(n, device="cuda", generator=gen),
        torch.randn(n, device="cuda", generator=gen),
    )

    def token(api):
        x = z.clone().requires_grad_(True)
        lp, ent = api.token_logprobs(x, tgt, 0.7, True)
        (lp * g + ent * ge).sum().backward()
        return lp, ent, x.grad

    for name, a, b in zip(("logp", "entropy", "dlogits"), token(triton_kernels), token(reference)):
        _close(name, a, b, GPU_TOL["grad" if name.startswith("d") else "value"])
    for beta in (0.0, 0.5, 1.0):

        def jsd(api):
            x = z.clone().requires_grad_(True)
            j = api.generalized_jsd(x, zt, beta, 0.9)
            (j * g).sum().backward()
            return j, x.grad

        for name, a, b in zip(("jsd", "dstudent"), jsd(triton_kernels), jsd(reference)):
            _close(
                f"{name} (beta {beta})", a, b, GPU_TOL["grad" if name.startswith("d") else "value"]
            )


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", QWEN3_HIDDEN)
@pytest.mark.parametrize("mode", ("head trained", "head frozen", "rows <= H", "rows > H"))
def test_gpu_linear_token_logprobs_match_reference_qwen3(hidden, mode):
    # 1,280 rows: two full 512-row chunks (the CUDA default at this vocab) and a ragged one; entropy
    # too, so both backward paths run (kept from forward, recomputed).
    from vocab_kernels import reference, triton_kernels

    n = 1280
    h, w, tgt, g, ge = _qwen_inputs(n, hidden)
    rows = None
    if mode.startswith("rows"):
        k = 8 if mode == "rows <= H" else hidden + 8
        rows = torch.cat([tgt[:4].clamp(min=0), torch.randperm(QWEN_V, device="cuda")[: k - 4]])

    def run(api, weight_grad_rows=rows):
        x = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(mode != "head frozen")
        lp, ent = api.linear_token_logprobs(
            x, ww, tgt, 0.7, True, weight_grad_rows=weight_grad_rows
        )
        (lp * g + ent * ge).sum().backward()
        return lp, ent, x.grad, ww.grad

    got, want = run(triton_kernels), run(reference)
    for name, a, b in zip(("logp", "entropy", "dhidden"), got, want):
        _close(name, a, b, GPU_TOL["grad" if name.startswith("d") else "value"])
    if mode == "head frozen":
        assert got[3] is None and want[3] is None
    elif rows is None:
        _close("dweight", got[3], want[3], GPU_TOL["grad"])
    else:  # against the full gradient restricted to the rows; exactly zero elsewhere
        full = run(reference, None)[3]
        _close("dweight[rows] (triton)", got[3][rows], full[rows], GPU_TOL["grad"])
        _close("dweight[rows] (reference)", want[3][rows], full[rows], GPU_TOL["grad"])
        others = torch.ones(QWEN_V, dtype=torch.bool, device="cuda")
        others[rows] = False
        assert not got[3][others].any() and not want[3][others].any()


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", QWEN3_HIDDEN)
@pytest.mark.parametrize("head_trained", (True, False))
def test_gpu_linear_generalized_jsd_match_reference_qwen3(hidden, head_trained):
    from vocab_kernels import reference, triton_kernels

    n = 768
    hs, ws, _, g, _ = _qwen_inputs(n, hidden, seed=1)
    ht, wt, _, _, _ = _qwen_inputs(n, hidden, seed=2)

    def run(api):
        x = hs.clone().requires_grad_(True)
        ww = ws.clone().requires_grad_(head_trained)
        j = api.linear_generalized_jsd(x, ww, ht, wt, 0.5, 0.9)
        (j * g).sum().backward()
        return j, x.grad, ww.grad

    got, want = run(triton_kernels), run(reference)
    _close("jsd", got[0], want[0], GPU_TOL["value"])
    _close("dhidden", got[1], want[1], GPU_TOL["grad"])
    if head_trained:
        _close("dweight", got[2], want[2], GPU_TOL["grad"])


@pytest.mark.gpu
def test_gpu_weight_grad_accumulates_in_fp32():
    # bf16 chunks into the fp32 weight gradient: addmm with out_dtype fp32 (no bf16 [V, H]
    # temporary, no rounding of each chunk's sum to bf16). 16 chunks: bf16 rounding per chunk would
    # be off by ~1e-3 relative.
    from vocab_kernels import chunked

    dev = torch.device("cuda", torch.cuda.current_device())
    assert chunked._fp32_out_addmm_works(dev), (
        f"torch {torch.__version__}: addmm out_dtype=fp32 unavailable"
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.zeros(QWEN_V // 8, 256, device="cuda")
    want = torch.zeros(acc.shape, dtype=torch.float64, device="cuda")
    for _ in range(16):
        c = torch.randn(512, acc.shape[0], device="cuda", generator=gen).to(torch.bfloat16)
        h = torch.randn(512, acc.shape[1], device="cuda", generator=gen).to(torch.bfloat16)
        chunked._accumulate_weight_grad(acc, c, h)
        want += c.double().T @ h.double()
    assert acc.dtype == torch.float32
    rel = ((acc.double() - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, rel


@pytest.mark.gpu
def test_gpu_kernels_run_on_a_device_that_is_not_current():
    # Triton launches on the current device: the kernels make the tensors' device current for each
    # launch.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import distributed
    from vocab_kernels import reference, triton_kernels

    prev = torch.cuda.current_device()
    try:
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 1)
        h, w, tgt, g, ge = _qwen_inputs(640, 1024, device=dev)

        def run(api):
            x, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            lp, ent = api.linear_token_logprobs(x, ww, tgt, 0.7, True)
            z = (x.detach()[:64] @ ww.detach().T).requires_grad_(True)
            lp2 = api.token_logprobs(z, tgt[:64], 1.0)
            j = api.generalized_jsd(z, z.detach().roll(1, 0), 0.5, 1.0)
            ((lp * g + ent * ge).sum() + lp2.sum() + j.sum()).backward()
            return lp, ent, lp2, j, x.grad, ww.grad, z.grad

        got = run(triton_kernels)
        assert torch.cuda.current_device() == 0  # restored after each launch
        want = run(reference)
        names = ("logp", "entropy", "logp (logits)", "jsd", "dhidden", "dweight", "dlogits")
        for name, a, b in zip(names, got, want):
            assert a.device == dev
            _close(name, a, b, GPU_TOL["grad" if name.startswith("d") else "value"])
        assert distributed.pick_device("cuda:1") == dev and torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(prev)


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
if __name__ == "__main__" and "--compile-worker" in sys.argv:
    _compile_worker()
