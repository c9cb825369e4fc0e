"""karcher_merge.py: the Karcher mean (dense as MergeKit, and on the Gram matrix), adapters in and
out, full models, errors, and the toy table (the merge beats the base on every domain)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file

import dataio
import errors
import karcher_merge as km
import likelihood
import loading
import lora
import stats
import toy


def random_adapter(
    path,
    seed: int,
    r: int = 4,
    alpha: float = 8.0,
    targets=("q_proj", "v_proj", "down_proj"),
    scale: float = 0.05,
) -> str:
    """A LoRA adapter of the toy base with random A and B, saved in PEFT's format."""
    torch.manual_seed(seed)
    model = lora.add_lora(toy.load_model(), r, alpha, targets=list(targets))
    for _, m in lora.lora_layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=scale)
    lora.save_adapter(model, str(path), "toy")
    return str(path)


def adapter_deltas(path) -> dict[str, torch.Tensor]:
    cfg, factors = lora.read_adapter(str(path))
    s = lora.adapter_scaling(cfg)
    return {name: s * b.double() @ a.double() for name, (a, b) in factors.items()}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---- the algorithm -------------------------------------------------------------------------------


def reference_karcher(tensors, weights, max_iter=10, tol=1e-5):
    """The textbook loop, written independently in float64 torch, for the dense function."""
    u = [t.double().flatten() / t.double().norm() for t in tensors]
    m = sum(w * x for w, x in zip(weights, u))
    m = m / m.norm()
    for _ in range(max_iter):
        T = torch.zeros_like(m)
        for w, x in zip(weights, u):
            th = torch.arccos(torch.clamp(m @ x, -1, 1))
            if th >= tol:
                T += w * th / torch.sin(th) * (x - torch.cos(th) * m)
        if T.norm() < tol:
            break
        m = torch.cos(T.norm()) * m + torch.sin(T.norm()) * T / T.norm()
        m = m / m.norm()
    return (sum(w * t.double().norm() for w, t in zip(weights, tensors)) * m).view_as(tensors[0])


@pytest.mark.parametrize("weights", [[1 / 3] * 3, [0.5, 0.3, 0.2]])
def test_dense_and_gram_iterations_agree(weights):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=g, dtype=torch.float64)
    ts = [base + 0.6 * torch.randn(16, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    dense, st = km.karcher_dense(ts, weights)
    assert rel(dense, reference_karcher(ts, weights)) < 1e-12
    flat = torch.stack([t.flatten() for t in ts])
    w, st_g = km.karcher_gram(flat @ flat.T, weights)
    assert rel(sum(wi * t for wi, t in zip(w.tolist(), ts)), dense) < 1e-10
    assert st["iterations"] == st_g["iterations"] >= 2 and st["tangent0"] == pytest.approx(
        st_g["tangent0"], rel=1e-8
    )
    # the mean is not the linear average (the inputs are far apart), and its norm is the weighted
    # mean norm
    lin = sum(wi * t for wi, t in zip(weights, ts))
    assert rel(dense, lin) > 1e-3
    assert float(dense.norm()) == pytest.approx(
        sum(wi * float(t.norm()) for wi, t in zip(weights, ts)), rel=1e-12
    )


def test_copies_and_one_input_come_back():
    t = torch.randn(7, 5, dtype=torch.float64)
    for n in (1, 3):
        dense, _ = km.karcher_dense([t] * n, [1 / n] * n)
        assert torch.allclose(dense, t, rtol=0, atol=1e-14)
        flat = t.flatten()[None].repeat(n, 1)
        w, _ = km.karcher_gram(flat @ flat.T, [1 / n] * n)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)


def test_module_inner_products_match_dense():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 10, generator=g, dtype=torch.float64)
    deltas = [
        (
            torch.randn(3, 10, generator=g, dtype=torch.float64),
            torch.randn(12, 3, generator=g, dtype=torch.float64),
        ),
        None,
        (
            torch.randn(2, 10, generator=g, dtype=torch.float64),
            torch.randn(12, 2, generator=g, dtype=torch.float64),
        ),
    ]
    full = torch.stack([(w0 + (d[1] @ d[0] if d else 0)).flatten() for d in deltas])
    K, Q = km.module_inner(w0, deltas)
    assert torch.allclose(K, full @ full.T, rtol=1e-12)
    dd = torch.stack(
        [(d[1] @ d[0]).flatten() if d else torch.zeros(120, dtype=torch.float64) for d in deltas]
    )
    assert torch.allclose(Q, dd @ dd.T, rtol=1e-12, atol=1e-12)


