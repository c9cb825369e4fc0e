"""dpo_online.py: the DPO losses by hand, pair selection, one pass per candidate (counted, and the
same gradient as a forward per pair), short runs as subprocesses, --resume, the HTTP judge end to
end (cache, a killed server)."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_script, save_tiny_qwen3, start_transformers_serve, stop_server

import dpo_online
import judges
import lora
import sampling
import tasks
import toy

ENV = {"OMP_NUM_THREADS": "1"}
TINY = [
    "--max-steps",
    "2",
    "--batch-size",
    "2",
    "--num-rollouts",
    "3",
    "--prefix-tokens",
    "128",
    "--suffix-tokens",
    "16",
    "--eval-size",
    "6",
    "--save-every",
    "0",
    "--log-completions",
    "1",
    "--include-original",
]


def run_dpo(out: Path, *flags: str, expect: int = 0, timeout: int = 600):
    """dpo_online.py at test size (TINY) into `out`."""
    return run_script(
        "dpo_online.py", "--out", out, *TINY, *flags, env=ENV, timeout=timeout, expect=expect
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The losses and the pairs, by hand
# ---------------------------------------------------------------------------------------------


def test_dpo_losses_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0, -7.0]), torch.tensor([-12.0, -3.0, -7.0])
    rc, rr = torch.tensor([-11.0, -4.0, -6.0]), torch.tensor([-11.0, -4.0, -8.0])
    h = [(-10 + 12) - (-11 + 11), (-4 + 3) - (-4 + 4), (-7 + 7) - (-6 + 8)]  # = [2, -1, -2]
    beta = 0.5
    sig = dpo_online.dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    assert sig.tolist() == pytest.approx([math.log1p(math.exp(-beta * x)) for x in h], rel=1e-6)
    ipo = dpo_online.dpo_loss(pc, pr, rc, rr, beta, "ipo")
    assert ipo.tolist() == pytest.approx(
        [(x - 1 / (2 * beta)) ** 2 for x in h], rel=1e-6
    )  # (2-1)^2, (-2)^2, (-3)^2
    assert ipo.tolist() == pytest.approx([1.0, 4.0, 9.0])
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_online.dpo_loss(pc, pr, rc, rr, beta, "hinge")


def test_select_pairs():
    rng = random.Random(0)
    assert dpo_online.select_pairs([0.5, 0.5, 0.5], "best-worst", rng) == []  # all tied: no pair
    assert dpo_online.select_pairs([0.9, None], "all", rng) == []  # one scored candidate
    assert dpo_online.select_pairs([0.2, 0.9, None, 0.1], "best-worst", rng) == [(1, 3, 1.0)]
    # ties at the top are broken at random, so the original suffix (candidate 0) is not always the
    # chosen one
    chosen = {
        dpo_online.select_pairs([1.0, 1.0, 0.0], "best-worst", random.Random(s))[0][0]
        for s in range(20)
    }
    assert chosen == {0, 1}
    pairs = dpo_online.select_pairs([0.75, 0.25, 0.25, 1.0], "all", rng)
    assert sorted((c, r) for c, r, _ in pairs) == [(0, 1), (0, 2), (3, 0), (3, 1), (3, 2)]
    assert all(w == pytest.approx(1 / 5) for _, _, w in pairs)


def test_load_windows_skips_short_documents_or_names_them(tmp_path):
    data = tmp_path / "docs.jsonl"
    docs = [{"text": "b" * 10}] + [{"text": "a" * 30, "domain": "story"}] * 12
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    args = dpo_online.Args(data=str(data), prefix_tokens=20, suffix_tokens=8, eval_size=2)
    args.skip_short_documents = True
    train, heldout, skipped = tasks.document_windows(toy.load_tokenizer(), args)
    assert (len(train), len(heldout), skipped) == (11, 1, 1)
    w = train[0]
    assert (w["prefix"], w["continuation"], w["domain"]) == ("a" * 20, "a" * 8, "story")
    assert (len(w["prefix_ids"]), len(w["continuation_ids"])) == (20, 8)
    args.skip_short_documents = False
    with pytest.raises(
        dpo_online.errors.DataError,
        match=rf"^{re.escape(str(data))}:1: field 'text': 10 tokens, shorter than "
        r"--prefix-tokens 20 \+ --suffix-tokens 8 \(or pass --skip-short-documents\)$",
    ):
        tasks.document_windows(toy.load_tokenizer(), args)


# ---------------------------------------------------------------------------------------------
# One reference and one policy pass per candidate; the same gradient as a forward per pair
# ---------------------------------------------------------------------------------------------


def _tiny_policy(seed=0):
    """A random policy at the toy base's architecture (not conftest's tiny Qwen3): its ids are the
    toy tokenizer's, and evaluate() samples from it with that tokenizer."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(toy.tiny_config())
    lora.add_lora(model, r=4, alpha=8)
    with torch.no_grad():  # LoRA B starts at 0; make the policy differ from the reference
        for p in lora.lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    return model


