"""rlmt.py: the two sampling interfaces, what the judge sees, the update, the reward gate, the CLI,
a judge server."""

import json

import pytest
import torch
from conftest import run_script

import errors
import gate
import judges
import loading
import lora
import rlmt
import tasks
import toy


@pytest.fixture(scope="module")
def policy():
    model = toy.load_model()
    lora.merge(lora.load_adapter(model, str(toy.SFT_INSTRUCT_DIR)))
    return model, loading.load_tokenizer("toy")


def _prompts(tokenizer, task="chat", n=3):
    _, held = tasks.thinking_prompts(
        tokenizer, rlmt.Args(task=task, gate_prefixes=n), toy_train_size=1
    )
    return held


def test_external_boundary_is_masked_exactly_and_inserted_after_every_thought(policy):
    model, tok = policy
    held = _prompts(tok)
    s = rlmt.sample_thought_then_answer(
        model,
        tok,
        [h["ids"] for h in held],
        rlmt.Args(
            num_generations=4,
            boundary="external",
            thought_tokens=12,
            answer_tokens=16,
            temperature=1.0,
        ),
        torch.Generator().manual_seed(0),
    )
    close = tok.convert_tokens_to_ids(rlmt.THINK_CLOSE)
    assert (
        s.roll.completion_ids.shape[0] == 12
        and s.roll.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    )
    cut = 0
    for i in range(12):
        ids, lm, att = (
            s.roll.completion_ids[i].tolist(),
            s.loss_mask[i].tolist(),
            s.roll.completion_mask[i].tolist(),
        )
        t, n_ans = s.thought_len[i], s.answer_len[i]
        b = [j for j in range(len(ids)) if att[j] and not lm[j]]  # in the context, not in the loss
        assert b == list(range(t, t + len(b))) and close in [ids[j] for j in b], (i, b)
        assert tok.decode([ids[j] for j in b]).strip() == rlmt.THINK_CLOSE
        assert (
            lm[:t] == [1] * t and lm[t + len(b) : t + len(b) + n_ans] == [1] * n_ans
        )  # policy tokens train
        assert sum(att) == t + len(b) + n_ans and sum(lm) == t + n_ans  # padding is in neither
        assert (
            close not in ids[:t] and close not in ids[t + len(b) :]
        )  # the policy's own </think> was dropped
        cut += not s.closed[i]
    assert cut > 0, "thought_tokens=12 cuts some thoughts: they get the boundary too"
    # the prompt ends in the opened thought; the response the judge gets is the stage-2 text only
    assert all(tok.decode(h["ids"]).endswith("<think>\n") for h in held)
    for i, a in enumerate(s.answers):
        start = (
            s.roll.completion_mask[i].sum().item() - s.answer_len[i]
        )  # after the thought and the boundary
        assert (
            tok.decode(
                s.roll.completion_ids[i, start : start + s.answer_len[i]], skip_special_tokens=True
            ).strip()
            == a
        )


def _smollm2_tokenizer():
    try:
        return loading.load_tokenizer("smollm2")
    except errors.MissingError as e:
        pytest.skip(str(e))


def test_model_boundary_takes_the_text_after_the_first_close():
    from test_sampling import ScriptedLM

    tok = toy.load_tokenizer()

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    x, y = enc("xy")
    model = ScriptedLM(
        {x: enc("ab</think>\n\nok</think>z<|im_end|>"), y: enc("abc<|im_end|>")}, len(tok)
    )
    s = rlmt.sample_thought_then_answer(
        model,
        tok,
        [[x], [y]],
        rlmt.Args(
            num_generations=1, boundary="model", thought_tokens=8, answer_tokens=8, temperature=1.0
        ),
        None,
    )
    assert s.answers == ["ok</think>z", ""] and s.has_answer == [True, False]
    assert s.thought_len == [2, 4] and s.answer_len == [len(enc("\n\nok</think>z<|im_end|>")), 0]