def test_low_rank_svd_through_the_factors():
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(6, 20, generator=g, dtype=torch.float64),
        torch.randn(15, 6, generator=g, dtype=torch.float64),
    )
    ar, br, err = lora.low_rank(a, b, 6)
    assert err < 1e-12 and rel(br @ ar, b @ a) < 1e-12
    ar, br, err = lora.low_rank(a, b, 2)
    ad, bd, err_d = lora.svd_factors(b @ a, 2)
    assert err == pytest.approx(err_d, rel=1e-10) and rel(br @ ar, bd @ ad) < 1e-10
    assert err == pytest.approx(rel(br @ ar, b @ a), rel=1e-10)


# ---- adapters onto a base ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tmp / f"a{i}", seed=i) for i in range(3)]


def merge(adapter_paths, method="karcher", space="factor", weights=None):
    base = loading.Weights("toy")
    ads = lora.read_adapters(adapter_paths, base)
    w = km.normalised(weights or [], len(ads))
    results, log = km.merge_adapters(base, ads, w, method, space, 10, 1e-5)
    deltas = {}
    for row in log:
        name = row["module"]
        w0 = base.get(name + ".weight").double()
        deltas[name] = km.merged_delta(w0, [ad.get(name) for ad in ads], results[name])
    return base, ads, results, log, deltas


@pytest.mark.parametrize("n", [1, 3])
def test_one_adapter_or_copies_give_it_back(adapters, tmp_path, n):
    base, ads, results, log, deltas = merge([adapters[0]] * n)
    want = adapter_deltas(adapters[0])
    assert deltas.keys() == want.keys()
    assert max(rel(deltas[k], want[k]) for k in want) < 1e-9
    assert all(abs(r["c0"] - 1) < 1e-12 for r in log)
    factors = km.adapter_factors(base, ads, results, log, rank=0)
    lora.write_adapter(str(tmp_path), factors, base_model_name_or_path="toy")
    got = adapter_deltas(tmp_path)
    assert max(rel(got[k], want[k]) for k in want) < 1e-6  # fp32 factors on disk


def test_dense_and_factor_space_agree_on_adapters(adapters):
    *_, log_f, d_f = merge(adapters, space="factor", weights=[0.5, 0.25, 0.25])
    *_, log_d, d_d = merge(adapters, space="dense", weights=[0.5, 0.25, 0.25])
    assert max(rel(d_d[k], d_f[k]) for k in d_f) < 1e-6  # the dense update is kept in fp32
    for rf, rd in zip(log_f, log_d):
        assert rf["iterations"] == rd["iterations"] and rf["dist_linear"] == pytest.approx(
            rd["dist_linear"], rel=1e-6
        )
    # the Karcher mean is a little off the linear one, and its base scale c0 a little above 1
    assert all(0 < r["dist_linear"] < 0.5 and r["c0"] > 1 for r in log_f)


def test_linear_in_factor_space_is_the_weighted_update(adapters):
    *_, log, d = merge(adapters, method="linear", weights=[0.5, 0.3, 0.2])
    ds = [adapter_deltas(p) for p in adapters]
    for k in d:
        assert rel(d[k], 0.5 * ds[0][k] + 0.3 * ds[1][k] + 0.2 * ds[2][k]) < 1e-12
    assert all(r["c0"] == pytest.approx(1.0, abs=1e-15) for r in log)


def test_adapters_on_different_modules_and_ranks(adapters, tmp_path):
    other = random_adapter(tmp_path / "other", seed=7, r=2, targets=("q_proj", "o_proj"))
    *_, d_f = merge([adapters[0], other])
    *_, d_d = merge([adapters[0], other], space="dense")
    assert d_f.keys() == adapter_deltas(adapters[0]).keys() | adapter_deltas(other).keys()
    assert max(rel(d_d[k], d_f[k]) for k in d_f) < 1e-6  # the dense update is kept in fp32


@pytest.mark.slow
def test_cli_adapter_out_is_exact_and_peft_loads_it(adapters, tmp_path):
    from peft import PeftModel

    run_script("karcher_merge.py", "--adapters", *adapters, "--no-eval", "--out", tmp_path / "ad")
    run_script(
        "karcher_merge.py",
        "--adapters",
        *adapters,
        "--no-eval",
        "--output",
        "model",
        "--out",
        tmp_path / "m",
    )
    log = {r["module"]: r for r in dataio.read_jsonl(tmp_path / "ad" / "merge_log.jsonl")}
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (
        cfg["r"] == 12 and cfg["lora_alpha"] == 12
    )  # three rank-4 adapters, concatenated; scale 1
    got, full, base = (
        adapter_deltas(tmp_path / "ad"),
        load_file(tmp_path / "m" / "model" / "model.safetensors"),
        loading.Weights("toy"),
    )
    for name, delta in got.items():
        w0 = base.get(name + ".weight").double()
        # the full model is the adapter's update plus (c0 - 1) W0, the part no adapter can carry
        want = full[name + ".weight"].double() - w0 - (log[name]["c0"] - 1) * w0
        assert rel(delta, want) < 1e-5
        assert log[name]["unrepresented"] == pytest.approx(
            abs(log[name]["c0"] - 1) * float(w0.norm()) / float(delta.norm()), rel=1e-4
        )
    untouched = [k for k in base.keys() if k.removesuffix(".weight") not in got]
    assert untouched and all(torch.equal(full[k], base.get(k)) for k in untouched)
    # PEFT reads the adapter: its merged model equals ours
    peft_model = PeftModel.from_pretrained(
        toy.load_model(), str(tmp_path / "ad")
    ).merge_and_unload()
    ours = lora.merge(lora.load_adapter(toy.load_model(), str(tmp_path / "ad")))
    x = torch.randint(5, 100, (2, 20))
    assert torch.allclose(peft_model(x).logits, ours(x).logits, atol=1e-5)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "model")(x).logits.isfinite().all()


