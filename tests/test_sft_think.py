"""sft_think.py: masks with the real Qwen3 tokenizer, think-token tuning, resume, realism,
learning."""

import json
import statistics

import pytest
import torch
from conftest import run_script, save_tiny_qwen3
from safetensors.torch import load_file

import chat
import cli
import dataio
import errors
import loading
import lora
import sft_think
import toy

SMALL = [
    "--toy-train-size",
    "64",
    "--eval-size",
    "8",
    "--batch-size",
    "4",
    "--max-new-tokens",
    "32",
    "--eval-every",
    "0",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "reasoning_content": "2 plus 3 is 5.", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "<think>\n4 plus 4 is 8.\n</think>\n\n8"},
]


def masked_spans(tokenizer, ids, mask):
    """Decode each contiguous run of mask == 1 separately."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tokenizer.decode(s) for s in spans]


def test_smollm2_messages_mask_and_new_think_tokens():
    try:
        tok = loading.load_tokenizer("smollm2")
    except errors.MissingError as e:
        pytest.skip(str(e))
    ids, mask = chat.encode_row(
        {"messages": CONVERSATION}, "x:1", tok, chat.training_template(tok), False
    )
    assert masked_spans(tok, ids, mask) == [
        "<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>",
        "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>",
    ]
    old_pieces = {t: tok(t, add_special_tokens=False)["input_ids"] for t in ("<think>", "</think>")}
    added = chat.add_marker_tokens(tok, "<think>, </think>")
    assert added == old_pieces and all(len(p) > 1 for p in added.values())
    new_ids = [tok.convert_tokens_to_ids(t) for t in added]
    assert new_ids == [49152, 49153] and all(
        tok(t, add_special_tokens=False)["input_ids"] == [i] for t, i in zip(added, new_ids)
    )
    assert (
        tok.decode(new_ids, skip_special_tokens=True) == "<think></think>"
    )  # ordinary tokens: text keeps them
    model = loading.load_model("smollm2", device="cpu")
    before = model.get_input_embeddings().weight.detach().clone()
    params, rows = lora.train_only_tokens(model, tok, "<think>,</think>", added)
    w = model.get_input_embeddings().weight
    assert w.shape[0] == 49154 and model.get_output_embeddings().weight is w and len(params) == 1
    assert rows.tolist() == new_ids and torch.equal(w[:49152], before)
    for i, pieces in zip(new_ids, added.values()):
        assert torch.allclose(w[i], before[pieces].mean(0))
    ids, mask = chat.encode_row(
        {"messages": CONVERSATION}, "x:1", tok, chat.training_template(tok), False
    )
    assert ids.count(new_ids[0]) == 2 and ids.count(new_ids[1]) == 2
    x, attn, loss_mask, _ = chat.collate([(ids, mask)], tok.pad_token_id, "cpu")
    nll, _ = sft_think.masked_nll_sum(model, x, attn, loss_mask, None, rows)
    nll.backward()
    grad_rows = w.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert grad_rows == new_ids and torch.isfinite(nll)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result_and_adapter_loads_in_peft(tmp_path):
    args = ["sft_think.py", *SMALL, "--max-steps", "6", "--save-every", "2"]
    run_script(*args, "--out", tmp_path / "full")
    killed = tmp_path / "killed"
    with pytest.raises(AssertionError, match="exited 137"):
        run_script("tests/_kill_after_checkpoint.py", "4", *args, "--out", killed)
    assert (
        not (killed / "summary.json").exists() and (killed / "checkpoint" / "state.json").exists()
    )
    run_script(*args, "--out", killed, "--resume")

    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", killed))
    assert a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-6)
    wa, wb = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "full", killed))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, 7)), f"each training step is logged once: {train_steps}"
    for name in ("args.json", "metrics.jsonl", "samples.jsonl", "adapter_config.json"):
        assert (killed / name).exists(), name
    assert {"metric", "before", "after"} <= set(b["heldout"])

    # the adapter loads in PEFT and gives the logits this repo gives
    from peft import PeftModel

    ours = lora.load_adapter(loading.load_model("toy"), killed)
    theirs = PeftModel.from_pretrained(loading.load_model("toy"), str(killed))
    x = toy.load_tokenizer()("Ann has 12 apples.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max() < 1e-5


def test_train_tokens_lowers_loss_and_freezes_everything_else(tmp_path):
    out = tmp_path / "tt"
    run_script(
        "sft_think.py",
        *SMALL,
        "--max-steps",
        "15",
        "--lr",
        "0.05",
        "--train-tokens",
        "<think>,</think>",
        "--out",
        out,
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["val_loss"] < s["before"]["val_loss"] - 0.01, (s["before"], s["after"])
    base = load_file(toy.base_model_dir() / "model.safetensors")
    tuned = load_file(out / "model" / "model.safetensors")
    tok = toy.load_tokenizer()
    rows = tok.convert_tokens_to_ids(["<think>", "</think>"])
    changed = []
    for name, w in base.items():
        if name in tuned and not torch.equal(w, tuned[name]):
            diff_rows = (
                (w != tuned[name]).reshape(w.shape[0], -1).any(-1).nonzero().flatten().tolist()
            )
            changed.append((name, diff_rows))
    assert changed, "nothing trained"
    assert all(sorted(r) and set(r) <= set(rows) for _, r in changed), changed


@pytest.mark.slow
def test_init_adapter_is_merged_first_and_recorded_for_the_lineage(tmp_path):
    import lora

    plain, chained = tmp_path / "plain", tmp_path / "chained"
    run_script("sft_think.py", *SMALL, "--max-steps", "1", "--out", plain)
    run_script(
        "sft_think.py",
        *SMALL,
        "--max-steps",
        "1",
        "--init-adapter",
        toy.SFT_ADAPTER_DIR,
        "--out",
        chained,
    )
    before = {
        d.name: json.loads((d / "summary.json").read_text())["before"]["val_loss"]
        for d in (plain, chained)
    }
    assert before["chained"] < 0.5 * before["plain"], (
        before
    )  # the thinking-SFT adapter was in from step 0
    assert lora.lineage(str(chained)) == [str(toy.SFT_ADAPTER_DIR), str(chained)]


def test_one_step_on_a_real_vocabulary_qwen3(tmp_path):
    model_dir = save_tiny_qwen3(tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    dataio.write_jsonl(
        data,
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i}+{i}?"},
                    {
                        "role": "assistant",
                        "reasoning_content": f"{i} and {i} make {2 * i}.",
                        "content": str(2 * i),
                    },
                ]
            }
            for i in range(24)
        ],
    )
    out = tmp_path / "run"
    run_script(
        "sft_think.py",
        "--model",
        model_dir,
        "--data",
        data,
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--out",
        out,
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["heldout"]["metric"] == "val_loss" and s["heldout"]["after"] > 0
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        == model_dir
    )


@pytest.mark.slow
def test_default_run_learns_to_think(sft_toy_run):
    s = json.loads((sft_toy_run / "summary.json").read_text())
    assert s["heldout"]["metric"] == "accuracy"
    assert s["heldout"]["after"] >= 0.8, s["heldout"]
    assert s["heldout"]["after"] >= s["heldout"]["before"] + 0.3, s["heldout"]


@pytest.mark.slow
def test_shipped_sft_adapter_is_what_the_default_command_makes(sft_toy_run):
    # toy/sft_think (grpo.py's default start) is `python sft_think.py` with its defaults
    # (scripts/make_toy_adapters.py)
    made_by = json.loads((toy.SFT_ADAPTER_DIR / "made_by.json").read_text())
    assert made_by["command"] == "python sft_think.py"
    shipped, fresh = (
        load_file(d / "adapter_model.safetensors") for d in (toy.SFT_ADAPTER_DIR, sft_toy_run)
    )
    assert shipped.keys() == fresh.keys()
    assert all(shipped[k].shape == fresh[k].shape for k in shipped)
    # The same held-out accuracy from the command (within 10 problems of 200: an AVX2 CPU measured
    # 0.91 against the shipped 0.93), and from the shipped adapter itself, on any CPU.
    s = json.loads((sft_toy_run / "summary.json").read_text())
    assert abs(s["heldout"]["after"] - made_by["heldout"]["after"]) <= 0.05, (
        s["heldout"],
        made_by["heldout"],
    )
    args = sft_think.Args()
    _, _, problems = sft_think.load_rows(
        "toy", "", args.seed, args.eval_size, args.toy_difficulty, args.toy_train_size
    )
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    lora.load_adapter(model, str(toy.SFT_ADAPTER_DIR))
    accuracy = statistics.fmean(
        sft_think.generate_eval(model, tok, problems, args.max_new_tokens)[0]
    )
    # (greedy decoding of a fixed model: another CPU's rounding may flip a near-tie, hence 3
    # problems of 200)
    assert accuracy == pytest.approx(made_by["heldout"]["after"], abs=0.015), (
        accuracy,
        made_by["heldout"],
    )
    # The same weights on the same kind of CPU: the B @ A deltas (A and B alone could drift
    # together). 500 steps amplify the different roundings of other CPU kernels (AVX2 vs AVX-512
    # matmuls) far beyond this tolerance.
    if made_by.get("cpu_capability") != torch.backends.cpu.get_cpu_capability():
        return
    for a_key in [k for k in shipped if "lora_A" in k]:
        b_key = a_key.replace("lora_A", "lora_B")
        d_shipped, d_fresh = (w[b_key] @ w[a_key] for w in (shipped, fresh))
        rel = float((d_shipped - d_fresh).norm() / d_shipped.norm().clamp(min=1e-12))
        assert rel < 0.05, (a_key, rel)


def test_packing_gives_the_unpacked_loss():
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    rows = toy.arithmetic("test", 6, seed=0, difficulty=[1, 2])
    examples = chat.encode_rows(rows, tok, toy.TRAINING_CHAT_TEMPLATE, False, 512, "toy")
    packed_rows = chat.pack(examples, 512)
    assert any(len(r) > 1 for r in packed_rows), "nothing was packed"
    with torch.no_grad():
        alone = sum(
            float(sft_think.masked_nll_sum(model, *chat.collate([e], tok.pad_token_id, "cpu"))[0])
            for e in examples
        )
        ids, attn, loss_mask, pos = chat.collate(packed_rows, tok.pad_token_id, "cpu")
        packed = float(sft_think.masked_nll_sum(model, ids, attn, loss_mask, pos)[0])
        # what packing did before: one causal mask over the whole row, positions running on across
        # examples
        crossing = float(
            sft_think.masked_nll_sum(
                model, ids, (loss_mask >= 0).long() * (pos >= 0).long(), loss_mask
            )[0]
        )
    assert packed == pytest.approx(alone, rel=1e-4)
    assert abs(crossing - alone) > 1e-3 * alone  # the test would catch attention across examples


def test_held_out_split_is_the_shared_rule_and_keeps_file_line_numbers(tmp_path):
    data, extra = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    dataio.write_jsonl(data, [{"text": f"row {i}"} for i in range(40)])
    train, held, _ = sft_think.load_rows(
        str(data), "", seed=0, eval_size=200, toy_difficulty="1", toy_train_size=1
    )
    # dataio.train_and_heldout: the last tenth of --data is held out, in file order
    assert [r["_line"] for r in train] == list(range(1, 37))
    assert [r["_line"] for r in held] == list(range(37, 41))
    assert all(r["text"] == f"row {r['_line'] - 1}" for r in train + held)
    # --eval-data: all of --data trains, and the first --eval-size rows of --eval-data are held out
    dataio.write_jsonl(extra, [{"text": f"extra {i}"} for i in range(10)])
    train, held, _ = sft_think.load_rows(
        str(data), str(extra), seed=0, eval_size=3, toy_difficulty="1", toy_train_size=1
    )
    assert len(train) == 40 and [r["text"] for r in held] == ["extra 0", "extra 1", "extra 2"]


def test_non_finite_loss_skips_steps_then_stops_with_the_last_checkpoint_intact(
    tmp_path, monkeypatch
):
    real, calls = sft_think.masked_nll_sum, {"train": 0}

    def poisoned(model, ids, attn, loss_mask, position_ids=None, head_grad_rows=None):
        nll, n = real(model, ids, attn, loss_mask, position_ids, head_grad_rows)
        if model.training:
            calls["train"] += 1
            if calls["train"] > 2:  # steps 3, 4, 5, ... go non-finite
                nll = nll * float("nan")
        return nll, n

    monkeypatch.setattr(sft_think, "masked_nll_sum", poisoned)
    args = cli.parse_args(
        sft_think.Args,
        [
            "--toy-train-size",
            "64",
            "--eval-size",
            "4",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "8",
            "--eval-every",
            "0",
            "--max-steps",
            "10",
            "--save-every",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    with pytest.raises(errors.NonFiniteError, match="3 steps in a row"):
        sft_think.main(args)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # step 4 came in the bad run: no checkpoint there
    saved = torch.load(tmp_path / "checkpoint" / "trainable.pt", weights_only=True)
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    rows = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]  # step 5 raised before it was logged


def test_train_tokens_head_gradient_is_the_full_one_on_those_rows():
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    rows = torch.tensor(tok.convert_tokens_to_ids(["<think>", "</think>"]))
    examples = chat.encode_rows(
        toy.arithmetic("test", 4, seed=0, difficulty=[1]),
        tok,
        toy.TRAINING_CHAT_TEMPLATE,
        False,
        512,
        "toy",
    )
    batch = chat.collate(examples, tok.pad_token_id, "cpu")[:3]
    head = model.get_output_embeddings()
    grads = []
    for head_rows in (None, rows):
        model.zero_grad(set_to_none=True)
        hidden = model.get_decoder()(
            input_ids=batch[0], attention_mask=batch[1]
        ).last_hidden_state.detach()
        sel = batch[2][:, 1:].bool()
        from vocab_kernels import linear_token_logprobs

        (
            -linear_token_logprobs(
                hidden[:, :-1][sel], head.weight, batch[0][:, 1:][sel], weight_grad_rows=head_rows
            ).sum()
        ).backward()
        grads.append(head.weight.grad.clone())
    full, only = grads
    assert torch.allclose(only[rows], full[rows], atol=1e-5) and full[rows].abs().sum() > 0
    others = torch.ones(full.shape[0], dtype=torch.bool)
    others[rows] = False
    assert only[others].abs().max() == 0  # no gradient computed for any other row


def test_shipped_instruct_adapter_scores_what_made_by_says():
    # toy/sft_instruct (rlmt.py's default start): `python sft_think.py --data toy-instructions
    # --max-steps 300`
    made_by = json.loads((toy.SFT_INSTRUCT_DIR / "made_by.json").read_text())
    assert made_by["command"] == "python sft_think.py --data toy-instructions --max-steps 300"
    args = sft_think.Args()
    _, _, problems = sft_think.load_rows(
        "toy-instructions", "", args.seed, args.eval_size, "1", args.toy_train_size
    )
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    base_accuracy = statistics.fmean(
        sft_think.generate_eval(model, tok, problems, args.max_new_tokens)[0]
    )
    lora.load_adapter(model, str(toy.SFT_INSTRUCT_DIR))
    correct, _, texts, per_kind = sft_think.generate_eval(model, tok, problems, args.max_new_tokens)
    accuracy = statistics.fmean(correct)
    assert accuracy == pytest.approx(made_by["heldout"]["after"], abs=0.015), (
        accuracy,
        made_by["heldout"],
    )
    assert base_accuracy == pytest.approx(made_by["heldout"]["before"], abs=0.015)
    assert set(per_kind) == {
        f"accuracy_{k}" for k in ("count", "initials", "max", "reverse", "sort", "upper", "vowels")
    }
    assert sum(t.startswith("<think>\n") and "</think>" in t for t in texts) >= 0.9 * len(
        texts
    )  # it thinks first


def test_shipped_formats_adapter_scores_what_made_by_says():
    # toy/sft_formats (an arm of eval_reasoning.py): the default SFT over the three toy answer
    # formats
    made_by = json.loads((toy.SFT_FORMATS_DIR / "made_by.json").read_text())
    assert made_by["command"] == "python sft_think.py --toy-styles gsm8k,math,mc"
    args = sft_think.Args()
    _, _, problems = sft_think.load_rows(
        "toy",
        "",
        args.seed,
        args.eval_size,
        args.toy_difficulty,
        args.toy_train_size,
        "gsm8k,math,mc",
    )
    assert {p["style"] for p in problems} == {"gsm8k", "math", "mc"}
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    lora.load_adapter(model, str(toy.SFT_FORMATS_DIR))
    accuracy = statistics.fmean(
        sft_think.generate_eval(model, tok, problems, args.max_new_tokens)[0]
    )
    assert accuracy == pytest.approx(made_by["heldout"]["after"], abs=0.015), (
        accuracy,
        made_by["heldout"],
    )


def test_shipped_domain_adapters_score_what_made_by_says():
    # toy/<domain> (karcher_merge.py's inputs): language-model SFT on one domain's documents, every
    # token in the loss. The held-out loss is re-measured for code (the shortest documents);
    # tests/test_karcher_merge.py checks that every specialist beats the base on its own domain.
    for d in toy.DOMAIN_ADAPTERS:
        made_by = json.loads((toy.TOY_DIR / d / "made_by.json").read_text())
        assert made_by["command"] == (
            f"python sft_think.py --data toy-documents --toy-domains {d} --max-steps 200 "
            "--batch-size 8 --micro-batch-size 8 --max-length 1024"
        )
    domain, path = "code", toy.TOY_DIR / "code"
    args = sft_think.Args()
    train, val, problems = sft_think.load_rows(
        "toy-documents", "", args.seed, args.eval_size, "1", 50, toy_domains=domain
    )
    assert problems is None and all(set(r) == {"text"} for r in train + val)
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    examples = chat.encode_rows(val, tok, chat.training_template(tok), False, 1024, "toy-documents")
    assert all(sum(m) >= len(ids) - 1 for ids, m in examples)  # the whole text is trained
    before = sft_think.eval_loss(model, examples, 16, tok.pad_token_id, "cpu")
    lora.load_adapter(model, str(path))
    after = sft_think.eval_loss(model, examples, 16, tok.pad_token_id, "cpu")
    assert before == pytest.approx(made_by["heldout"]["before"], rel=1e-4)
    assert after == pytest.approx(made_by["heldout"]["after"], rel=2e-3) and after < 0.8 * before


def test_toy_documents_rejects_an_unknown_domain():
    with pytest.raises(errors.ConfigError, match="--toy-domains"):
        sft_think.load_rows("toy-documents", "", 0, 10, "1", 10, toy_domains="story,poetry")