@pytest.mark.parametrize("boundary", ["external", "model"])
def test_multi_token_close_on_smollm2(boundary, capsys):
    """SmolLM2 writes </think> in three pieces: the thought still stops there and the response
    follows it."""
    from test_sampling import ScriptedLM

    tok = _smollm2_tokenizer()

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    close = enc(rlmt.THINK_CLOSE)
    assert len(close) == 3 and tok.convert_tokens_to_ids(rlmt.THINK_CLOSE) in (
        None,
        tok.unk_token_id,
    )
    prompt = enc("Q: 2+2? Think:")
    thought = enc(" I add 2 and 2.</think>\n\nThe sum is 4<|im_end|>")
    bound = enc("\n" + rlmt.THINK_CLOSE + "\n\n")
    scripts = {prompt[-1]: thought, bound[-1]: enc("It is 4.<|im_end|>")}
    model = ScriptedLM(scripts, len(tok))
    s = rlmt.sample_thought_then_answer(
        model,
        tok,
        [prompt],
        rlmt.Args(
            num_generations=2,
            boundary=boundary,
            thought_tokens=30,
            answer_tokens=10,
            temperature=1.0,
        ),
        None,
    )
    ids = s.roll.completion_ids[0][s.roll.completion_mask[0].bool()].tolist()
    t = s.thought_len[0]
    assert (
        tok.decode(ids[:t]) == " I add 2 and 2."
        and s.closed == [True, True]
        and s.has_answer == [True, True]
    )
    if (
        boundary == "external"
    ):  # stopped on the text, the policy's pieces dropped, ours inserted and masked out
        assert ids[t : t + len(bound)] == bound and s.loss_mask[0, t : t + len(bound)].tolist() == [
            0
        ] * len(bound)
        assert (
            s.answers == ["It is 4."] * 2
            and tok.decode(ids[t + len(bound) :]) == "It is 4.<|im_end|>"
        )
    else:
        assert s.answers == ["The sum is 4"] * 2 and s.answer_len[0] == len(
            enc("\n\nThe sum is 4<|im_end|>")
        )
    tasks.thinking_prompts(tok, rlmt.Args(gate_prefixes=2), toy_train_size=2)
    err = capsys.readouterr().err
    assert (
        err.count("rlmt.py: </think> is 3 tokens of this tokenizer") == 1
        and len(err.strip().splitlines()) == 1
    )


class Recorder:
    """A judge that records what it was shown."""

    def __init__(self):
        self.calls, self.invalid, self.seen = 0, 0, []

    def score(self, prompts, responses):
        self.seen += list(zip(prompts, responses))
        self.calls += len(responses)
        return [0.5] * len(responses)

    def prefer_ordered(self, prefixes, first, second):
        self.seen += list(zip(prefixes, first, second))
        self.calls += len(first)
        return [1.0 if "good" in f else 0.0 if "good" in s else 0.5 for f, s in zip(first, second)]


def test_the_judge_never_sees_the_thought(policy):
    model, tok = policy
    held = _prompts(tok)
    s = rlmt.sample_thought_then_answer(
        model,
        tok,
        [h["ids"] for h in held],
        rlmt.Args(
            num_generations=2,
            boundary="external",
            thought_tokens=40,
            answer_tokens=16,
            temperature=1.0,
        ),
        torch.Generator().manual_seed(1),
    )
    judge = Recorder()
    rows = [h for h in held for _ in range(2)]
    r, invalid = rlmt.judge_responses(judge, "chat", "pairwise", rows, s.answers, s.has_answer, 0.0)
    assert r == [0.5] * 6 and invalid == 0
    for (prompt, response), i in zip(judge.seen, range(6)):
        thought = tok.decode(s.roll.completion_ids[i, : s.thought_len[i]])
        assert prompt == rows[i]["judge_prompt"] and "<think>" not in str(prompt)
        assert "<think>" not in response and "</think>" not in response
        assert len(thought.strip()) > 3 and thought.strip() not in response


