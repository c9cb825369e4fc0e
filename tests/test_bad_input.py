"""The one-line error promise over a table of bad inputs: every script, in process, with bad flags,
devices, output directories, data files and adapters. Each case must end in `error: <message>` and
exit status 2, before a model loads (the toy tokenizer is the most a case may load), so a new flag
or script cannot quietly regress the promise."""

import dataclasses
import importlib
import json

import pytest

import cli
import errors

SCRIPTS = ["sft_think", "grpo", "dpo_online", "rlmt", "gkd", "karcher_merge", "eval_reasoning"]
TRAINERS = SCRIPTS[:5]

# flag -> (bad value, the start of the message after "error: ")
BAD_FLAGS = {
    "lr": [("0", "--lr 0.0: must be > 0.0"), ("nan", "--lr nan: must be"), ("inf", "--lr inf")],
    "max_steps": [("0", "--max-steps 0: must be >= 1"), ("-1", "--max-steps -1: must be >= 1")],
    "batch_size": [("0", "--batch-size 0: must be >= 1")],
    "micro_batch_size": [("-4", "--micro-batch-size -4: must be >= 1")],
    "top_p": [("0", "--top-p 0.0: must be > 0.0"), ("1.5", "--top-p 1.5: must be > 0.0 and")],
    "warmup_ratio": [("2", "--warmup-ratio 2.0: must be >= 0.0 and <= 1.0")],
    "max_new_tokens": [("0", "--max-new-tokens 0: must be >= 1")],
    "num_generations": [("1", "--num-generations 1: must be >= 2")],
    "eval_size": [("0", "--eval-size 0: must be >= 1")],
    "num_samples": [("0", "--num-samples 0: must be >= 1")],
    "lmbda": [("1.5", "--lmbda 1.5: must be >= 0.0 and <= 1.0")],
    "device": [("tpu", "--device tpu: expected auto, cpu, cuda or cuda:N")],
}


def fields(script: str) -> set[str]:
    return {f.name for f in dataclasses.fields(importlib.import_module(script).Args)}


