"""kernels/ against unchunked float64 oracles written here, independently of the kernels.

Two backends, one set of cases:
- the PyTorch reference (`kernels.reference`), in this process;
- the Triton kernels under the CPU interpreter, in ONE subprocess with TRITON_INTERPRET=1 set before
  anything imports triton (`triton.jit` reads the variable when a kernel is defined, so setting it here
  would be too late, and it must not leak into other test modules). The subprocess runs this file as a
  script and reports one result per case as JSON.

Tolerances (|got - want| <= rtol * |want| + atol * max|want|, elementwise):
- values (logp, entropy, jsd), any input dtype: rtol 2e-5, atol 2e-5. The oracle sees the same
  bf16-rounded inputs in float64 and every kernel accumulates in fp32, so bf16 inputs are as exact here.
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


# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# cases


def _cases():
    cases = []
    for v in (37, 1000, 5000):
        for dtype in ("float32", "bfloat16"):
            for t in (1.0, 0.7):
                for ent in (False, True):
                    cases.append(dict(op="token", v=v, shape=(2, 3), dtype=dtype, t=t, ent=ent))
    cases.append(dict(op="token", v=1000, shape=(7,), dtype="float32", t=1.0, ent=True, special=True))
    cases.append(dict(op="token", v=1000, shape=(5,), dtype="float32", t=0.7, ent=True, ent_only=True))
    for dtype in ("float32", "bfloat16"):
        cases.append(dict(op="token", v=QWEN_V, shape=(2,), dtype=dtype, t=0.7, ent=True))
    for v, dtype, t, ent, wgrad in [(37, "float32", 1.0, True, True), (1000, "float32", 0.7, False, True),
                                    (5000, "float32", 0.7, True, False), (1000, "bfloat16", 1.0, True, True),
                                    (5000, "bfloat16", 0.7, False, False), (37, "float32", 0.7, False, False),
                                    (QWEN_V, "float32", 0.7, True, True)]:
        n = 3 if v == QWEN_V else 10
        cases.append(dict(op="linear", v=v, n=n, h=8, chunk=2 if v == QWEN_V else 4, dtype=dtype, t=t, ent=ent,
                          wgrad=wgrad))
    for wgrad in (True, False):  # only the entropy reaches the loss: logp's incoming gradient is None
        cases.append(dict(op="linear", v=1000, n=7, h=8, chunk=3, dtype="float32", t=0.7, ent=True, wgrad=wgrad,
                          ent_only=True))
    for v in (37, 1000, 5000):
        for beta in (0.0, 0.5, 1.0, 0.1):
            for dtype, t in (("float32", 1.0), ("bfloat16", 0.7)):
                cases.append(dict(op="jsd", v=v, n=5, beta=beta, dtype=dtype, t=t))
    cases.append(dict(op="jsd", v=QWEN_V, n=2, beta=0.5, dtype="bfloat16", t=0.9))
    for v, beta, dtype, wgrad in [(1000, 0.5, "float32", True), (5000, 0.0, "float32", False),
                                  (37, 1.0, "bfloat16", True), (1000, 0.3, "bfloat16", False)]:
        cases.append(dict(op="linear_jsd", v=v, n=9, hs=8, ht=12, chunk=4, beta=beta, dtype=dtype, t=0.8,
                          wgrad=wgrad))
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
    assert not bad.any(), (f"{name}: max error {err.max().item():.3g} (bound {bound[bad].min().item():.3g} "
                           f"at a failing element, scale {scale:.3g})")


def check_case(case, api):
    """Run one case through `api` (a module with the public functions) and compare with the oracle."""
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
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * (0.0 if case.get("ent_only") else 1.0)
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
        out = api.linear_token_logprobs(hid, w, tgt, temperature=case["t"], return_entropy=case["ent"],
                                        chunk_size=case["chunk"])
        logp, ent = out if case["ent"] else (out, None)
        hh, ww = hid.detach().double().requires_grad_(True), w.detach().double().requires_grad_(case["wgrad"])
        o_logp, o_ent = oracle_token_logprobs(hh @ ww.T, tgt, case["t"])
        _close("logp", logp, o_logp, TOL_VALUE)
        g = torch.randn(n, generator=gen, dtype=torch.float64) * (0.0 if case.get("ent_only") else 1.0)
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
        if case["wgrad"]:
            _close("dweight", w.grad, ww.grad, grad_tol)
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
        ws = (torch.randn(v, case["hs"], generator=gen) * 0.5).to(dtype).requires_grad_(case["wgrad"])
        ht = torch.randn(n, case["ht"], generator=gen).to(dtype)
        wt = (torch.randn(v, case["ht"], generator=gen) * 0.5).to(dtype)
        jsd = api.linear_generalized_jsd(hs, ws, ht, wt, beta=case["beta"], temperature=case["t"],
                                         chunk_size=case["chunk"])
        h2, w2 = hs.detach().double().requires_grad_(True), ws.detach().double().requires_grad_(case["wgrad"])
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


# ----------------------------------------------------------------------------------------------------
# the PyTorch reference (this process)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_reference_matches_oracle(case):
    from kernels import reference

    check_case(case, reference)


SLICED = [c for c in CASES if c["op"] in ("token", "jsd", "linear_jsd") and c.get("v") == 1000][:6]


@pytest.mark.parametrize("case", SLICED, ids=[c["id"] for c in SLICED])
def test_reference_row_slicing(case, monkeypatch):
    # The reference walks given logits in slices of ROW_CHUNK_ELEMS elements (2^24 by default, more than
    # these small cases ever reach): force 3-row slices with a ragged last slice.
    from kernels import reference

    monkeypatch.setattr(reference, "ROW_CHUNK_ELEMS", 3 * case["v"])
    check_case(case, reference)


def test_dispatch_uses_reference_for_cpu_without_interpreter():
    import kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for this whole run")
    assert kernels._backend(torch.zeros(1)).__name__ == "kernels.reference"


def test_import_is_cheap_and_shadows_nothing_it_should_not():
    # bitsandbytes probes `from kernels import get_kernel` in a try/except: it must fail cleanly, and
    # importing our package must not import triton.
    # transformers probes the PyPI package too (is_kernels_available reads distribution metadata).
    code = ("import sys, kernels\nassert 'triton' not in sys.modules, 'triton imported eagerly'\n"
            "from transformers.utils import is_kernels_available\nassert not is_kernels_available()\n"
            "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_errors_name_the_problem():
    from kernels import reference

    with pytest.raises(ValueError, match="targets shape"):
        reference.token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        reference.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="same H"):
        reference.linear_token_logprobs(torch.zeros(2, 4), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="beta"):
        reference.generalized_jsd(torch.zeros(2, 5), torch.zeros(2, 5), beta=1.5)


def test_linear_matches_unfused_on_toy_sized_model():
    # What common.sequence_logprobs does, checked end to end against log_softmax(h @ W.T).gather.
    from kernels import reference

    torch.manual_seed(0)
    h, w = torch.randn(2, 7, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    tgt = torch.randint(0, 300, (2, 7))
    got = reference.linear_token_logprobs(h.reshape(-1, 16), w, tgt.reshape(-1), chunk_size=5).view(2, 7)
    want = torch.log_softmax(h @ w.T, -1).gather(-1, tgt[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    oh, ow = torch.autograd.grad(want.sum(), (h, w))
    torch.testing.assert_close(gh, oh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, ow, rtol=1e-4, atol=1e-5)


def test_linear_gradient_work_only_when_needed(monkeypatch):
    # A frozen head computes dlogp/dh during forward (one ce_grad per chunk) and not again in backward;
    # under no_grad nothing of the sort runs, even for an input that requires grad.
    from kernels import reference

    calls = []
    real = reference.ce_grad
    monkeypatch.setattr(reference, "ce_grad", lambda *a: (calls.append(1), real(*a))[1])
    h, w = torch.randn(10, 8, requires_grad=True), torch.randn(50, 8)
    tgt = torch.randint(0, 50, (10,))
    with torch.no_grad():
        plain = reference.linear_token_logprobs(h, w, tgt, chunk_size=4)
    assert plain.grad_fn is None and calls == []
    out = reference.linear_token_logprobs(h, w, tgt, chunk_size=4)
    assert len(calls) == 3  # 3 chunks, in forward
    torch.testing.assert_close(out, plain)
    out.sum().backward()
    assert len(calls) == 3 and h.grad is not None


# ----------------------------------------------------------------------------------------------------
# the Triton kernels under the CPU interpreter (one subprocess for all cases)


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter-worker"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"interpreter worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_interpreter_dispatches_to_triton(interpreter_results):
    assert interpreter_results["__backend__"] == "kernels.triton_kernels"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_interpreter_matches_oracle(case, interpreter_results):
    err = interpreter_results[case["id"]]
    assert err is None, err


def _interpreter_worker():
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    import kernels

    results = {"__backend__": kernels._backend(torch.zeros(1)).__name__}
    for case in CASES:
        try:
            check_case(case, kernels)  # the public API, which dispatches to Triton here
            results[case["id"]] = None
        except Exception as exc:  # reported per case by the parent test
            results[case["id"]] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


# ----------------------------------------------------------------------------------------------------
# the compiler: every kernel variant compiles for an H100 (sm_90), no GPU needed. The interpreter
# accepts code the compiler rejects (a non-constexpr global, for one), so this runs here too.


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--compile-worker"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if "SKIP:" in out.stdout:
        pytest.skip(out.stdout.split("SKIP:", 1)[1].strip())
    assert out.returncode == 0 and "compiled" in out.stdout, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"


def _compile_worker():
    sys.path.insert(0, str(ROOT))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"SKIP: no Triton compiler here ({exc})")
        return
    from kernels import triton_kernels as tk

    # pointers in the input dtype; tgt_ptr is int64; every other pointer is fp32; strides int64
    input_ptrs = {tk._logprob_fwd_kernel: {"z_ptr"}, tk._logprob_bwd_kernel: {"z_ptr", "out_ptr"},
                  tk._jsd_fwd_kernel: {"zs_ptr", "zt_ptr"}, tk._jsd_bwd_kernel: {"zs_ptr", "zt_ptr", "out_ptr"}}

    def types(fn, consts, dt):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (dt if name in input_ptrs[fn] else "i64" if name == "tgt_ptr" else "fp32")
            else:
                sig[name] = "i64" if name.endswith("stride") else "i32"
        return sig

    jsd = [dict(INV_T=1.0, MODE=0, BETA=0.0, LOG_BETA=0.0, LOG_1MBETA=0.0),
           dict(INV_T=1 / 0.9, MODE=1, BETA=1.0, LOG_BETA=0.0, LOG_1MBETA=0.0),
           dict(INV_T=1.0, MODE=2, BETA=0.5, LOG_BETA=math.log(0.5), LOG_1MBETA=math.log(0.5))]
    variants = (
        [(tk._logprob_fwd_kernel, dict(INV_T=1 / 0.7, WANT_ENT=e)) for e in (False, True)]
        + [(tk._logprob_bwd_kernel, dict(INV_T=1.0, HAS_G=a, HAS_GE=b)) for a, b in ((1, 0), (1, 1), (0, 1))]
        + [(k, c) for c in jsd for k in (tk._jsd_fwd_kernel, tk._jsd_bwd_kernel)])
    for dt in ("bf16", "fp32"):
        for fn, consts in variants:
            consts = dict(consts, BLOCK=4096)
            consts = {k: bool(v) if k.startswith(("HAS_", "WANT_")) else v for k, v in consts.items()}
            src = ASTSource(fn=fn, signature=types(fn, consts, dt), constexprs=consts)
            try:
                triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            except Exception as exc:
                if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
                    print(f"SKIP: {exc}")
                    return
                raise
    print("compiled", len(variants) * 2, "kernel variants for sm_90")


# ----------------------------------------------------------------------------------------------------
# the benchmark script


def test_kernels_bench_runs_as_a_script_from_anywhere(tmp_path):
    # bench/kernels_bench.py puts the repository root on sys.path itself; each measurement is a subprocess of it
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_bench.py"), "--only", "generalized_jsd",
                           "--vocab", "64", "--jsd-rows", "8", "--device", "cpu", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["spec"]["impl"] for r in rows] == ["naive", "ours"] and not any("error" in r for r in rows)
    assert "python bench/kernels_bench.py" in (out / "bench.md").read_text()


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without CUDA by tests/conftest.py)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c.get("dtype") == "bfloat16"], ids=lambda c: c["id"])
def test_gpu_triton_matches_oracle_bf16(case):
    import kernels

    _check_on_cuda(case, kernels)


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
            return lambda *args, **kwargs: move(fn(*[move(a, "cuda") for a in args], **kwargs), "cpu")

    check_case(case, _Cuda())


@pytest.mark.gpu
def test_gpu_triton_matches_reference_large_bf16():
    # Qwen-sized vocab, 16k rows: N * V > 2^31 exercises the int64 row offsets.
    from kernels import reference, triton_kernels

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


@pytest.mark.gpu
def test_gpu_linear_bf16_matches_reference():
    from kernels import reference, triton_kernels

    torch.manual_seed(0)
    n, h, v = 512, 1024, QWEN_V
    hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    tgt = torch.randint(0, v, (n,), device="cuda")
    outs = []
    for api in (triton_kernels, reference):
        hid.grad = w.grad = None
        lp, ent = api.linear_token_logprobs(hid, w, tgt, 0.7, True, chunk_size=128)
        (lp.sum() + ent.sum()).backward()
        outs.append((lp, ent, hid.grad.clone(), w.grad.clone()))
    for name, a, b in zip(("logp", "entropy", "dhidden", "dweight"), *outs):
        _close(name, a, b, (2e-2, 1e-2))


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
if __name__ == "__main__" and "--compile-worker" in sys.argv:
    _compile_worker()