def test_pointwise_continuation_judging_shows_the_reference_and_never_the_thought():
    rows = [
        {"judge_prompt": "Milo the fox had 3 acorns.\n", "reference": "On Monday he found 2 more."},
        {"judge_prompt": "The council met.\n", "reference": "Ada Reyes voted yes."},
    ]
    seen = []

    class Messages(judges.LocalJudge):  # the real prompt building, the reply faked
        def __init__(self):
            self.calls, self.invalid, self.cache = 0, 0, None

        def generate(self, conversations):
            seen.extend(conversations)
            return ["fine\nScore: 10"] * len(conversations)

    answers = ["<think>he had 3</think>He found 2 more.", "She voted no."]
    r, invalid = rlmt.judge_responses(
        Messages(), "continuation", "pointwise", rows, answers, [True, True], 0.0
    )
    assert r == [1.0, 1.0] and invalid == 0
    text = seen[0][-1]["content"]
    assert (
        "On Monday he found 2 more." in text
        and "He found 2 more." in text
        and "he had 3" not in text
    )
    assert "Ada Reyes voted yes." in seen[1][-1]["content"]
    # the toy continuation judge takes the references too (it rebuilds the facts from the prefix):
    # the original continuation scores 1, a stock ending 0, every verdict valid
    docs = toy.continuations("test", 3, seed=0)
    rows = [{"judge_prompt": d["prompt"], "reference": d["reference"]} for d in docs]
    toy_judge = judges.CountedJudge(toy.ContinuationJudge())

    def judged(answers):
        return rlmt.judge_responses(
            toy_judge, "continuation", "pointwise", rows, answers, [True] * 3, 0.0
        )

    assert judged([d["reference"] for d in docs]) == ([1.0] * 3, 0)
    assert judged(["The end."] * 3) == ([0.0] * 3, 0)


def test_continuation_judging_both_orders_win_tie_loss_and_missing():
    rows = [{"judge_prompt": f"prefix {i}", "reference": "ref"} for i in range(4)]
    judge = Recorder()
    answers = ["good one", "meh", "meh", "good"]
    r, invalid = rlmt.judge_responses(
        judge, "continuation", "pairwise", rows, answers, [True, True, True, False], 0.1
    )
    assert (
        r == [1.0, 0.5, 0.5, 0.1] and invalid == 0
    )  # a missing response gets --missing-reward, never judged
    assert judge.seen[:3] == [
        (f"prefix {i}", a, "ref") for i, a in enumerate(answers[:3])
    ]  # ours shown first
    assert judge.seen[3:] == [
        (f"prefix {i}", "ref", a) for i, a in enumerate(answers[:3])
    ]  # then second

    def first_shown(prefixes, first, second):  # position bias: ours wins, then loses -> a tie
        return [1.0] * len(first)

    def unparsed(prefixes, first, second):
        return [None] * len(first)

    flip = Recorder()
    flip.prefer_ordered = first_shown
    assert rlmt.judge_responses(flip, "continuation", "pairwise", rows[:1], ["x"], [True], 0.0)[
        0
    ] == [0.5]
    none = Recorder()
    none.prefer_ordered = unparsed
    assert rlmt.judge_responses(none, "continuation", "pairwise", rows[:1], ["x"], [True], 0.0) == (
        [None],
        1,
    )


def test_group_advantages():
    adv = rlmt.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2]), 2)
    assert (
        adv[:2].tolist() == pytest.approx([0.7070, -0.7070], abs=1e-3)
        and adv[2:].tolist() == [0.0] * 4
    )
    # a sample without a valid verdict (NaN) is out of its group's mean and std, its A is 0
    nan = float("nan")
    adv = rlmt.group_advantages(torch.tensor([1.0, nan, 0.0, 0.5, nan, 0.5, nan, nan, 0.3]), 3)
    assert adv[:3].tolist() == pytest.approx([0.7070, 0.0, -0.7070], abs=1e-3)
    assert adv[3:].tolist() == [0.0] * 6  # equal scored rewards, or a single scored sample


def test_artifact_rate():
    assert (
        gate.artifact_rate(
            ["ok", "a <think> b", "", "x<|im_start|>user", "fine"], [True] * 4 + [False]
        )
        == 0.8
    )