def _judged(K: int, pairs: str) -> dpo_online.Judged:
    g = torch.Generator().manual_seed(1)
    windows, candidates, chosen = [], [], []
    for b in range(3):
        ids = torch.randint(6, 100, (10 + 3 * b,), generator=g).tolist()
        cands = [
            torch.randint(6, 100, (4 + (i * 3 + b) % 7,), generator=g).tolist()
            for i in range(K + 1)
        ]
        windows.append({"prefix_ids": ids})
        candidates.append(cands)
        scores = torch.rand(K + 1, generator=g).tolist()
        chosen.append(dpo_online.select_pairs(scores, pairs, random.Random(b)))
    return dpo_online.Judged(
        windows=windows,
        candidates=candidates,
        texts=[],
        pairs=chosen,
        metrics={},
        samples=[],
        num_tokens=0,
    )


def _naive_loss(model, judged, beta, loss_type):
    """Two forwards per pair (and two more with LoRA off), the way it is often written: the loss,
    and each pair's implicit rewards (beta (log pi - log pi_ref) of chosen and rejected)."""
    total, n, rewards = 0.0, sum(1 for p in judged.pairs if p), []
    for w, cands, pairs in zip(judged.windows, judged.candidates, judged.pairs):
        for c, r, weight in pairs:

            def s(i):
                roll = sampling.rollout_from_tokens([w["prefix_ids"]], [cands[i]], 0, "cpu")
                return dpo_online.summed_logprobs(model, roll)[0]

            with torch.no_grad(), lora.disabled(model):
                ref_c, ref_r = s(c), s(r)
            pol_c, pol_r = s(c), s(r)
            total = total + weight * dpo_online.dpo_loss(
                pol_c, pol_r, ref_c, ref_r, beta, loss_type
            )
            rewards.append((beta * (pol_c - ref_c).item(), beta * (pol_r - ref_r).item()))
    return total / n, rewards


@pytest.mark.parametrize("pairs, loss_type", [("all", "sigmoid"), ("best-worst", "ipo")])
def test_update_one_pass_per_candidate_and_the_naive_gradient(pairs, loss_type):
    K = 3
    model = _tiny_policy()
    judged = _judged(K, pairs)
    params = lora.lora_parameters(model)
    # sequences through the decoder: the reference passes run without gradients
    counter = {"reference": 0, "policy": 0}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counter["policy" if torch.is_grad_enabled() else "reference"] += ids.shape[0]

    hook = model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    args = dpo_online.Args(beta=0.2, loss=loss_type, micro_batch_size=6)
    stats = dpo_online.update(model, judged, args, pad_id=0, world=1)
    hook.remove()
    ours = [p.grad.clone() for p in params]
    in_pairs = sum(len({i for c, r, _ in p for i in (c, r)}) for p in judged.pairs)
    assert counter == {"reference": in_pairs, "policy": in_pairs}
    if (
        pairs == "all"
    ):  # every candidate is in some pair: K + 1 sequence passes per prefix, not two per pair
        assert in_pairs == 3 * (K + 1) and sum(len(p) for p in judged.pairs) > 3 * (K + 1)
    else:
        assert in_pairs == 3 * 2
    for p in params:
        p.grad = None
    naive, rewards = _naive_loss(model, judged, 0.2, loss_type)
    naive.backward()
    assert stats["loss"] == pytest.approx(naive.item(), rel=1e-5)
    for a, p in zip(ours, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-3 * float(p.grad.abs().max()))
    # the logged rewards are plain means over the pairs (not weighted), as TRL logs them
    chosen, rejected = (sum(x[k] for x in rewards) / len(rewards) for k in (0, 1))
    assert stats["rewards/chosen"] == pytest.approx(chosen, rel=1e-4, abs=1e-6)
    assert stats["rewards/rejected"] == pytest.approx(rejected, rel=1e-4, abs=1e-6)
    accuracy = sum(c > r for c, r in rewards) / len(rewards)
    assert 0.0 < accuracy < 1.0 and stats["rewards/accuracies"] == pytest.approx(accuracy)
    assert stats["rewards/margins"] == pytest.approx(
        stats["rewards/chosen"] - stats["rewards/rejected"]
    )