def run(script: str, argv: list, capsys, monkeypatch) -> str:
    """The script's main in this process; returns its one error line (after "error: ")."""
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        cli.run_cli(module.main, module.Args, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(lines) == 1, (e.value.code, err[-2000:])
    return lines[0][len("error: ") :]


def flag_cases():
    for script in SCRIPTS:
        for name, cases in BAD_FLAGS.items():
            if name in fields(script):
                for value, message in cases:
                    yield pytest.param(script, name, value, message, id=f"{script}-{name}-{value}")
        if "temperature" in fields(script) and script in TRAINERS:
            message = "--temperature 0.0: must be > 0.0"
            yield pytest.param(script, "temperature", "0", message, id=f"{script}-temperature-0")


@pytest.mark.parametrize("script, name, value, message", list(flag_cases()))
def test_bad_flag_value(script, name, value, message, tmp_path, capsys, monkeypatch):
    flag = "--" + name.replace("_", "-")
    line = run(script, [flag, value, "--out", tmp_path / "run"], capsys, monkeypatch)
    assert line.startswith(message), line
    assert not (tmp_path / "run").exists()  # the flags are checked before anything is written


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_that_is_a_file_or_cannot_be_made(script, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    line = run(script, ["--out", tmp_path / "file"], capsys, monkeypatch)
    assert line == f"--out {tmp_path / 'file'}: a file is there, not a directory", line
    line = run(script, ["--out", tmp_path / "file" / "run"], capsys, monkeypatch)
    assert line.startswith(f"--out {tmp_path / 'file' / 'run'}: cannot write there"), line


# data rows that break the promise in a different way each: (file bytes, message after file:)
PROMPT = {"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def data_cases():
    def lines(rows):
        return "".join(json.dumps(r) + "\n" for r in rows).encode()

    good = {"sft_think": CHAT, "grpo": PROMPT, "gkd": {**CHAT}, "rlmt": {"prompt": "Say hi."}}
    for script, row in good.items():
        body = lines([row] * 30)
        yield script, b"\n" + body[:-1] + b'\xe9"\n', ":31: not UTF-8 text (byte 0xe9"
        yield script, lines([row] * 2) + b"\n" + b'{"x": \n' + lines([row] * 30), ":4: malformed"
        yield script, b"", ": empty file (no JSON lines)"
        key = "messages" if "messages" in row else "prompt"
        robot = {**row, key: [{"role": "robot", "content": "hi"}]}
        if key == "messages":
            robot[key].append({"role": "assistant", "content": "yo"})
        yield script, lines([row] * 3 + [robot] + [row] * 30), ":4: field "
    docs = lines([{"text": "A story. " * 80}] * 20)
    yield "dpo_online", docs[: len(docs) // 2] + b"\xff\n", ": not UTF-8 text (byte 0xff"


@pytest.mark.parametrize(
    "script, content, message", list(data_cases()), ids=lambda x: x if isinstance(x, str) else None
)
def test_bad_data_file_names_file_and_line(script, content, message, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    argv = ["--data", data, "--out", tmp_path / "run", "--init-adapter", ""]
    if script == "dpo_online":
        argv += ["--judge", "toy"]
    if script == "gkd":
        argv += ["--teacher", "toy"]
    line = run(script, argv, capsys, monkeypatch)
    assert line.startswith(str(data)) and message in line, line


@pytest.mark.parametrize("script", ["sft_think", "grpo", "dpo_online", "rlmt", "gkd"])
def test_missing_init_adapter(script, tmp_path, capsys, monkeypatch):
    argv = ["--init-adapter", tmp_path / "nothing", "--out", tmp_path / "run"]
    line = run(script, argv, capsys, monkeypatch)
    assert f"{tmp_path / 'nothing'}" in line, line


def adapter_copy(tmp_path, name: str):
    """A copy of the shipped toy thinking-SFT adapter in tmp_path/name."""
    import shutil

    import toy

    shutil.copytree(toy.SFT_ADAPTER_DIR, tmp_path / name)
    return tmp_path / name


def test_truncated_or_foreign_adapter_names_the_file_and_the_mismatch(
    tmp_path, capsys, monkeypatch
):
    from safetensors.torch import load_file, save_file

    torn = adapter_copy(tmp_path, "torn")
    weights = torn / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = run("grpo", ["--init-adapter", torn, "--out", tmp_path / "a"], capsys, monkeypatch)
    assert line.startswith(f"{weights}: not a readable safetensors file"), line

    foreign = adapter_copy(tmp_path, "foreign")
    weights = foreign / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:, :-1].contiguous()  # as if trained on a narrower model
    save_file(tensors, weights)
    line = run("gkd", ["--teacher-adapter", foreign, "--out", tmp_path / "b"], capsys, monkeypatch)
    assert line.startswith(f"{weights}: key '{key}' has shape"), line
    assert "the model expects" in line


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line_on_resume(tmp_path, capsys, monkeypatch):
    import sft_think

    out = tmp_path / "run"
    flags = ["--max-steps", "3", "--save-every", "1", "--toy-train-size", "16", "--eval-size", "2"]
    flags += ["--batch-size", "2", "--max-new-tokens", "4", "--out", out]
    cli.run_cli(sft_think.main, sft_think.Args, [str(a) for a in flags])
    part = out / "checkpoint" / "trainable.pt"
    part.write_bytes(part.read_bytes()[:100])
    line = run("sft_think", flags + ["--resume"], capsys, monkeypatch)
    assert line.startswith(f"{part}: truncated or not a checkpoint file"), line


def test_a_prompt_longer_than_the_context_is_an_error_not_an_allocation():
    import sampling
    import toy

    model, tokenizer = toy.load_model(), toy.load_tokenizer()
    context = model.config.max_position_embeddings
    with pytest.raises(
        errors.DataError, match=f"tokens is longer than the model's context of {context}"
    ):
        sampling.sample(model, tokenizer, ["a" * (context - 4)], max_new_tokens=8)


def test_a_document_longer_than_the_context_is_scored_on_what_fits():
    import likelihood
    import toy

    tokenizer = toy.load_tokenizer()
    short, long = "Milo the fox.", "Milo the fox went to the river. " * 100
    assert likelihood.cut_to_tokens(tokenizer, short, 64) == short
    cut = likelihood.cut_to_tokens(tokenizer, long, 64)
    assert long.startswith(cut) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 64


def test_an_arm_that_is_neither_a_model_nor_an_adapter(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    argv = ["--arms", f"x={tmp_path / 'empty'}", "--out", tmp_path / "run"]
    line = run("eval_reasoning", argv, capsys, monkeypatch)
    assert (
        line == f"{tmp_path / 'empty'}: a directory with neither a model (config.json) nor an "
        "adapter (adapter_model.safetensors)"
    ), line