def test_update_trains_only_policy_tokens(policy):
    """The gradient does not depend on what sits at masked (boundary) positions' targets: the loss
    mask is 0."""
    model, tok = policy
    held = _prompts(tok, n=1)
    s = rlmt.sample_thought_then_answer(
        model,
        tok,
        [held[0]["ids"]],
        rlmt.Args(
            num_generations=2,
            boundary="external",
            thought_tokens=10,
            answer_tokens=6,
            temperature=1.0,
        ),
        torch.Generator().manual_seed(0),
    )
    m = toy.load_model()
    lora.add_lora(m, r=4, alpha=8)
    torch.manual_seed(0)
    for p in lora.lora_parameters(m):
        p.data.normal_(0, 0.05)
    adv = torch.tensor([1.0, -1.0])
    flags = rlmt.Args(temperature=1.0, epsilon=0.2, beta=0.0, micro_batch_size=8)
    stats = rlmt.update(m, s, adv, None, flags, world=1)
    g1 = [p.grad.clone() for p in lora.lora_parameters(m)]
    m.zero_grad()
    ones = rlmt.Samples(
        s.roll,
        s.roll.completion_mask.clone(),
        *[getattr(s, f) for f in ("answers", "thought_len", "answer_len", "closed", "has_answer")],
    )
    rlmt.update(m, ones, adv, None, flags, world=1)
    g2 = [p.grad.clone() for p in lora.lora_parameters(m)]
    assert stats["kl"] == 0.0 and any(a.abs().sum() > 0 for a in g1)
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2)), (
        "the boundary tokens would change the gradient"
    )


def run_rlmt(out, *flags, expect=0):
    return run_script("rlmt.py", "--out", out, *flags, expect=expect)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SMALL = (
    "--max-steps",
    "2",
    "--gate-prefixes",
    "4",
    "--num-generations",
    "4",
    "--batch-size",
    "2",
    "--thought-tokens",
    "24",
    "--answer-tokens",
    "16",
)


@pytest.mark.slow
def test_continuation_external_runs_and_logs_the_card_columns(tmp_path):
    run_rlmt(tmp_path, "--task", "continuation", *SMALL, "--save-every", "1")
    rows = [r for r in metrics(tmp_path) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "reward",
        "reward_std",
        "gate/mixed_groups",
        "gate/near_zero_groups",
        "gate/all_zero_groups",
        "gate/all_one_groups",
        "judge/invalid_rate",
        "length_drift",
        "artifact_rate",
        "closed_think_rate",
        "thought_length",
        "answer_length",
        "reward_length_corr",
        "kl",
        "grad_norm",
    ):
        assert key in rows[-1], key
    assert all(
        abs(r["reward"] * 16 - round(r["reward"] * 16)) < 1e-6 for r in rows
    )  # 8 samples of 0, 1/2 or 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    h = summary["heldout"]
    assert (
        h["metric"] == "gate_mean_reward"
        and h["delta_ci"][0] <= h["after"] - h["before"] <= h["delta_ci"][1]
    )
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    train = [x for x in samples if x["split"] == "train"]
    assert train and all(x["reward"] in (0.0, 0.5, 1.0) for x in train)


@pytest.mark.slow
def test_learning_the_default_chat_run_shortened_raises_the_gate_reward(tmp_path):
    """`python rlmt.py` cut to 45 of its 150 steps (the shipped toy/sft_instruct start, seed 0): the
    reward gate of the trained arm against its start, 64 held-out prompts x 16 samples. Measured:
    +0.030 [+0.005, +0.054] after 45 steps (the full default: +0.057 [+0.022, +0.093]); asserted: at
    least half of that, on any CPU."""
    run_rlmt(tmp_path, "--max-steps", "45")
    h = json.loads((tmp_path / "summary.json").read_text())["heldout"]
    assert h["after"] - h["before"] >= 0.015, h


