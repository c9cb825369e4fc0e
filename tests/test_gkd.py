import json
import math

import pytest
import torch
from conftest import qwen3_tokenizer_dir, run_script, save_tiny_qwen3
from safetensors.torch import load_file

import cli
import dataio
import errors
import gkd
import loading
import lora
import sampling
import tasks
import toy

SMALL = [
    "--max-steps",
    "6",
    "--batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--max-new-tokens",
    "24",
    "--eval-size",
    "6",
    "--toy-train-size",
    "40",
    "--save-every",
    "2",
]


@pytest.fixture(scope="module")
def toy_pair():
    """The toy teacher (base + the shipped thinking-SFT adapter) and the toy student, with some toy
    rows."""
    tok = toy.load_tokenizer()
    teacher = lora.load_frozen(
        str(toy.base_model_dir()), str(toy.SFT_ADAPTER_DIR), "cpu", False, "--teacher-adapter"
    )
    student, _ = lora.trainable_model(
        cli.TrainArgs(), torch.device("cpu"), toy.student_model_dir(), full=True
    )
    args = gkd.Args(
        eval_size=4, toy_difficulty="1,2", toy_train_size=6, max_prompt_length=512, max_length=512
    )
    train, _ = tasks.distillation_examples(tok, args)
    return tok, teacher, student, train


def data_rollout(train, tok):
    return sampling.rollout_from_tokens(
        [r["ids"] for r in train], [r["target"] for r in train], tok.pad_token_id, "cpu"
    )


def completion_logits(model, roll, rows, vocab):
    """The full [N, vocab] logits at the completion tokens (the thing token_losses must never
    build), in float64, and the completion tokens."""
    ids, attn, K = sampling.micro_batch(roll, rows)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -K - 1 : -1]
    m = roll.completion_mask[rows, :K].bool()
    return z[m][:, :vocab].double(), ids[:, -K:][m]