def test_evaluate_with_a_judge_that_never_parses_is_an_error():
    class Mute:
        calls = invalid = 0

        def prefer_ordered(self, prefixes, first, second):
            self.calls += len(first)
            self.invalid += len(first)
            return [None] * len(first)

        prefer = prefer_ordered

    model = _tiny_policy()
    tok = toy.load_tokenizer()
    held = [
        {
            "prefix_ids": tok("Milo the fox", add_special_tokens=False)["input_ids"],
            "prefix": "Milo the fox",
        }
    ]
    with pytest.raises(
        judges.JudgeError,
        match=r"no held-out comparison got a valid verdict .*2 of 2 verdicts invalid",
    ):
        dpo_online.evaluate(model, tok, held, Mute(), dpo_online.Args(suffix_tokens=4))


# ---------------------------------------------------------------------------------------------
# Script runs
# ---------------------------------------------------------------------------------------------

EXPECTED = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "chosen/original_share",
    "chosen/rollout_share",
    "judge/tie_rate",
    "judge/invalid_rate",
    "judge/position_consistency",
    "judge/calls",
    "grad_norm",
    "step_time",
]


@pytest.mark.slow
def test_tiny_run_outputs(tmp_path):
    out = tmp_path / "run"
    run_dpo(out, "--save-every", "1")
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 2
    for key in EXPECTED:
        assert all(math.isfinite(r[key]) for r in rows), key
    # 2 prefixes x C(4, 2) pairs x 2 orders with the toy judge, every verdict valid
    assert all(r["judge/calls"] == 2 * 6 * 2 and r["judge/invalid_rate"] == 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    held = summary["heldout"]
    assert held["metric"] == "win_rate_vs_base" and held["before"] == 0.5
    assert (out / lora.WEIGHTS_NAME).is_file() and (out / "checkpoint").is_dir()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples[0]["candidates"]) == 4 and samples[0]["candidates"][0]["original"]
    # the win rate and its interval, recomputed from the 6 held-out comparisons it logged
    wins = [s["win"] for s in samples if s.get("stage") == "after" and s["win"] is not None]
    n, mean = len(wins), sum(wins) / len(wins)
    half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in wins) / (n - 1)) / math.sqrt(n)
    assert n == summary["after"]["compared"] == 6 and held["after"] == pytest.approx(mean)
    assert held["interval"] == pytest.approx([max(0.0, mean - half), min(1.0, mean + half)])
    # --eval-only on the adapter it wrote
    ev = tmp_path / "eval"
    run_dpo(ev, "--eval-only", str(out))
    assert json.loads((ev / "summary.json").read_text())["heldout"]["metric"] == "win_rate_vs_base"


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    flags = ["--max-steps", "3", "--save-every", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_dpo(full, *flags)
    run_script(
        "tests/_kill_after_checkpoint.py",
        "2",
        "dpo_online.py",
        "--out",
        cut,
        *TINY,
        *flags,
        env=ENV,
        timeout=600,
        expect=137,
    )
    assert not (cut / "summary.json").exists()
    run_dpo(cut, *flags, "--resume")
    from safetensors.torch import load_file

    a, b = load_file(full / lora.WEIGHTS_NAME), load_file(cut / lora.WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(full) if "loss" in r] == [
        r["loss"] for r in metrics(cut) if "loss" in r
    ]


def test_bad_input_is_one_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    rows = [{"text": "long enough " * 20}] * 10
    rows[6] = {"text": "short"}
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_dpo(tmp_path / "a", "--data", str(docs), "--judge", "toy", expect=2)
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"error: {docs}:7: field 'text': 5 tokens")
    ), proc.stderr
    proc = run_dpo(tmp_path / "b", "--data", str(docs), expect=2)
    assert "--judge: documents other than the toy ones need a judge" in proc.stderr