@pytest.mark.slow
def test_toy_arithmetic_chat_run_judges_the_answer_of_word_problems(tmp_path):
    tok = loading.load_tokenizer("toy")
    train, held = tasks.thinking_prompts(
        tok, rlmt.Args(data="toy-arithmetic", gate_prefixes=6), toy_train_size=6
    )
    styles = [toy.parse_arithmetic(h["judge_prompt"])[1] for h in held]
    assert styles == ["gsm8k", "math", "mc"] * 2 and all(
        toy.parse_arithmetic(t["judge_prompt"]) for t in train
    )
    assert rlmt.resolve_defaults(rlmt.Args(data="toy-arithmetic")).init_adapter == str(
        toy.SFT_FORMATS_DIR
    )
    run_rlmt(tmp_path, "--data", "toy-arithmetic", *SMALL)
    rows = [r for r in metrics(tmp_path) if "reward" in r]
    # some verdicts parse; an invalid one scores 0, so the mean reward stays under the valid share
    assert len(rows) == 2 and all(r["judge/invalid_rate"] < 1.0 for r in rows)
    assert all(r["reward"] <= 1.0 - r["judge/invalid_rate"] + 1e-9 for r in rows)
    train_samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(x["reward"] in (0.0, 1.0) for x in train_samples if x["split"] == "train")
    with pytest.raises(errors.ConfigError, match="toy-arithmetic"):
        tasks.thinking_prompts(
            tok,
            rlmt.Args(data="toy-arithmetic", task="continuation", gate_prefixes=2),
            toy_train_size=2,
        )
    _, held = tasks.thinking_prompts(
        tok,
        rlmt.Args(data="toy-arithmetic", gate_prefixes=4, toy_styles="gsm8k,math"),
        toy_train_size=4,
    )
    assert [toy.parse_arithmetic(h["judge_prompt"])[1] for h in held] == ["gsm8k", "math"] * 2
    with pytest.raises(errors.ConfigError, match="--toy-styles gsm8k,essay: each must be one of"):
        bad = rlmt.Args(data="toy-arithmetic", toy_styles="gsm8k,essay")
        tasks.thinking_prompts(tok, bad, toy_train_size=2)


@pytest.mark.slow
def test_pointwise_continuation_run_uses_the_document_judge(tmp_path):
    run_rlmt(tmp_path, "--task", "continuation", "--judging", "pointwise", *SMALL)
    rows = [r for r in metrics(tmp_path) if "reward" in r]
    assert len(rows) == 2 and all(
        0.0 <= r["reward"] <= 1.0 and r["judge/invalid_rate"] == 0.0 for r in rows
    )


@pytest.mark.slow
def test_gate_on_four_arms_prints_both_tables_and_writes_gate_json(tmp_path):
    sft, arith = toy.SFT_INSTRUCT_DIR, toy.SFT_ADAPTER_DIR
    arms = f"base=,sft={sft},arith={arith},both={sft}+{arith}"
    proc = run_rlmt(
        tmp_path,
        "--gate",
        arms,
        "--gate-prefixes",
        "4",
        "--num-generations",
        "4",
        "--thought-tokens",
        "24",
        "--answer-tokens",
        "16",
    )
    assert "| arm | reward_mean | reward_std | invalid_rate | mixed_groups |" in proc.stdout
    assert (
        "| comparison | mean_reward_delta | right_better | left_better | tie | shared_prefixes |"
        in proc.stdout
    )
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert list(gate["arms"]) == ["base", "sft", "arith", "both"] and len(gate["comparisons"]) == 6
    assert "sft_minus_base" in gate["comparisons"] and "both_minus_arith" in gate["comparisons"]
    for a in gate["arms"].values():
        # every sample is judged and an invalid verdict scores 0
        assert 0.0 <= a["reward_mean"] <= 1.0 - a["invalid_rate"] + 1e-9
        assert a["avg_total_new_tokens"] > 0
    # the go/no-go fields are what the arms and comparisons it wrote say
    assert gate["reward_validity_ok"] is all(
        a["invalid_rate"] <= 0.05 for a in gate["arms"].values()
    )
    assert gate["separable"] is any(
        c["delta_ci"][0] > 0 or c["delta_ci"][1] < 0 for c in gate["comparisons"].values()
    )
    # the same draws for every arm: the same arm twice gives the same per-prefix means
    again = run_rlmt(
        tmp_path / "again",
        "--gate",
        f"a={toy.SFT_INSTRUCT_DIR},b={toy.SFT_INSTRUCT_DIR}",
        "--gate-prefixes",
        "4",
        "--num-generations",
        "4",
        "--thought-tokens",
        "24",
        "--answer-tokens",
        "16",
    )
    g2 = json.loads((tmp_path / "again" / "gate.json").read_text())
    assert g2["per_prefix"]["a"] == g2["per_prefix"]["b"] == gate["per_prefix"]["sft"], (
        again.stdout[-500:]
    )
    assert g2["comparisons"]["b_minus_a"]["tie"] == 1.0
    assert g2["comparisons"]["b_minus_a"]["delta_ci"] == [0.0, 0.0] and not g2["separable"]


