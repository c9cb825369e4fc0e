"""The building blocks alone: loading, sampling, log-probs, JSONL, metrics, checkpoints, CLI."""

import dataclasses
import importlib.util
import json
import math
import os
import random
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from conftest import qwen3_tokenizer_dir, save_tiny_qwen3, tiny_qwen3
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

import cli
import dataio
import distributed
import errors
import lifecycle
import loading
import sampling
from errors import DataError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids 3..), Qwen3-style specials; EOS <|im_end|> = 2, pad
    <|endoftext|> = 0."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(i) for i in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def qwen3_tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny_qwen3")
    tiny_qwen3(hidden=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------------------
# loading


def test_load_model_and_tokenizer_from_dir(model_dir):
    m = loading.load_model(model_dir, device="cpu")
    assert m.dtype == torch.float32 and m.device.type == "cpu"
    ref = Qwen3ForCausalLM.from_pretrained(model_dir)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    t = loading.load_tokenizer(model_dir)
    assert t.eos_token == "<|im_end|>" and t.pad_token_id == 0
    assert loading.load_model(model_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_same_grads_to_a_frozen_base_adapter(model_dir):
    grads = []
    for ckpt in (False, True):
        m = loading.load_model(model_dir, gradient_checkpointing=ckpt)
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        # only a projection inside a (checkpointed) layer trains, like LoRA over a frozen base
        w = m.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        m(ids, labels=ids).loss.backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_load_in_4bit_on_cpu(model_dir):
    import bitsandbytes as bnb

    m = loading.load_model(model_dir, device="cpu", load_in_4bit=True)
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    q = m.model.layers[0].self_attn.q_proj.weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # NF4 with double quantisation
    with torch.no_grad():
        logits = m(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    r = sampling.sample(
        m, loading.load_tokenizer(model_dir), ["ab", "c"], max_new_tokens=3, greedy=True
    )
    lp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, 3)
    assert r.completion_ids.shape == (2, 3) and torch.isfinite(lp).all()


def test_missing_model_says_what_was_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model.*not found"):
        loading.load_model(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="offline"):
        loading.load_tokenizer("someorg/some-model")  # conftest sets HF_HUB_OFFLINE=1


def test_toy_resolves_to_the_toy_base():
    toy = pytest.importorskip("toy")
    if not (
        Path(getattr(toy, "BASE_DIR", "/nonexistent")) / "model.safetensors"
    ).exists():  # never pretrain here
        pytest.skip("toy base model not built yet")
    m = loading.load_model("toy")
    t = loading.load_tokenizer("toy")
    r = sampling.sample(m, t, ["1+1="], max_new_tokens=4, greedy=True)
    assert r.completion_ids.shape == (1, 4) or r.finished.all()


# --------------------------------------------------------------------------------------------------
# JSONL, files


def test_shared_vocab_mismatches_are_clear_errors(tmp_path):
    s_dir = save_tiny_qwen3(tmp_path / "s", vocab_size=151_669)
    tok = loading.load_tokenizer(s_dir)
    student = loading.load_model(s_dir)
    small = save_tiny_qwen3(tmp_path / "small", vocab_size=151_000)
    with pytest.raises(
        errors.ConfigError, match=r"--teacher: its LM head has 151000 rows but the tokenizer 151669"
    ):
        loading.shared_vocab(tok, None, student, loading.load_model(small))
    other = loading.load_tokenizer("toy")
    with pytest.raises(
        errors.ConfigError, match=r"--teacher: its tokenizer has \d+ tokens, the student's 151669"
    ):
        loading.shared_vocab(tok, other, student, student)


def test_read_jsonl_validates_with_file_line_field(tmp_path):
    good = tmp_path / "good.jsonl"
    dataio.write_jsonl(good, [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2.5}])
    good.write_text(good.read_text() + "\n")  # a blank line is not a row
    rows = dataio.read_jsonl(
        good, required=["prompt"], types={"prompt": str, "answer": (int, float)}
    )
    assert [r["prompt"] for r in rows] == ["a", "b"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n')
    with pytest.raises(DataError) as e:
        dataio.read_jsonl(bad)
    assert str(e.value).startswith(f"{bad}:3: malformed JSON")

    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'prompt': missing"):
        dataio.read_jsonl(bad, required=["prompt"])

    bad.write_text('{"prompt": "a", "answer": true}\n')
    with pytest.raises(DataError, match=rf"^{bad}:1: field 'answer': expected int, got bool"):
        dataio.read_jsonl(bad, types={"answer": int})

    bad.write_text('["prompt"]\n')
    with pytest.raises(DataError, match=rf"^{bad}:1: expected a JSON object, got list"):
        dataio.read_jsonl(bad)

    bad.write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        dataio.read_jsonl(bad)
    with pytest.raises(DataError, match="no such file"):
        dataio.read_jsonl(tmp_path / "missing.jsonl")
    assert dataio.load_rows(good, required=["prompt"]) == rows
    with pytest.raises(DataError, match="no such file"):
        dataio.load_rows(tmp_path / "typo.jsonl")
    with pytest.raises(
        DataError, match="no such file, and (loading it as a dataset failed|it cannot be loaded)"
    ):
        dataio.load_rows("someorg/no-such-dataset")  # offline


def test_atomic_writes_never_leave_a_torn_file(tmp_path):
    p = tmp_path / "sub" / "a.json"
    dataio.atomic_write_json(p, {"x": torch.tensor([1, 2]), "p": Path("/a")})
    assert json.loads(p.read_text()) == {"x": [1, 2], "p": "/a"}
    with pytest.raises(TypeError):
        dataio.atomic_write_json(p, {"x": object()})  # fails midway
    assert json.loads(p.read_text())["x"] == [1, 2]
    assert [f.name for f in p.parent.iterdir()] == ["a.json"]  # no temp file left behind
    dataio.append_jsonl(tmp_path / "log.jsonl", {"a": 1})
    dataio.append_jsonl(tmp_path / "log.jsonl", {"a": 2})
    assert [r["a"] for r in dataio.iter_jsonl(tmp_path / "log.jsonl")] == [1, 2]


def test_metrics_logger(tmp_path):
    log = lifecycle.MetricsLogger(tmp_path)
    log.log(1, {"reward": torch.tensor(0.5), "clip_ratio/low_mean": 0.0, "n": np.int64(3)})
    log.log(2, {"reward": 0.75})
    rows = dataio.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [
        {"step": 1, "reward": 0.5, "clip_ratio/low_mean": 0.0, "n": 3},
        {"step": 2, "reward": 0.75},
    ]
    with pytest.raises(ValueError, match="unknown tracker"):
        lifecycle.MetricsLogger(tmp_path, report_to="tensorboard")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(errors.ConfigError, match="pip install wandb"):
            lifecycle.MetricsLogger(tmp_path, report_to="wandb")


def test_json_files_are_strict_json(tmp_path):
    # JSON has no NaN / Infinity: a non-finite value is written as null, wherever it sits
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    def lines(path):
        return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]

    log = lifecycle.MetricsLogger(tmp_path)
    log.log(
        1,
        {
            "kl": float("nan"),
            "loss": float("inf"),
            "t": torch.tensor([1.0, float("-inf")]),
            "a": np.float32("nan"),
            "nested": {"x": [float("nan"), 2.0]},
            "ok": 0.5,
        },
    )
    assert lines(tmp_path / "metrics.jsonl") == [
        {
            "step": 1,
            "kl": None,
            "loss": None,
            "t": [1.0, None],
            "a": None,
            "nested": {"x": [None, 2.0]},
            "ok": 0.5,
        }
    ]
    dataio.atomic_write_json(
        tmp_path / "summary.json", {"heldout": {"before": float("nan"), "after": 1.0}}
    )
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary == {"heldout": {"before": None, "after": 1.0}}
    dataio.write_jsonl(tmp_path / "s.jsonl", [{"r": float("inf")}])
    assert lines(tmp_path / "s.jsonl") == [{"r": None}]


# --------------------------------------------------------------------------------------------------
# checkpoints


def _trained(seed=0):
    m = tiny_qwen3(seed=seed)
    for p in m.model.embed_tokens.parameters():
        p.requires_grad_(False)  # frozen weights are not saved
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    sched = lifecycle.cosine_schedule(opt, 2, 10)
    ids = torch.randint(3, 99, (2, 6))
    for _ in range(2):
        m(ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return m, opt, sched


def test_checkpoint_round_trip_restores_weights_optimizer_rng(tmp_path):
    m, opt, sched = _trained()
    lifecycle.set_seed(123)
    lifecycle.save_checkpoint(tmp_path, 7, m, opt, sched, data_state={"epoch": 1, "index": 5})
    saved = torch.load(tmp_path / "checkpoint" / "trainable.pt")
    assert "model.embed_tokens.weight" not in saved and "lm_head.weight" in saved
    expect = (random.random(), np.random.rand(), torch.rand(3))

    m2, opt2, sched2 = _trained(seed=1)  # different weights, optimiser moments and LR
    random.random(), torch.rand(5)
    state = lifecycle.load_checkpoint(tmp_path, m2, opt2, sched2)
    assert state == {"step": 7, "data_state": {"epoch": 1, "index": 5}}
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
    for (n, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == sched.last_epoch
    assert lifecycle.load_checkpoint(tmp_path / "nothing", m2) is None


def test_checkpoint_killed_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    m, opt, _ = _trained()
    lifecycle.save_checkpoint(tmp_path, 1, m, opt)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")  # the process dies after the first file
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        lifecycle.save_checkpoint(tmp_path, 2, m, opt)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.tmp").exists()  # torn, and ignored
    m3, opt3, _ = _trained(seed=2)
    assert lifecycle.load_checkpoint(tmp_path, m3, opt3)["step"] == 1
    for n, p in m3.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n

    # killed between the two renames: only checkpoint.old is complete
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert lifecycle.load_checkpoint(tmp_path, m3, opt3)["step"] == 1
    lifecycle.save_checkpoint(tmp_path, 3, m, opt)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert lifecycle.load_checkpoint(tmp_path, m3, opt3)["step"] == 3


def test_resume_keeps_the_run_and_trims_metrics_after_the_checkpoint(tmp_path):
    m, opt, _ = _trained()
    out = lifecycle.prepare_out_dir(tmp_path, Args())
    log = lifecycle.MetricsLogger(out)
    for step in (1, 2):
        log.log(step, {"loss": 1.0 / step})
    lifecycle.save_checkpoint(out, 2, m, opt)
    log.log(3, {"loss": 0.3})
    for row in (
        {"step": 2, "completion": "a"},
        {"note": "no step"},
        {"step": 3, "completion": "b"},
    ):
        dataio.append_jsonl(out / "samples.jsonl", row)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    lifecycle.prepare_out_dir(out, Args(), resume=True)
    assert lifecycle.load_checkpoint(out, m, opt)["step"] == 2
    assert [r["step"] for r in dataio.read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert [r.get("step") for r in dataio.read_jsonl(out / "samples.jsonl")] == [2, None]
    lifecycle.prepare_out_dir(
        out, Args(), resume=False
    )  # a fresh run in the same directory starts clean
    assert not (out / "metrics.jsonl").exists() and not (out / "samples.jsonl").exists()
    assert lifecycle.load_checkpoint(out, m, opt) is None


def test_checkpoint_refuses_a_different_model(tmp_path):
    m, opt, _ = _trained()
    lifecycle.save_checkpoint(tmp_path, 1, m, opt)
    other = tiny_qwen3(hidden=64)
    other.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not match"):
        lifecycle.load_checkpoint(tmp_path, tiny_qwen3(vocab_size=99).model)
    with pytest.raises(ValueError, match="shape"):
        lifecycle.load_checkpoint(tmp_path, other)


# --------------------------------------------------------------------------------------------------
# helpers


@dataclasses.dataclass
class Args:
    model: str = "toy"
    """model id or directory"""
    max_steps: int = 10
    """optimizer steps (100% of them)"""
    lr: float = 1e-5
    """peak learning rate"""
    load_in_4bit: bool = False
    """NF4 base"""
    lora: bool = True
    """train adapters"""
    out: str | None = None
    """run directory"""
    loss: Literal["grpo", "dapo"] = "grpo"
    """aggregation"""
    stop: list[str] = dataclasses.field(default_factory=list)
    """stop strings"""


def test_parse_args_kebab_flags(capsys):
    a = cli.parse_args(
        Args,
        [
            "--max-steps",
            "3",
            "--load-in-4bit",
            "--no-lora",
            "--out",
            "x",
            "--loss",
            "dapo",
            "--stop",
            "A",
            "B",
            "--lr",
            "2e-5",
        ],
    )
    assert a == Args(
        max_steps=3, load_in_4bit=True, lora=False, out="x", loss="dapo", stop=["A", "B"], lr=2e-5
    )
    assert cli.parse_args(Args, []) == Args()
    with pytest.raises(SystemExit):
        cli.parse_args(Args, ["--loss", "ppo"])
    with pytest.raises(SystemExit):
        cli.parse_args(Args, ["--help"], description="the method")
    help_text = capsys.readouterr().out
    assert "--max-steps" in help_text and "optimizer steps (100% of them)" in help_text
    assert "--no-load-in-4bit" in help_text and "the method" in help_text


def test_out_dir_schedule_memory_seed(tmp_path):
    out = lifecycle.prepare_out_dir(tmp_path / "run", Args(max_steps=4))
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lifecycle.cosine_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and abs(lrs[4] - 0.5) < 1e-9 and lrs[6] == 0.0
    assert lifecycle.peak_memory_mb() > 10
    lifecycle.set_seed(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    lifecycle.set_seed(5)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_single_process_distributed_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() == (0, 1, 0) and distributed.is_main()
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.all_reduce_gradients([p])
    distributed.broadcast_parameters([p])
    distributed.barrier()
    assert p.grad.tolist() == [3.0, 3.0] and distributed.all_reduce_sum(2) == 2
    assert distributed.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass
class NegArgs:
    no_think: bool = False
    """remove the thoughts"""


def test_parse_args_field_named_no_x_is_a_switch():
    # argparse's BooleanOptionalAction would read --no-think as False
    assert cli.parse_args(NegArgs, ["--no-think"]).no_think is True
    assert cli.parse_args(NegArgs, []).no_think is False


# --------------------------------------------------------------------------------------------------
# run plumbing


def test_optimizer_step_skips_non_finite_updates_and_stops_after_a_streak():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    sched = lifecycle.cosine_schedule(opt, 0, 10)
    step = lifecycle.OptimizerStep(
        list(layer.parameters()), opt, sched, max_grad_norm=1.0, max_bad_steps=2
    )
    x = torch.ones(4, 3)
    layer(x).sum().backward()
    assert step(1.0)["skipped_steps"] == 0
    good = [p.detach().clone() for p in layer.parameters()]
    (
        layer(x).sum() * float("nan")
    ).backward()  # a NaN gradient: skipped, weights and Adam state untouched
    adam_steps = [opt.state[p]["step"].item() for p in layer.parameters()]
    assert step(float("nan"))["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(good, layer.parameters()))
    assert [opt.state[p]["step"].item() for p in layer.parameters()] == adam_steps
    assert all(p.grad is None for p in layer.parameters())
    assert sched.last_epoch == 2  # the LR schedule still follows the step count
    layer(x).sum().backward()
    step(1.0)  # a good step ends the streak
    assert step.streak == 0 and step.skipped == 1
    layer(x).sum().backward()
    step(float("inf"))
    layer(x).sum().backward()
    with pytest.raises(errors.NonFiniteError, match="2 steps in a row"):
        step(float("inf"), step=5)


def test_epoch_indices_cover_an_epoch_once_and_split_ranks():
    seen = [i for s in range(5) for i in dataio.epoch_indices(20, 4, s, seed=3)]
    assert sorted(seen[:20]) == list(range(20))  # 5 steps of 4 = one epoch, every item once
    assert dataio.epoch_indices(20, 4, 5, seed=3) != dataio.epoch_indices(
        20, 4, 0, seed=3
    )  # a new order next epoch
    both = dataio.epoch_indices(20, 4, 2, seed=3, rank=0, world=2) + dataio.epoch_indices(
        20, 4, 2, seed=3, rank=1, world=2
    )
    assert sorted(both) == sorted(dataio.epoch_indices(20, 4, 2, seed=3))


def test_run_cli_turns_user_errors_into_one_line_and_status_2(capsys, monkeypatch):
    @dataclasses.dataclass
    class A:
        x: int = 1

    def main(args):
        raise errors.DataError("data.jsonl:3: field 'prompt': missing\n(present: text)")

    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, A, [])
    assert e.value.code == 2
    assert (
        capsys.readouterr().err == "error: data.jsonl:3: field 'prompt': missing (present: text)\n"
    )
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    with pytest.raises(errors.DataError):
        cli.run_cli(main, A, [])
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: its traceback stays
        cli.run_cli(lambda args: 1 / 0, A, [])


def test_help_spells_out_model_dependent_defaults(capsys):
    @dataclasses.dataclass
    class A:
        lr: float | None = None
        """default 3e-4 toy, 1e-5 hub model"""
        steps: int = 5
        """steps, 5% of them warmup"""

    with pytest.raises(SystemExit):
        cli.parse_args(A, ["--help"])
    out = capsys.readouterr().out
    assert (
        "(default: None)" not in out
        and "(default: 5)" in out
        and "5% of them" in out
        and "%%" not in out
    )


def test_win_rate_counts_and_interval_by_hand():
    import stats

    row = stats.win_rate([1.0, 0.5, 0.0, 1.0])
    mean, sd = 0.625, math.sqrt((0.375**2 + 0.125**2 + 0.625**2 + 0.375**2) / 3)
    half = 1.96 * sd / 2
    assert (row["wins"], row["ties"], row["losses"], row["compared"]) == (2, 1, 1, 4)
    assert row["win_rate"] == mean
    assert [row["interval_low"], row["interval_high"]] == pytest.approx([mean - half, 1.0])
    one = stats.win_rate([0.5])  # a single comparison: an interval of width 0, not NaN
    assert [one["interval_low"], one["interval_high"]] == [0.5, 0.5]


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    @dataclasses.dataclass
    class A:
        out: str = "runs/x"
        resume: bool = False

    def main(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, A, [])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    resume = "(--resume continues from the last checkpoint)"
    assert err == f"interrupted: runs/x keeps what was written {resume}"


def test_jsonl_not_utf8_and_line_numbers_that_count_blank_lines(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(errors.DataError, match=r"d.jsonl:4: not UTF-8 text \(byte 0xe9 at byte 14"):
        dataio.read_jsonl(data)
    data.write_text('{"text": "a"}\n\n{"text": "b"}\n' * 10)
    (train, rows), (_, held) = dataio.train_and_heldout(str(data), "", 2)
    assert [r["_line"] for r in rows[:3]] == [1, 3, 4] and held[-1]["_line"] == 30
    assert dataio.read_jsonl(data)[1] == {"text": "b"}  # no "_line" unless asked for


def test_adapters_and_models_are_written_readable_like_every_other_file(tmp_path):
    import stat

    import lora
    import toy

    model = lora.add_lora(toy.load_model(), r=2, alpha=4.0)
    lora.save_adapter(model, str(tmp_path / "ad"))
    lora.save_trained(model, toy.load_tokenizer(), tmp_path / "run", "toy", merged=True)
    files = [tmp_path / "ad" / lora.WEIGHTS_NAME, tmp_path / "run" / "model" / "model.safetensors"]
    assert [stat.S_IMODE(f.stat().st_mode) for f in files] == [dataio.FILE_MODE] * 2


def test_bad_device_is_a_config_error():

    with pytest.raises(
        errors.ConfigError, match=r"^--device tpu: expected auto, cpu, cuda or cuda:N$"
    ):
        distributed.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(errors.ConfigError, match=r"^--device cuda: this machine has no CUDA"):
            distributed.pick_device("cuda")


def test_a_full_disk_is_one_line_naming_the_path_and_the_old_file_stays(tmp_path, monkeypatch):
    import errno

    import lora
    import toy

    target = tmp_path / "summary.json"
    dataio.atomic_write_json(target, {"old": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataio.os, "fsync", full)
    with pytest.raises(
        errors.DiskError, match=r"summary.json: cannot write \(No space left on dev"
    ):
        dataio.atomic_write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left
    monkeypatch.undo()

    def safetensors_full(*args, **kwargs):  # safetensors' own exception type, with the cause
        raise RuntimeError("Error while serializing: I/O error: No space left on device")

    model = lora.add_lora(toy.load_model(), r=2, alpha=4.0)
    monkeypatch.setattr("safetensors.torch.save_file", safetensors_full)
    with pytest.raises(errors.DiskError, match=r"adapter_model.safetensors: cannot write \(no sp"):
        lora.save_adapter(model, str(tmp_path / "ad"))