# ---------------------------------------------------------------------------------------------
# The HTTP judge end to end: a judge server on 127.0.0.1 speaking the OpenAI chat API
# ---------------------------------------------------------------------------------------------


def toy_judge_reply():
    """A `respond` for conftest's FakeOpenAIServer: the paper's quality prompt answered with the toy
    continuation judge's verdict, in words ending "Conclusion: Option N", as an LLM judge would."""
    judge = toy.ContinuationJudge()

    def respond(path: str, body: dict, index: int) -> str:
        user = body["messages"][-1]["content"]
        prefix, _, rest = user.partition("Original text fragment:\n")[2].partition(
            "\n\nOption 1:\n"
        )
        first, _, rest = rest.partition("\n\nOption 2:\n")
        second = rest.rpartition("\n\nJudge which continuation")[0]
        p = judge.prefer([prefix], [first], [second])[0]
        return "I compared the two.\n\nConclusion: Option " + (
            "1" if p is not None and p >= 0.5 else "2"
        )

    return respond


def no_verdict(path: str, body: dict, index: int) -> str:
    return "Both are fine, I think."


@pytest.mark.slow
def test_http_judge_run_cache_and_dead_server(tmp_path, openai_server):
    server = openai_server(respond=toy_judge_reply())
    out = tmp_path / "run"
    flags = [
        "--judge",
        server.url,
        "--judge-model",
        "toy-judge",
        "--judge-retries",
        "1",
        "--max-steps",
        "1",
    ]
    try:
        run_dpo(out, *flags)
        first = len(server.requests)
        row = [r for r in metrics(out) if "loss" in r][0]
        assert (
            row["judge/calls"] == 2 * 6 * 2 and row["judge/invalid_rate"] == 0.0
        )  # every verdict parsed
        assert (
            first == row["judge/calls"] + 6 * 2
        )  # training pairs + the held-out comparisons, both orders
        assert len((out / "judge_cache.jsonl").read_text().splitlines()) == first
        run_dpo(
            out, *flags
        )  # the same run again: same rollouts (fixed seed), every verdict from the cache
        assert len(server.requests) == first
    finally:
        server.close()
    proc = run_dpo(
        tmp_path / "dead", *flags, expect=2
    )  # a fresh run dir (no cache) against the closed port
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: judge {server.url}/v1/chat/completions: connection refused (after 2 tries)"
    ), line


@pytest.mark.slow
def test_a_failed_final_evaluation_keeps_the_trained_adapter(tmp_path, openai_server):
    # the training step's verdicts, then none: the plan is counted under the server's one lock
    server = openai_server(respond=toy_judge_reply(), then=no_verdict)
    server.plan = ["ok"] * (2 * 6 * 2)
    out = tmp_path / "run"
    try:
        proc = run_dpo(
            out,
            "--judge",
            server.url,
            "--judge-model",
            "toy-judge",
            "--judge-retries",
            "0",
            "--max-steps",
            "1",
            expect=2,
        )
    finally:
        server.close()
    assert "no held-out comparison got a valid verdict" in proc.stderr.strip().splitlines()[-1]
    assert (out / lora.WEIGHTS_NAME).is_file() and (out / "adapter_config.json").is_file()
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1]  # the step it trained is logged
    assert len(server.requests) > 2 * 6 * 2  # the held-out comparisons were asked, and not parsed


