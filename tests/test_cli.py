"""What a user sees when something is wrong: one line `error: ...`, exit status 2, no traceback; and
--help."""

import json

import pytest
from conftest import free_port, run_script

import errors

# a one-line error, not the traceback POSTTRAIN_TRACEBACK=1 would add
ENV = {"OMP_NUM_THREADS": "1", errors.TRACEBACK_ENV: "0"}
SCRIPTS = [
    "sft_think.py",
    "grpo.py",
    "dpo_online.py",
    "rlmt.py",
    "eval_reasoning.py",
    "gkd.py",
    "karcher_merge.py",
]


def run(*argv, env=None):
    return run_script(*argv, env={**ENV, **(env or {})}, timeout=300, check=False)


def one_line_error(proc) -> str:
    """The run failed as a user error: status 2, no traceback, and its last stderr line is `error:
    ...`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_grpo_bad_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    line = one_line_error(
        run("grpo.py", "--data", data, "--init-adapter", "", "--out", tmp_path / "run")
    )
    assert line.startswith(f"error: {data}:2: malformed JSON"), line


def test_grpo_wrong_field_type_names_file_line_and_field(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "answer": "2"}) + "\n" for p in ["1+1=", 7] + ["3+3="] * 20
        )
    )
    line = one_line_error(
        run("grpo.py", "--data", data, "--init-adapter", "", "--out", tmp_path / "run")
    )
    assert line.startswith(f"error: {data}:2: field 'prompt': expected a string"), line


def test_sft_wrong_field_type_names_file_line_and_field(tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ] * 30
    rows[4] = {"messages": "hi there"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line_error(run("sft_think.py", "--data", data, "--out", tmp_path / "run"))
    assert line.startswith(f"error: {data}:5: field 'messages': expected a list"), line


def test_missing_init_adapter_is_one_line(tmp_path):
    line = one_line_error(
        run("grpo.py", "--init-adapter", tmp_path / "nothing", "--out", tmp_path / "run")
    )
    assert line.startswith(
        f"error: --init-adapter {tmp_path / 'nothing'}: no adapter_model.safetensors"
    ), line


def test_bad_flag_value_is_one_line_and_traceback_on_request(tmp_path):
    line = one_line_error(run("grpo.py", "--num-generations", "1", "--out", tmp_path / "run"))
    assert "--num-generations" in line
    proc = run(
        "grpo.py",
        "--num-generations",
        "1",
        "--out",
        tmp_path / "run",
        env={"POSTTRAIN_TRACEBACK": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("lr", 0.0, "--lr 0.0: must be > 0.0"),
        ("lr", float("nan"), "--lr nan: must be > 0.0"),
        ("lr", float("inf"), "--lr inf: must be > 0.0"),
        ("max_steps", 0, "--max-steps 0: must be >= 1"),
        ("batch_size", -2, "--batch-size -2: must be >= 1"),
        ("temperature", 0.0, "--temperature 0.0: must be > 0.0"),
        ("top_p", 0.0, "--top-p 0.0: must be > 0.0 and <= 1.0"),
        ("top_p", 1.5, "--top-p 1.5: must be > 0.0 and <= 1.0"),
        ("warmup_ratio", 1.2, "--warmup-ratio 1.2: must be >= 0.0 and <= 1.0"),
    ],
)
def test_check_flags_names_the_flag_its_value_and_range(flag, value, message):
    from dataclasses import dataclass

    import cli

    @dataclass
    class A(cli.TrainArgs):
        temperature: float = 1.0
        top_p: float = 1.0

    cli.check_flags(A(lr=1e-4))  # the defaults pass; a None (unset) field is not checked
    with pytest.raises(errors.ConfigError, match=f"^{message}$".replace("+", r"\+")):
        cli.check_flags(A(**{"lr": 1e-4, flag: value}))


def test_temperature_zero_is_greedy_for_an_evaluator_and_an_error_for_a_trainer():
    from dataclasses import dataclass

    import cli

    @dataclass
    class Evaluator:
        temperature: float = 0.0

    @dataclass
    class Trainer(cli.TrainArgs):
        temperature: float = 0.0

    cli.check_flags(Evaluator())
    with pytest.raises(errors.ConfigError, match=r"^--temperature 0.0: must be > 0.0$"):
        cli.check_flags(Trainer(lr=1e-4))
    with pytest.raises(errors.ConfigError, match=r"^--lora-alpha 0.0: must be > 0.0$"):
        cli.check_flags(Trainer(lr=1e-4, temperature=1.0, lora_alpha=0.0))


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_of_range_flag_stops_every_script_before_anything_loads(script, tmp_path):
    flag = "--max-new-tokens" if script in ("eval_reasoning.py", "karcher_merge.py") else "--lr"
    line = one_line_error(run(script, flag, "0", "--out", tmp_path / "run"))
    assert line.startswith(f"error: {flag} 0"), line
    assert not (tmp_path / "run").exists()  # nothing written, no model loaded


def test_bad_device_out_dir_and_bytes_are_one_line_before_anything_loads(tmp_path):
    line = one_line_error(run("sft_think.py", "--device", "tpu", "--out", tmp_path / "a"))
    assert line == "error: --device tpu: expected auto, cpu, cuda or cuda:N", line
    (tmp_path / "file").write_text("x")
    line = one_line_error(run("gkd.py", "--out", tmp_path / "file"))
    assert line == f"error: --out {tmp_path / 'file'}: a file is there, not a directory", line
    line = one_line_error(run("dpo_online.py", "--out", tmp_path / "file" / "run"))
    assert line.startswith(f"error: --out {tmp_path / 'file' / 'run'}: cannot write there"), line
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "caf\xe9", "answer": "2"}\n')
    line = one_line_error(run("grpo.py", "--data", data, "--out", tmp_path / "b"))
    assert line.startswith(f"error: {data}:3: not UTF-8 text (byte 0xe9"), line


def test_unreachable_judge_is_one_line_naming_the_url():
    port = free_port()
    code = (
        "import dataclasses, cli, judges\n"
        "@dataclasses.dataclass\n"
        "class Args:\n"
        "    pass\n"
        "def main(args):\n"
        f"    judges.HTTPJudge('http://127.0.0.1:{port}', 'm', retries=1, backoff=0.01, timeout=2)"
        ".score(['q'], ['a'])\n"
        "cli.run_cli(main, Args, [])\n"
    )
    proc = run_script("-c", code, env=ENV, timeout=120, check=False)
    line = one_line_error(proc)
    assert line.startswith(f"error: judge http://127.0.0.1:{port}/v1/chat/completions: "), line
    assert "refused" in line or "connect" in line, line


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_clean(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "%%" not in proc.stdout and "(default: None)" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_hub_model_defaults_follow_the_device(device, capsys):
    # the model cards' QLoRA setup (4-bit base, checkpointing, large rank, small lr) is for a CUDA
    # GPU; on a CPU a small real model trains in fp32 with a small rank and an lr that moves it in
    # tens of steps
    import dpo_online
    import gkd
    import grpo
    import rlmt

    cuda = device == "cuda"
    g = grpo.resolve_defaults(grpo.Args(model="smollm2", device=device))
    assert (g.lr, g.lora_r, g.lora_alpha) == ((1e-5, 128, 256.0) if cuda else (1e-4, 16, 32.0))
    assert g.load_in_4bit is g.gradient_checkpointing is cuda
    d = dpo_online.resolve_defaults(dpo_online.Args(model="smollm2", device=device))
    assert (d.lr, d.lora_r, d.gradient_checkpointing) == (
        (5e-6, 64, True) if cuda else (1e-4, 16, False)
    )
    r = rlmt.resolve_defaults(rlmt.Args(model="smollm2", device=device))
    assert (r.lr, r.lora_r, r.load_in_4bit, r.gradient_checkpointing) == (
        (1e-7, 64, True, True) if cuda else (1e-4, 16, False, False)
    )
    assert (r.max_steps, r.max_grad_norm) == (
        200,
        0.1,
    )  # the card's other settings stay on either device
    k = gkd.resolve_defaults(gkd.Args(model="smollm2", teacher="smollm2", device=device))
    assert (k.lr, k.lora_r, k.full) == (1e-4, 128 if cuda else 16, False)
    assert f"defaults for smollm2 on {device}: lr " in capsys.readouterr().out
    # a flag wins on either device; the toy keeps its own setup
    g = grpo.resolve_defaults(
        grpo.Args(model="smollm2", device=device, lr=3e-5, lora_r=8, load_in_4bit=False)
    )
    assert (g.lr, g.lora_r, g.load_in_4bit, g.gradient_checkpointing) == (3e-5, 8, False, cuda)
    t = grpo.resolve_defaults(grpo.Args(device=device))
    assert (t.lr, t.lora_r, t.load_in_4bit, t.gradient_checkpointing) == (3e-4, 16, False, False)
    assert gkd.resolve_defaults(gkd.Args(device=device)).lora_r == 128