def test_textbook_jsd_by_definition():
    """gkd.generalized_jsd, the oracle of the fused kernel, against KL divergences written
    independently (torch's kl_div, the mixture M in probability space)."""
    torch.manual_seed(0)
    zs, zt = (
        3 * torch.randn(4, 11, dtype=torch.float64),
        3 * torch.randn(4, 11, dtype=torch.float64),
    )
    p, q = torch.softmax(zt / 0.7, -1), torch.softmax(zs / 0.7, -1)

    def kl(a, b):
        return torch.nn.functional.kl_div(b.log(), a, reduction="none").sum(-1)

    assert torch.allclose(gkd.generalized_jsd(zs, zt, 0.0, 0.7), kl(p, q))
    assert torch.allclose(gkd.generalized_jsd(zs, zt, 1.0, 0.7), kl(q, p))
    for beta in (0.3, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        want = beta * kl(p, m) + (1 - beta) * kl(q, m)
        assert torch.allclose(gkd.generalized_jsd(zs, zt, beta, 0.7), want)
    half = gkd.generalized_jsd(zs, zt, 0.5, 1.0)
    assert torch.allclose(half, gkd.generalized_jsd(zt, zs, 0.5, 1.0))  # symmetric at beta 0.5
    assert (half > 0).all() and (half < math.log(2)).all()
    assert gkd.generalized_jsd(zs, zs + 4.0, 0.5, 1.0).abs().max() < 1e-12  # same distribution


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_is_the_textbook_jsd(toy_pair, beta, temperature):
    tok, teacher, student, train = toy_pair
    roll = data_rollout(train, tok)
    vocab = len(tok)
    d, logged, row = gkd.token_losses(
        student,
        teacher,
        roll,
        slice(0, 6),
        vocab,
        loss="jsd",
        beta=beta,
        temperature=temperature,
        chunk_size=7,
    )
    zs, _ = completion_logits(student, roll, slice(0, 6), vocab)
    zt, _ = completion_logits(teacher, roll, slice(0, 6), vocab)
    want = gkd.generalized_jsd(zs, zt, beta, temperature)
    assert d.shape == want.shape == (int(roll.completion_mask.sum()),)
    assert torch.allclose(d.double(), want, rtol=1e-4, atol=1e-6), (d[:4], want[:4])
    assert torch.equal(logged, d.detach()) and row.max() == 5
    # D(x, y) is the mean over each row's tokens
    per_row = gkd.per_row_mean(d, row, 6)
    lengths = roll.completion_mask.sum(1)
    assert torch.allclose(
        per_row[2].double(), want[lengths[:2].sum() : lengths[:3].sum()].mean(), rtol=1e-4
    )


def test_sft_and_reverse_kl_pg_terms_by_hand(toy_pair):
    tok, teacher, student, train = toy_pair
    roll = data_rollout(train, tok)
    vocab = len(tok)
    zs, y = completion_logits(student, roll, slice(0, 6), vocab)
    zt, _ = completion_logits(teacher, roll, slice(0, 6), vocab)
    logq = torch.log_softmax(zs, -1).gather(1, y[:, None])[:, 0]
    logp = torch.log_softmax(zt, -1).gather(1, y[:, None])[:, 0]
    sft, nll, _ = gkd.token_losses(
        student, teacher, roll, slice(0, 6), vocab, loss="sft", beta=0.5, temperature=1.0
    )
    assert torch.allclose(sft.double(), -logq, atol=1e-5) and torch.allclose(
        nll.double(), -logq, atol=1e-5
    )
    term, log_ratio, _ = gkd.token_losses(
        student, teacher, roll, slice(0, 6), vocab, loss="reverse-kl-pg", beta=0.5, temperature=1.0
    )
    assert torch.allclose(log_ratio.double(), logq - logp, atol=1e-4)
    # the gradient is the policy gradient -A_t grad log q(y_t), A_t = -(log q - log p) held fixed
    student.zero_grad()
    term.sum().backward()
    g_pg = student.get_output_embeddings().weight.grad.clone()
    student.zero_grad()
    sft2, _, _ = gkd.token_losses(
        student, teacher, roll, slice(0, 6), vocab, loss="sft", beta=0.5, temperature=1.0
    )
    advantage = -log_ratio.detach()
    (-advantage * -sft2).sum().backward()  # -A_t log q(y_t), log q(y_t) = -sft
    assert torch.allclose(g_pg, student.get_output_embeddings().weight.grad, atol=1e-5)
    student.zero_grad()


def test_real_vocabulary_never_builds_logits_and_masks_padded_rows(tmp_path, monkeypatch):
    """Qwen3 heads have 151,936 rows for a 151,669-token tokenizer. The per-token divergence goes
    through the fused kernel (the LM heads' forward is never called) in row chunks, and rows past
    the tokenizer count as -inf even where the padded rows have the largest logits."""
    s_dir = save_tiny_qwen3(tmp_path / "student", seed=0)
    t_dir = save_tiny_qwen3(tmp_path / "teacher", seed=1)
    tok = loading.load_tokenizer(s_dir)
    student, teacher = loading.load_model(s_dir), loading.load_model(t_dir).eval()
    vocab = loading.shared_vocab(tok, loading.load_tokenizer(t_dir), student, teacher)
    assert vocab == len(tok) == 151_669 < student.get_output_embeddings().weight.shape[0] == 151_936
    with torch.no_grad():  # the padded rows would dominate both softmaxes if they were not cut
        for m in (student, teacher):
            w = m.get_output_embeddings().weight
            w[vocab:] = 5.0 * w[:vocab].abs().max() * torch.sign(w[:1])
    prompts = [tok(f"What is {i} + {i}?", add_special_tokens=False)["input_ids"] for i in range(3)]
    targets = [
        tok(f" {2 * i} because {i} and {i}.", add_special_tokens=False)["input_ids"]
        for i in range(3)
    ]
    roll = sampling.rollout_from_tokens(prompts, targets, tok.pad_token_id, "cpu")
    zs, _ = completion_logits(student, roll, slice(0, 3), vocab)
    zt, _ = completion_logits(teacher, roll, slice(0, 3), vocab)
    want = gkd.generalized_jsd(zs, zt, 0.5, 1.0)

    def no_logits(*a, **k):
        raise AssertionError("an LM head was called: [N, V] logits were built")

    for m in (student, teacher):
        monkeypatch.setattr(m.get_output_embeddings(), "forward", no_logits)
    calls = []
    import vocab_kernels.chunked as chunked

    real_chunk = chunked._chunk

    def counted_chunk(*args):
        calls.append(real_chunk(*args))
        return calls[-1]

    monkeypatch.setattr(chunked, "_chunk", counted_chunk)
    d, _, _ = gkd.token_losses(
        student,
        teacher,
        roll,
        slice(0, 3),
        vocab,
        loss="jsd",
        beta=0.5,
        temperature=1.0,
        chunk_size=4,
    )
    assert calls and max(calls) == 4 < d.numel(), (calls, d.numel())
    assert torch.allclose(d.double(), want, rtol=1e-4, atol=1e-6)
    d.sum().backward()  # the gradient reaches the student's head and never its padded rows
    g = student.get_output_embeddings().weight.grad
    assert g[:vocab].abs().sum() > 0 and g[vocab:].abs().sum() == 0


def test_a_real_student_needs_a_teacher(tmp_path):
    s_dir = save_tiny_qwen3(tmp_path / "s", vocab_size=151_669)
    with pytest.raises(errors.ConfigError, match=r"--teacher: required"):
        gkd.resolve_defaults(gkd.Args(model=s_dir))


def test_bad_rows_name_file_and_line(tmp_path):
    tok = toy.load_tokenizer()
    bad = [{"prompt": "What is 1+1?", "completion": "2"}, {"prompt": "x", "completion": 3}]
    with pytest.raises(errors.DataError, match=r"data.jsonl:2: field 'completion'"):
        tasks.encode_examples(bad, tok, "data.jsonl", 512, 512)
    with pytest.raises(errors.DataError, match=r"data.jsonl:1: field 'messages'"):
        tasks.encode_examples(
            [{"messages": [{"role": "user", "content": "hi"}]}], tok, "data.jsonl", 512, 512
        )
    with pytest.raises(errors.DataError, match=r"data.jsonl:1: .*'messages' or 'prompt'"):
        tasks.encode_examples([{"text": "hi"}], tok, "data.jsonl", 512, 512)
    data = tmp_path / "data.jsonl"
    dataio.write_jsonl(
        data,
        [{"prompt": f"What is {i}+1?", "completion": str(i + 1)} for i in range(20)]
        + [{"prompt": "What is 0+0?"}]
        + [{"prompt": "1+1?", "completion": "2"}] * 9,
    )
    with pytest.raises(AssertionError, match=r"data.jsonl:21: no target .*--lmbda 1 or --seq-kd"):
        run_script("gkd.py", "--data", data, "--max-steps", "1", "--out", tmp_path / "run")


def test_on_policy_share_is_exact_in_expectation():
    counts = [gkd.on_policy_rows(16, 0.3, step, seed=0) for step in range(2000)]
    assert set(counts) == {4, 5} and abs(sum(counts) / 2000 - 4.8) < 0.05
    assert gkd.on_policy_rows(16, 0.0, 3, 0) == 0 and gkd.on_policy_rows(16, 1.0, 3, 0) == 16


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_student(tmp_path):
    args = ["gkd.py", *SMALL]
    run_script(*args, "--out", tmp_path / "full")
    killed = tmp_path / "killed"
    with pytest.raises(AssertionError, match="exited 137"):
        run_script("tests/_kill_after_checkpoint.py", "4", *args, "--out", killed)
    assert (
        not (killed / "summary.json").exists() and (killed / "checkpoint" / "state.json").exists()
    )
    run_script(*args, "--out", killed, "--resume")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", killed))
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], abs=1e-6)
    assert {"metric", "before", "after", "teacher"} <= set(b["heldout"]) and b["teacher"] == a[
        "teacher"
    ]
    wa, wb = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "full", killed))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    steps = [
        r["step"]
        for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == list(range(1, 7)), steps


@pytest.mark.parametrize(
    "flags", [["--loss", "reverse-kl-pg"], ["--seq-kd", "--lmbda", "0", "--loss", "sft"]]
)
def test_variants_run(tmp_path, flags):
    out = tmp_path / "run"
    proc = run_script("gkd.py", *SMALL, "--max-steps", "2", *flags, "--out", out)
    # nothing on stderr that a user cannot act on: no PyTorch warning, no bitsandbytes kernel
    # message
    assert "Warning" not in proc.stderr and "gemm_4bit" not in proc.stderr, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    key = "loss/policy" if "reverse-kl-pg" in flags else "loss/teacher"
    assert key in s["final"] and s["final"]["on_policy_rows"] == (
        4 if "reverse-kl-pg" in flags else 0
    )
    assert s["variant"] == ("reverse-kl-pg" if "reverse-kl-pg" in flags else "seq-KD sft lambda 0")


def test_one_step_lora_student_on_real_vocabulary_qwen3s(tmp_path):
    s_dir = save_tiny_qwen3(tmp_path / "student", seed=0)
    t_dir = save_tiny_qwen3(tmp_path / "teacher", seed=1, tokenizer_dir=qwen3_tokenizer_dir())
    data = tmp_path / "chats.jsonl"
    dataio.write_jsonl(
        data,
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i}+{i}?"},
                    {"role": "assistant", "content": str(2 * i)},
                ],
                "answer": str(2 * i),
            }
            for i in range(24)
        ],
    )
    out = tmp_path / "run"
    run_script(
        "gkd.py",
        "--model",
        s_dir,
        "--teacher",
        t_dir,
        "--data",
        data,
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--lora-r",
        "4",
        "--out",
        out,
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["heldout"]["metric"] == "accuracy" and s["args"]["full"] is False
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == s_dir


@pytest.mark.slow
def test_learning_student_moves_towards_the_teacher(tmp_path):
    """A short GKD run (200 of the default 1,400 steps, at twice the learning rate): the held-out
    divergence to the teacher falls by more than a third on the data's targets and by half on the
    student's own greedy completions (accuracy only turns on later)."""
    out = tmp_path / "gkd"
    run_script("gkd.py", "--max-steps", "200", "--lr", "3e-3", "--eval-size", "48", "--out", out)
    s = json.loads((out / "summary.json").read_text())
    before, after = s["before"], s["after"]
    assert after["data/jsd"] < 0.65 * before["data/jsd"], (before, after)
    assert after["own/rkl"] < 0.5 * before["own/rkl"], (before, after)
    assert s["teacher"]["accuracy"] > 0.8 and s["heldout"]["teacher"] == s["teacher"]["accuracy"]