@pytest.mark.slow
def test_http_judge_against_transformers_serve(tmp_path):
    """A real OpenAI-compatible server (`transformers serve` on the toy base): the toy base is no
    judge, so its verdicts are mostly unparsable: each one is parsed or counted invalid, never
    guessed; a rerun is served from the cache; a killed server is a one-line JudgeError."""
    port = free_port()
    model_dir = str(toy.base_model_dir())
    proc = start_transformers_serve(port, model_dir, env=ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        cache = judges.VerdictCache(tmp_path / "cache.jsonl")
        judge = judges.HTTPJudge(
            url, model=model_dir, max_tokens=24, timeout=120, retries=1, backoff=0.1, cache=cache
        )
        cont = toy.continuations("test", 2, seed=0)
        prefixes, a, b = [c["prompt"] for c in cont], [c["reference"] for c in cont], ["x y z", "q"]
        votes = judge.prefer_ordered(prefixes, a, b)
        assert len(votes) == 2 and all(v in (None, 0.0, 1.0) for v in votes)
        assert (judge.calls, judge.invalid, judge.requests) == (2, sum(v is None for v in votes), 2)
        again = judges.HTTPJudge(
            url, model=model_dir, max_tokens=24, cache=judges.VerdictCache(tmp_path / "cache.jsonl")
        )
        assert (
            again.prefer_ordered(prefixes, a, b) == votes
            and again.requests == 0
            and again.cache.hits == 2
        )
    finally:
        stop_server(proc)
    with pytest.raises(
        judges.JudgeError, match=rf"^judge {url}/v1/chat/completions: connection refused"
    ):
        judge.prefer_ordered(["new prefix"], ["a"], ["b"])


# ---------------------------------------------------------------------------------------------
# The real Qwen3 tokenizer and vocabulary, documents from a JSONL file, a judge over HTTP
# ---------------------------------------------------------------------------------------------


def test_tiny_qwen3_real_vocab_one_step(tmp_path, openai_server):
    model = save_tiny_qwen3(tmp_path / "qwen")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": f"Document {i}: " + "the river runs past the mill " * 8}) + "\n"
            for i in range(12)
        )
    )
    # not a toy document: every verdict is Option 2, so every pair is a tie
    server = openai_server(respond=toy_judge_reply())
    try:
        out = tmp_path / "run"
        run_dpo(
            out,
            "--model",
            str(model),
            "--data",
            str(docs),
            "--judge",
            server.url,
            "--max-steps",
            "1",
            "--prefix-tokens",
            "24",
            "--suffix-tokens",
            "8",
            "--eval-size",
            "2",
            "--lora-r",
            "4",
        )
    finally:
        server.close()
    row = [r for r in metrics(out) if "loss" in r][0]
    assert row["judge/tie_rate"] == 1.0 and row["judge/position_consistency"] == 0.0
    assert row["pairs/prefixes_dropped"] == 2 and row["loss"] == 0.0  # no pair, no update, no error
    assert json.loads((out / "summary.json").read_text())["heldout"]["after"] == 0.5


@pytest.mark.slow
def test_torchrun_two_ranks_stay_in_sync(tmp_path):
    run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
        "dpo_online.py",
        "--out",
        tmp_path,
        *TINY,
        "--pairs",
        "all",
        env=ENV,
        timeout=600,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_param_max_diff"] == 0.0
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert len(rows) == 2 and rows[-1]["grad_norm"] > 0  # it trained
    assert (
        rows[0]["judge/calls"] == 2 * 6 * 2
    )  # rank 0's prefixes (2 of the global 4), its own judge calls


@pytest.mark.slow
def test_learning_beats_the_base(tmp_path):
    """`python dpo_online.py` with its defaults (150 steps, 128 held-out prefixes; shorter runs did
    not separate from a coin flip: 100 steps of a 100-step schedule measured 0.557, interval [0.492,
    0.622]): on a fixed seed the trained policy beats the toy base in held-out pairwise comparisons
    and the 95% interval excludes a coin flip. It measured 0.646, interval [0.588, 0.703]
    (docs/dpo_online.md); the margin below allows for another CPU's roundings."""
    out = tmp_path / "learn"
    run_script("dpo_online.py", "--out", out, "--save-every", "0", env=ENV, timeout=1800)
    held = json.loads((out / "summary.json").read_text())["heldout"]
    assert held["after"] >= 0.57 and held["interval"][0] > 0.5, held
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(
        r["completions/mean_length"] == 128 for r in rows
    )  # fixed-length rollouts: no winning by stopping
