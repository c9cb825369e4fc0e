"""eval_reasoning.py: pass@k, answer checking, intervals, the benchmark loaders, a toy run, a kill
and a rerun, and the server backend against a real `transformers serve`."""

import json
import math
import random
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_script, script_env, start_transformers_serve, stop_server

import answers
import benchmarks
import dataio
import errors
import eval_reasoning as ev
import likelihood
import lora
import stats
import toy

ENV = {"OMP_NUM_THREADS": "2"}
SMALL = [
    "--limit",
    "6",
    "--num-samples",
    "4",
    "--max-new-tokens",
    "48",
    "--batch-size",
    "2",
    "--arms",
    f"base=,think={toy.sft_adapter_dir()}",
    "--benchmarks",
    "toy_gsm8k,toy_gpqa",
]


def run_eval(out, *flags, kill_at=0, calls_log=None, expect=0):
    """eval_reasoning.py under tests/_kill_after_samples.py (killed at its `kill_at`-th sampling
    call, 0: never), logging its sampling calls to `calls_log`."""
    calls_log = calls_log or Path(out).parent / f"{Path(out).name}.calls"
    return run_script(
        "tests/_kill_after_samples.py",
        kill_at,
        "eval_reasoning.py",
        "--out",
        out,
        *flags,
        env={**ENV, "SAMPLE_CALLS_LOG": str(calls_log)},
        expect=expect,
    )


# ---- pass@k and answers --------------------------------------------------------------------------
def test_pass_at_k_is_the_unbiased_estimator():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 40)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert ev.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    assert (
        ev.pass_at_k(8, 0, 8) == 0.0
        and ev.pass_at_k(8, 1, 8) == 1.0
        and ev.pass_at_k(8, 2, 1) == 0.25
    )
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 5, 1)


EQUIVALENT = [
    ("gsm8k", "So she has 1,234 apples.\n#### 1,234", "1234"),
    ("gsm8k", "<think>2+2=4</think>The answer is 72.", "#### 72"),
    ("gsm8k", "We get 5 then 18.", "18"),
    ("math500", "Hence \\boxed{\\dfrac{3}{4}}.", "\\frac{3}{4}"),
    ("math500", "so $\\boxed{0.5}$", "\\frac12"),
    ("math500", "\\boxed{(1, \\frac{1}{2}]}", "(1,\\frac12]"),
    ("math500", "\\boxed{[0, 2)}", "[0,2)"),
    ("math500", "\\boxed{12\\text{ cm}}", "12"),
    ("math500", "\\boxed{10\\%}", "10"),
    ("math500", "\\boxed{1,000}", "1000"),
    ("math500", "\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt2}{2}"),
    ("math500", "\\boxed{x^2+1}", "1+x^2"),
    ("olympiadbench", "first \\boxed{3}, finally \\boxed{\\frac{7}{2}}", "3.5"),
    ("gpqa", "It must be the second.\nAnswer: B", "B"),
    ("toy_gpqa", "Answer: (c)", "C"),
]
DIFFERENT = [
    ("gsm8k", "#### 12", "13"),
    ("math500", "\\boxed{(1,2]}", "[1,2]"),
    ("math500", "\\boxed{2x}", "2"),
    ("math500", "no box: 0.5", "\\frac12"),
    ("math500", "<think>\\boxed{4}", "4"),  # a thought never closed shows no answer
    ("math500", "\\boxed{__import__('os')}", "0"),  # untrusted text is parsed, never run
    ("gpqa", "Answer: A", "B"),
]


def is_correct(bench, completion, gold):
    """Graded as the evaluation grades `bench`: by its answer rule."""
    return answers.is_correct(benchmarks.RULE[bench], completion, gold)


@pytest.mark.parametrize("bench,completion,gold", EQUIVALENT)
def test_is_correct_on_equivalent_forms(bench, completion, gold):
    assert is_correct(bench, completion, gold)


@pytest.mark.parametrize("bench,completion,gold", DIFFERENT)
def test_is_correct_rejects_different_answers(bench, completion, gold):
    assert not is_correct(bench, completion, gold)