def test_cli_rank_truncation_reports_its_error(adapters, tmp_path):
    run_script(
        "karcher_merge.py", "--adapters", *adapters, "--no-eval", "--rank", "3", "--out", tmp_path
    )
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    rows = dataio.read_jsonl(tmp_path / "merge_log.jsonl")
    assert cfg["r"] == 3 and all(0 < r["svd_error"] < 1 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["modules"]["svd_error_max"] == pytest.approx(max(r["svd_error"] for r in rows))


def test_peft_made_adapter_is_read(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(
        toy.load_model(),
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], init_lora_weights=False
        ),
    )
    model.save_pretrained(tmp_path / "peft")
    merged = model.merge_and_unload().state_dict()
    *_, deltas = merge([str(tmp_path / "peft")] * 2)
    base = loading.Weights("toy")
    for name, d in deltas.items():
        assert (
            rel(base.get(name + ".weight").double() + d, merged[name + ".weight"].double()) < 1e-6
        )


def test_full_models_copies_come_back(tmp_path):
    model = lora.merge(lora.load_adapter(toy.load_model(), random_adapter(tmp_path / "a", seed=5)))
    model.save_pretrained(tmp_path / "m")
    toy.load_tokenizer().save_pretrained(tmp_path / "m")
    run_script(
        "karcher_merge.py", "--models", tmp_path / "m", tmp_path / "m", "--out", tmp_path / "out"
    )
    got, want = (
        load_file(tmp_path / "out" / "model" / "model.safetensors"),
        load_file(tmp_path / "m" / "model.safetensors"),
    )
    assert (
        got.keys() == want.keys()
        and max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6
    )
    assert (tmp_path / "out" / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_errors_name_the_flag(adapters, tmp_path):
    def fails(*argv):
        import subprocess
        import sys

        p = subprocess.run(
            [sys.executable, "karcher_merge.py", *map(str, argv), "--out", tmp_path / "e"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 2, p.stderr[-2000:]
        return p.stderr.strip().splitlines()[-1]

    assert "--weights" in fails("--adapters", *adapters, "--weights", "1", "2", "--no-eval")
    assert "--output adapter" in fails("--models", "toy", "toy", "--output", "adapter")
    assert "--adapters" in fails("--adapters", tmp_path / "nowhere", "--no-eval")
    bad = Path(shutil.copytree(adapters[0], tmp_path / "bad"))
    sd = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = torch.zeros(sd[key].shape[0], 7)
    from safetensors.torch import save_file

    save_file(sd, bad / "adapter_model.safetensors")
    assert "shape" in fails("--adapters", bad, "--no-eval")


# ---- the toy run ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_toy_merge_beats_the_base_on_every_domain(tmp_path):
    """The shipped domain adapters, merged: held-out NLL below the base's in every domain (a short
    evaluation)."""
    run_script(
        "karcher_merge.py",
        "--eval-size",
        "30",
        "--prompts",
        "2",
        "--samples",
        "2",
        "--max-new-tokens",
        "32",
        "--out",
        tmp_path,
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    by = {r["arm"]: r for r in s["eval"]}
    assert set(by) == {"base", "story", "news", "code", "karcher", "linear", "karcher adapter"}
    for d in toy.DOMAINS:
        assert by["karcher"][f"{d}/nll"] < 0.985 * by["base"][f"{d}/nll"], d
        # each specialist is better at its domain
        assert by[d][f"{d}/nll"] < by["base"][f"{d}/nll"] - 0.02, d
        # the samples have words, and a share of them unique
        assert 0.0 < by["karcher"][f"{d}/distinct1"] <= 1.0, d
    assert all(s["karcher_beats_base_nll"].values())
    assert dataio.read_jsonl(tmp_path / "samples.jsonl")


@pytest.mark.slow
def test_equals_mergekit_karcher_on_dense_toy_models(tmp_path):
    """MergeKit as an oracle (installed by requirements-dev.txt): bench/karcher_vs_mergekit.py
    merges the toy base with each domain adapter baked in, with MergeKit and with ours (dense, and
    from the adapters in factor space)."""
    pytest.importorskip("mergekit")
    run_script("bench/karcher_vs_mergekit.py", "--out", tmp_path)
    r = json.loads((tmp_path / "karcher_vs_mergekit.json").read_text())
    for side in ("dense_vs_mergekit", "factor_vs_mergekit"):
        assert r[side]["tensors"] >= 29 and r[side]["max_rel"] <= 1e-5, (side, r[side])


def test_init_adapter_is_part_of_the_base_and_of_the_written_lineage(adapters, tmp_path):
    plain, init = loading.Weights("toy"), loading.Weights("toy", lora.weight_updates(adapters[0]))
    d0 = adapter_deltas(adapters[0])
    for key in plain.keys():
        want = plain.get(key).double() + d0.get(key.removesuffix(".weight"), 0)
        assert torch.allclose(init.get(key).double(), want, atol=1e-6), key
    run_script(
        "karcher_merge.py",
        "--init-adapter",
        adapters[0],
        "--adapters",
        *adapters[1:],
        "--no-eval",
        "--out",
        tmp_path / "ad",
    )
    assert lora.lineage(str(tmp_path / "ad")) == [adapters[0], str(tmp_path / "ad")]
    with pytest.raises(errors.ConfigError, match="--init-adapter"):
        km.main(km.Args(models=["toy", "toy"], init_adapter=adapters[0], out=str(tmp_path / "m")))


def test_one_adapter_on_an_init_adapter_writes_the_lineage_as_one_model(adapters, tmp_path):
    """What the README offers for serving a lineage: the Karcher mean of one input is that input."""
    run_script(
        "karcher_merge.py",
        "--init-adapter",
        adapters[0],
        "--adapters",
        adapters[1],
        "--output",
        "model",
        "--no-eval",
        "--out",
        tmp_path / "m",
    )
    want = toy.load_model()
    lora.merge_adapters(want, f"{adapters[0]}+{adapters[1]}")
    got, sd = load_file(tmp_path / "m" / "model" / "model.safetensors"), want.state_dict()
    assert max(float((sd[k] - got[k]).abs().max()) for k in got if k in sd) < 1e-6


# ---- the summary and the evaluation's table ------------------------------------------------------


def test_log_columns_summed_up_as_means_worst_cases_and_the_least_c0():
    log = [
        {"module": "a", "iterations": 2, "c0": 1.5, "svd_error": 0.25, "seconds": 9.0},
        {"module": "b", "iterations": 4, "c0": 0.5},
    ]
    got = stats.column_summary(log, km.LOG_COLUMNS, minima=("c0",))
    assert got == {
        "iterations_mean": 3.0,
        "iterations_max": 4,
        "c0_mean": 1.0,
        "c0_max": 1.5,
        "svd_error_mean": 0.25,  # over the rows that have it
        "svd_error_max": 0.25,
        "c0_min": 0.5,
    }
    assert list(got)[-1] == "c0_min"  # the order summary.json shows
    assert stats.column_summary([{"module": "a"}], km.LOG_COLUMNS, minima=("c0",)) == {}


def test_prompt_head_cuts_the_first_third_after_a_space():
    assert likelihood.prompt_head("aaaa bbbb cccc dddd eeee ffff") == "aaaa "
    assert likelihood.prompt_head("abcdefghi") == "abc"  # no space: the first third
    assert likelihood.prompt_head("ab") == "a"  # never empty
    text = "one two three four five six seven eight nine"
    head = likelihood.prompt_head(text)
    assert text.startswith(head) and head.endswith(" ") and len(head) <= len(text) // 3 + 1


def test_domain_table_rounds_per_domain_and_averages_diversity_over_domains():
    rows = [
        {
            "arm": "base",
            "news/nll": 1.23456,
            "news/ppl": 3.43695,
            "code/nll": 0.5,
            "code/ppl": 1.6487,
        },
        {
            "arm": "karcher",
            "news/nll": 1.0,
            "news/ppl": 2.71828,
            "code/nll": 0.4,
            "code/ppl": 1.49182,
            "news/distinct1": 0.5,
            "code/distinct1": 0.7,
            "code/pairwise": 0.3,
        },
    ]
    base, merged = likelihood.domain_table(rows, ["news", "code"])
    assert base == {
        "arm": "base",
        "news NLL": 1.2346,
        "news ppl": 3.437,
        "code NLL": 0.5,
        "code ppl": 1.649,
    }
    assert merged["distinct-1"] == 0.6 and merged["pairwise div"] == 0.3
    assert list(merged)[:3] == ["arm", "news NLL", "news ppl"]