def test_bad_gate_spec_is_one_line(tmp_path):
    proc = run_rlmt(tmp_path, "--gate", "justaname", expect=2)
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --gate 'justaname': each arm is name=spec")
    )


# ---------------------------------------------------------------------------------------------
# The judge over HTTP: an OpenAI-compatible server on 127.0.0.1 grading with the toy answer judge
# ---------------------------------------------------------------------------------------------


def answer_judge_reply():
    """A `respond` for conftest's FakeOpenAIServer: the pointwise grading prompt answered with the
    toy answer judge's score, in words ending "Score: N"; a response holding a thought fails the
    request."""
    judge = toy.AnswerJudge()

    def respond(path: str, body: dict, index: int) -> str:
        user = body["messages"][-1]["content"]
        prompt, _, rest = user.partition("### Instruction\n")[2].partition("\n\n### Response\n")
        response = rest.partition("\n\nGive a short justification")[0]
        assert "<think>" not in response
        v = judge.score([prompt], [response])[0]
        return "Graded.\nScore: " + (str(1 + round(9 * v)) if v is not None else "none")

    return respond


@pytest.mark.slow
def test_http_judge_end_to_end_with_cache(tmp_path, openai_server):
    server = openai_server(respond=answer_judge_reply())
    flags = ["--judge", server.url, "--judge-model", "toy-judge", "--judge-retries", "1", *SMALL]
    try:
        run_rlmt(tmp_path, *flags)
        first = len(server.requests)
        rows = [r for r in metrics(tmp_path) if "reward" in r]
        # training samples + the gate before and after; the same (prompt, response) asked twice is
        # asked once
        assert 0.5 * (2 * 2 * 4 + 2 * 4 * 4) < first <= 2 * 2 * 4 + 2 * 4 * 4
        assert all(r["judge/invalid_rate"] < 1.0 for r in rows)
        assert len((tmp_path / "judge_cache.jsonl").read_text().splitlines()) == first
        run_rlmt(
            tmp_path, *flags
        )  # the same run again: the same samples, every verdict from the cache
        assert len(server.requests) == first
    finally:
        server.close()
    proc = run_rlmt(tmp_path / "dead", *flags, expect=2)
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: judge {server.url}/v1/chat/completions: connection refused")
    )


@pytest.mark.slow
def test_resume_repeats_the_interrupted_step_exactly(tmp_path):
    flags = (*SMALL, "--save-every", "1")
    run_rlmt(tmp_path, *flags)  # two steps; the checkpoint holds step 1
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 1
    first = [r for r in metrics(tmp_path) if "reward" in r]
    before = json.loads((tmp_path / "summary.json").read_text())["heldout"]["before"]
    run_rlmt(tmp_path, *flags, "--resume")  # redo step 2 from the checkpoint
    again = [r for r in metrics(tmp_path) if "reward" in r]
    assert [r["step"] for r in again] == [1, 2] and again[0] == first[0]
    for key in ("reward", "answer_length", "thought_length", "loss", "kl", "length_drift"):
        assert again[1][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-7), key
    # the starting arm's gate is measured once, before training, and kept in the checkpoint
    assert json.loads((tmp_path / "summary.json").read_text())["heldout"]["before"] == before