def test_extract_reads_the_visible_answer_by_rule_and_unknown_rules_are_refused():
    assert answers.extract("gsm8k", "<think>#### 3</think>so 1,234 then #### 7") == "7"
    assert answers.extract("math", "\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert answers.extract("mc", "Answer: (c)") == "C"
    assert answers.extract("mc", "<think>Answer: B") is None  # a thought never closed
    with pytest.raises(ValueError, match="unknown answer rule 'boxed'"):
        answers.is_correct("boxed", "\\boxed{1}", "1")


def test_the_fallback_without_math_verify_still_decides_numbers_and_intervals(monkeypatch):
    monkeypatch.setattr(answers, "_math_verify_equal", lambda gold, pred: False)
    for bench, completion, gold in EQUIVALENT:
        symbolic = "sqrt" in gold or "x^2" in gold
        assert is_correct(bench, completion, gold) is (not symbolic), (completion, gold)
    v = answers.MathVerifier()
    v.available = False
    assert v.check([("1+x^2", "x^2+1"), ("3", "3.0")]) == [False, True] and v.undecided == 1


def _answer_after(gold, pred, seconds):  # stands in for Math-Verify in the worker tests below
    if pred == "slow":
        time.sleep(60)
    return "timeout" if pred == "hard" else ("yes" if pred == "same" else "no")


@pytest.mark.slow
def test_math_verifier_counts_timeouts_and_kills_a_stuck_worker():
    with answers.MathVerifier(workers=1, timeout=1, worker=_answer_after) as v:
        assert v.check([("a", "same"), ("a", "hard"), ("a", "other"), ("7", "7")]) == [
            True,
            False,
            False,
            True,
        ]
        assert v.timeouts == 1
        t0 = time.perf_counter()
        assert v.check([("a", "slow"), ("a", "same")]) == [
            False,
            False,
        ]  # the pool went with the stuck worker
        assert time.perf_counter() - t0 < 30 and v.timeouts == 3
        assert v.check([("a", "same")]) == [True]  # a new pool


def test_real_math_verify_in_worker_processes():
    pytest.importorskip("math_verify")
    with answers.MathVerifier(workers=1, timeout=5) as v:
        assert v.check(
            [("1+x^2", "x^2+1"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("\\pi", "3.14")]
        ) == [True, True, False]
        assert v.timeouts == 0


def test_intervals_wilson_for_small_binary_sets_and_paired_deltas():
    lo, hi = ev.interval([1.0] * 5 + [0.0] * 5)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # Wilson, 5 of 10
    s = [0.25, 0.5, 0.75, 1.0]
    lo, hi = ev.interval(s)
    half = 1.96 * math.sqrt(sum((x - 0.625) ** 2 for x in s) / 3) / 2
    assert (lo, hi) == pytest.approx((0.625 - half, 0.625 + half))
    mean, se, ci = stats.paired_interval([0.5, 0.5, 0.25], [1.0, 0.5, 0.75])
    assert mean == pytest.approx(1 / 3) and ci[0] < mean < ci[1]
    # a rate's interval stays in [0, 1] and a difference of rates' in [-1, 1], however wide the
    # normal one is
    lo, hi = ev.interval([1.0, 1.0, 1.0, 0.5])
    assert lo == pytest.approx(0.875 - 1.96 * 0.25 / 2) and hi == 1.0
    assert (
        ev.interval([0.0, 0.0, 0.5])[0] == 0.0 and ev.interval([0.0] * 400 + [1.0])[0] == 0.0
    )  # normal, n > 300
    _, _, ci = stats.paired_interval([0.0, 0.0, 1.0], [1.0, 1.0, 0.0])
    assert ci[1] == 1.0 and ci[0] > -1.0
    _, _, ci = stats.paired_interval([1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    assert ci[0] == -1.0
    assert all(math.isnan(x) for x in ev.interval([0.5]))


def test_wilson_interval_by_hand():
    z = 1.96
    for mean, n in [(0.5, 10), (0.0, 7), (1.0, 198), (0.3, 40)]:
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert stats.wilson(mean, n) == pytest.approx([centre - half, centre + half], abs=1e-15)
    lo, hi = stats.wilson(0.0, 7)  # no zero width at the edge, and inside [0, 1]
    assert lo == pytest.approx(0.0, abs=1e-15) and 0.3 < hi < 0.4
    lo, hi = stats.wilson(1.0, 198)
    assert 0.97 < lo < 1.0 and hi == pytest.approx(1.0)


def test_benchmarks_and_likelihood_tasks_chosen_by_flag_or_by_model():
    assert benchmarks.chosen(" gsm8k, ,math500 ", "toy") == ["gsm8k", "math500"]
    assert benchmarks.chosen("auto", "toy") == ["toy_gsm8k", "toy_math", "toy_gpqa", "toy_olympiad"]
    assert benchmarks.chosen("auto", "Qwen/Qwen3-0.6B-Base") == [
        "gsm8k",
        "math500",
        "gpqa",
        "olympiadbench",
    ]
    assert likelihood.suite_tasks("piqa,toy_arc", "toy") == ["piqa", "toy_arc"]
    assert likelihood.suite_tasks("auto", "toy") == ["toy_lambada", "toy_arc", "toy_piqa"]
    assert likelihood.suite_tasks("auto", "org/m") == ["lambada_openai", "arc_easy", "piqa"]


def test_score_benchmark_counts_per_question():
    def sample(ok, tokens=10, finish="stop"):
        return {"correct": ok, "tokens": tokens, "finish_reason": finish}

    row = ev.score_benchmark(
        {
            "q1": [sample(True), sample(False)],
            "q2": [sample(False), sample(False, 30, "length")],
            "q3": [],
        },
        k=2,
    )
    assert row["mean_at_k"] == 0.25 and row["pass_at_1"] == 0.25 and row["pass_at_2"] == 0.5
    assert (
        row["problems"],
        row["missing_problems"],
        row["samples"],
        row["correct"],
        row["any_pass"],
    ) == (2, 1, 4, 1, 1)
    assert row["avg_completion_tokens"] == 15 and row["truncation_rate"] == 0.25
    empty = ev.score_benchmark(
        {"q1": [], "q2": []}, k=2
    )  # every request failed: counted, not scored
    assert (empty["problems"], empty["missing_problems"]) == (0, 2) and math.isnan(
        empty["mean_at_k"]
    )


# ---- loaders -------------------------------------------------------------------------------------
def test_gpqa_choices_seeded_recorded_and_gold_follows_them(tmp_path):
    path = tmp_path / "gpqa.jsonl"
    rows = [
        {
            "Record ID": f"r{i}",
            "Question": f"Q{i}?",
            "Correct Answer": f"right{i}",
            "Incorrect Answer 1": "w1",
            "Incorrect Answer 2": "w2",
            "Incorrect Answer 3": "w3",
        }
        for i in range(20)
    ]
    dataio.write_jsonl(path, rows)
    probs = benchmarks.load_benchmark("gpqa", str(path), seed=0)
    assert [p["choices"]["ABCD".index(p["gold"])] for p in probs] == [
        f"right{i}" for i in range(20)
    ]
    assert len({p["gold"] for p in probs}) > 1 and all("D) " in p["prompt"] for p in probs)
    assert benchmarks.load_benchmark("gpqa", str(path), seed=0) == probs
    assert [p["choices"] for p in benchmarks.load_benchmark("gpqa", str(path), seed=1)] != [
        p["choices"] for p in probs
    ]
    rows[3].pop("Incorrect Answer 2")
    dataio.write_jsonl(path, rows)
    with pytest.raises(errors.DataError, match=rf"^{path}:4: field 'Incorrect Answer 2': missing"):
        benchmarks.load_benchmark("gpqa", str(path))


def test_gsm8k_math500_olympiadbench_local_files(tmp_path):
    dataio.write_jsonl(tmp_path / "g.jsonl", [{"question": "2+3?", "answer": "2+3=5\n#### 5"}])
    dataio.write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "problem": "Half?",
                "solution": "...",
                "answer": "\\frac12",
                "unique_id": "test/x/1.json",
            }
        ],
    )
    dataio.write_jsonl(
        tmp_path / "o.jsonl", [{"id": 7, "question": "Find x.", "final_answer": ["$3$"]}]
    )
    (g,), (m,), (o,) = (
        benchmarks.load_benchmark(b, str(tmp_path / f))
        for b, f in (("gsm8k", "g.jsonl"), ("math500", "m.jsonl"), ("olympiadbench", "o.jsonl"))
    )
    assert (g["gold"], m["gold"], m["id"], o["gold"], o["id"]) == (
        "5",
        "\\frac12",
        "test/x/1.json",
        "$3$",
        "7",
    )
    assert "\\boxed{}" in m["prompt"] and "####" in g["prompt"]
    assert is_correct("olympiadbench", "\\boxed{3}", o["gold"])
    with pytest.raises(errors.ConfigError, match="unknown benchmark 'aime'"):
        benchmarks.load_benchmark("aime")


# ---- runs ----------------------------------------------------------------------------------------
def _summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def _first_table(out):
    return (out / "tables.md").read_text().split("\n\n")[0]


@pytest.mark.slow
def test_toy_run_writes_tables_summary_and_samples(tmp_path):
    proc = run_eval(tmp_path / "run", *SMALL)
    assert (
        "| Arm | Benchmark | Mean@4 |" in proc.stdout and "| think vs base | Macro |" in proc.stdout
    )
    s = _summary(tmp_path / "run")
    r = s["results"]["think"]["benchmarks"]["toy_gsm8k"]
    assert r["problems"] == 6 and r["samples"] == 24 and r["mean_at_k"] <= r["pass_at_4"]
    assert r["correct"] == round(r["mean_at_k"] * 24) and r["any_pass"] == round(r["pass_at_4"] * 6)
    assert s["results"]["think"]["generated_tokens_per_second"] > 0
    # the thinking-SFT adapter solves toy GSM8K problems the base does not
    assert r["mean_at_k"] > s["results"]["base"]["benchmarks"]["toy_gsm8k"]["mean_at_k"] + 0.3
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 6 * 4 and all(
        {"extracted", "correct", "finish_reason"} <= set(x) for x in samples
    )
    assert (tmp_path / "run" / "tables.md").is_file()
    assert (tmp_path / "run" / "arms.png").stat().st_size > 0  # the arms side by side


@pytest.mark.slow
def test_killed_run_reruns_to_the_same_results_without_redrawing(tmp_path):
    full = run_eval(tmp_path / "full", *SMALL, calls_log=tmp_path / "full.calls")
    total_calls = len((tmp_path / "full.calls").read_text().split())
    run_eval(tmp_path / "cut", *SMALL, kill_at=5, calls_log=tmp_path / "cut1.calls", expect=137)
    before = (tmp_path / "cut" / "generations.jsonl").read_text().splitlines()
    assert len(before) == 4 * 2 * 4  # 4 chunks of 2 problems x 4 samples
    run_eval(tmp_path / "cut", *SMALL, calls_log=tmp_path / "cut2.calls")
    after = (tmp_path / "cut" / "generations.jsonl").read_text().splitlines()
    assert (
        after[: len(before)] == before
        and len({json.loads(x)["key"] for x in after}) == len(after) == 2 * 2 * 6 * 4
    )
    assert (
        len((tmp_path / "cut2.calls").read_text().split()) == total_calls - 4
    )  # finished chunks not drawn again
    a, b = _summary(tmp_path / "full"), _summary(tmp_path / "cut")
    for arm in ("base", "think"):
        for bench in ("toy_gsm8k", "toy_gpqa"):
            ra, rb = a["results"][arm]["benchmarks"][bench], b["results"][arm]["benchmarks"][bench]
            assert {k: v for k, v in ra.items()} == {k: v for k, v in rb.items()}, (arm, bench)
    assert _first_table(tmp_path / "full") == _first_table(tmp_path / "cut")
    assert "| Arm |" in full.stdout


@pytest.mark.slow
def test_server_backend_against_transformers_serve_stopped_mid_run_and_rerun(tmp_path):
    port = free_port()
    flags = [
        "--arms",
        f"served=http://127.0.0.1:{port}",
        "--server-model",
        str(toy.base_model_dir()),
        "--benchmarks",
        "toy_gsm8k",
        "--limit",
        "12",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "24",
        "--temperature",
        "1.0",
        "--concurrency",
        "1",
        "--retries",
        "1",
        "--timeout",
        "60",
    ]
    out = tmp_path / "srv"
    proc = start_transformers_serve(port)
    try:
        cmd = [sys.executable, "eval_reasoning.py", "--out", str(out), *flags]
        ev_proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=script_env(ENV),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cache = out / "generations.jsonl"
        deadline = time.time() + 240
        while not (cache.is_file() and len(cache.read_text().splitlines()) >= 4):
            assert ev_proc.poll() is None and time.time() < deadline, ev_proc.communicate()[0][
                -3000:
            ]
            time.sleep(0.2)
    finally:
        stop_server(proc)
    log = ev_proc.communicate(timeout=300)[0]
    assert ev_proc.returncode == 2, log[-3000:]
    # the error line itself names the server and the cause
    error = [line for line in log.splitlines() if line.startswith("error: ")][-1]
    assert "request(s) failed after their retries" in error, log[-3000:]
    assert "connection refused" in error and "http://127.0.0.1:" in error, error
    kept = cache.read_text().splitlines()
    assert 4 <= len(kept) < 24
    rows = [json.loads(x) for x in kept]
    assert all(r["finish_reason"] in ("stop", "length") and r["tokens"] > 0 for r in rows)
    proc = start_transformers_serve(port)
    try:
        run_script(*cmd[1:], env=ENV, timeout=600)
    finally:
        stop_server(proc)
    final = cache.read_text().splitlines()
    assert (
        final[: len(kept)] == kept
        and len({json.loads(x)["key"] for x in final}) == len(final) == 24
    )
    r = _summary(out)["results"]["served"]["benchmarks"]["toy_gsm8k"]
    assert r["samples"] == 24 and r["problems"] == 12
    texts = {}
    for x in map(json.loads, final):
        texts.setdefault(x["problem"], set()).add(x["text"])
    assert any(
        len(t) > 1 for t in texts.values()
    )  # samples at T=1 differ: the server did not decode greedily


@pytest.mark.slow
def test_likelihood_suite_from_the_cli(tmp_path):
    proc = run_eval(tmp_path / "lik", "--suite", "likelihood", "--limit", "24", "--arms", "base=")
    assert "| base | toy_arc | 24 |" in proc.stdout
    lik = _summary(tmp_path / "lik")["likelihood"]["base"]
    assert set(lik) == {"toy_lambada", "toy_arc", "toy_piqa"} and lik["toy_piqa"]["acc"] > 0.6
    assert math.isfinite(lik["toy_lambada"]["perplexity"])


@pytest.mark.parametrize(
    "flags,start",
    [
        (["--benchmarks", "aime"], "error: --benchmarks: unknown benchmark 'aime'"),
        (["--arms", "justaname"], "error: --arms 'justaname': each arm is name=spec"),
        (["--compare", "x-base"], "error: --compare 'x-base': arms are base, think"),
        (
            ["--benchmarks", "gsm8k", "--data", "gsm8k=missing.jsonl"],
            "error: missing.jsonl: no such file",
        ),
    ],
)
def test_bad_flags_are_one_line(tmp_path, flags, start):
    proc = run_eval(tmp_path / "bad", *flags, expect=2)
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert lines and lines[-1].startswith(start), proc.stderr[-2000:]


def test_arms_are_written_out_with_their_lineage_and_the_init_adapter(tmp_path):
    import shutil

    rl = tmp_path / "rl"  # an adapter "trained on top of" toy/sft_think, as args.json records it
    shutil.copytree(toy.SFT_FORMATS_DIR, rl)
    (rl / "args.json").write_text(json.dumps({"init_adapter": str(toy.SFT_ADAPTER_DIR)}))
    sft, fmt = str(toy.SFT_ADAPTER_DIR), str(toy.SFT_FORMATS_DIR)
    arms = lora.with_lineages({"base": "", "rl": str(rl), "both": f"{sft}+{rl}"}, "")
    assert arms == {"base": "", "rl": f"{sft}+{rl}", "both": f"{sft}+{rl}"}
    arms = lora.with_lineages({"base": "", "rl": str(rl)}, fmt)
    assert arms == {"base": fmt, "rl": f"{fmt}+{sft}+{rl}"}
    with pytest.raises(errors.ConfigError, match="server"):
        lora.with_lineages({"srv": "http://127.0.0.1:1"}, fmt)
    (rl / "args.json").write_text(json.dumps({"init_adapter": str(tmp_path / "gone")}))
    with pytest.raises(errors.MissingError, match="gone"):
        lora.with_lineages({"rl": str(rl)}, "")


def test_auto_arms_take_toy_runs_that_have_their_args(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(
        toy.SFT_FORMATS_DIR, tmp_path / "runs" / "sft_think"
    )  # adapter weights, no args.json
    shutil.copytree(toy.SFT_FORMATS_DIR, tmp_path / "runs" / "grpo")
    (tmp_path / "runs" / "grpo" / "args.json").write_text(json.dumps({"model": "toy"}))
    arms = lora.resolve_arms("auto", "toy")
    assert arms["runs_grpo"] == str(Path("runs") / "grpo") and "runs_sft_think" not in arms
    assert lora.resolve_arms("auto", "Qwen/Qwen3-0.6B-Base") == {"base": ""}
