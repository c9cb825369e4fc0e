"""judges.py's logprob verdicts: the answer token in each vocabulary (toy characters, Qwen3,
SmolLM2), the verdict math, one batched forward per prompt on a tiny random model, both orders,
invalid counting, the cache, and a real pretrained judge (SmolLM2-135M-Instruct) in process: every
verdict on ordinary text is a probability."""

import pytest
import torch
from conftest import qwen3_tokenizer_dir
from transformers import AutoTokenizer

import dpo_online
import errors
import judges
import loading
import toy

CHAT = [{"role": "user", "content": "Which continuation is better?"}]


def _smollm2(what: str):
    try:
        return (
            loading.load_tokenizer("smollm2")
            if what == "tokenizer"
            else loading.load_model("smollm2")
        )
    except errors.MissingError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Qwen3 with the toy tokenizer: mechanics only, its verdicts mean nothing. The
    toy base's architecture (toy.tiny_config), not conftest's tiny Qwen3: it must take the toy
    tokenizer's ids and special tokens and its character-level prompts (over conftest's 256
    positions)."""
    torch.manual_seed(0)
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM(toy.tiny_config()).eval(), toy.load_tokenizer()


@pytest.mark.parametrize("vocab", ["toy", "qwen3", "smollm2"])
def test_the_answer_is_one_token_read_right_after_the_prefix(vocab):
    tok = {
        "toy": toy.load_tokenizer,
        "qwen3": lambda: AutoTokenizer.from_pretrained(qwen3_tokenizer_dir()),
        "smollm2": lambda: _smollm2("tokenizer"),
    }[vocab]()
    text = judges.LocalJudge(None, tok)._text(CHAT)
    for prefix, choices in (
        (judges.PAIRWISE_ANSWER_PREFIX, ["1", "2"]),
        (judges.POINTWISE_ANSWER_PREFIX, [str(s) for s in range(1, 10)]),
    ):
        (read,), (options,) = judges._answer_split(tok, [text], prefix, choices)
        assert len(set(options)) == len(choices)
        for c, o in zip(
            choices, options
        ):  # the read ids and the option token spell text + prefix + choice
            assert tok.decode(read + [o]) == text + prefix + c
            assert tok.decode([o]).strip() == c


def test_an_answer_of_several_tokens_is_a_clear_error():
    tok = toy.load_tokenizer()  # characters: "10" is two tokens
    with pytest.raises(
        errors.ConfigError, match=r"^--judge-verdict logprobs: .* not one token each"
    ):
        judges._answer_split(tok, ["x"], "Score: ", ["1", "10"])


def test_verdict_math_and_the_mass_floor():
    assert judges.option_probability([0.3, 0.1]) == pytest.approx(0.75)
    assert (
        judges.option_probability([4e-4, 5e-4]) is None
    )  # "1" and "2" carry < 1e-3: invalid, never 1/2
    assert (
        judges.expected_score([0.0] * 8 + [0.5]) == 1.0
        and judges.expected_score([0.2] + [0.0] * 8) == 0.0
    )
    assert judges.expected_score([0.1] * 9) == pytest.approx(0.5)
    assert judges.expected_score([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0]) == pytest.approx(
        (3.25 - 1) / 8
    )  # E = (2 x .3 + 7 x .1) / .4
    assert judges.expected_score([1e-4] * 9) is None


def test_next_token_probs_batched_equals_one_by_one(tiny):
    model, tok = tiny
    rows = [
        tok("Hello there, Option ")["input_ids"],
        tok("Hi")["input_ids"],
        tok("A longer text, Score: ")["input_ids"],
    ]
    options = [[tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")]] * 3
    batched = judges.next_token_probs(model, rows, options, tok.pad_token_id, batch_size=2)
    for row, opts, got in zip(rows, options, batched):
        with torch.no_grad():
            want = model(input_ids=torch.tensor([row])).logits[0, -1].softmax(-1)[opts].tolist()
        assert got == pytest.approx(want, abs=1e-5)


def test_logprob_judge_on_a_tiny_model_both_orders_counts_and_cache(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    judge = judges.LocalJudge(
        model,
        tok,
        batch_size=3,
        verdict="logprobs",
        cache=judges.VerdictCache(tmp_path / "cache.jsonl"),
    )
    seen = []
    ask = judge.choice_probs
    monkeypatch.setattr(
        judge, "choice_probs", lambda convs, *a: seen.extend(convs) or ask(convs, *a)
    )
    prefixes, a, b = (
        ["The fox ran.", "Rain fell."],
        ["It was fast.", "It was wet."],
        ["zzzz", "qq q"],
    )
    ordered = judge.prefer_ordered(prefixes * 2, a + b, b + a)
    # a random model's two options both have some probability: every verdict is strictly inside
    assert len(ordered) == 4 and all(0.0 < v < 1.0 for v in ordered)
    assert (judge.calls, judge.invalid) == (4, 0)
    both = judge.prefer(prefixes, a, b)  # both orders, averaged: position bias cancels
    assert both == pytest.approx([(ordered[i] + 1 - ordered[i + 2]) / 2 for i in range(2)])
    assert seen[4][0]["content"].index("It was fast.") < seen[4][0]["content"].index(
        "zzzz"
    )  # (a, b) first ...
    assert seen[6][0]["content"].index("zzzz") < seen[6][0]["content"].index(
        "It was fast."
    )  # ... then (b, a)
    scores = judge.score(["Reverse the letters of: abc", "Sort: 3 1 2"], ["cba", "1 2 3"])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)
    assert (judge.calls, judge.invalid) == (10, 0)
    assert (
        "an integer from 1 to 9" in seen[-1][-1]["content"]
    )  # the scale the logprob verdict can read
    # the cache replays every verdict without a forward pass
    again = judges.LocalJudge(
        None, tok, verdict="logprobs", cache=judges.VerdictCache(tmp_path / "cache.jsonl")
    )
    assert again.prefer(prefixes, a, b) == pytest.approx(both) and again.cache.hits == 4
    # answer tokens with almost no probability: invalid, counted, never guessed
    monkeypatch.setattr(judges, "MIN_VERDICT_MASS", 2.0)
    fresh = judges.LocalJudge(model, tok, verdict="logprobs")
    assert fresh.prefer_ordered(prefixes, a, b) == [None, None] and (
        fresh.calls,
        fresh.invalid,
    ) == (2, 2)
    assert fresh.score(prefixes, a) == [None, None] and fresh.invalid == 4


def test_make_judge_verdict_modes():
    assert isinstance(
        judges.make_judge("toy", verdict="logprobs"), judges.CountedJudge
    )  # a program: no verdict mode
    with pytest.raises(errors.ConfigError, match=r"^--judge-verdict logprobs: a server judge"):
        judges.make_judge("http://127.0.0.1:9", verdict="logprobs")
    assert isinstance(
        judges.make_judge("http://127.0.0.1:9"), judges.HTTPJudge
    )  # auto: a server generates
    with pytest.raises(errors.ConfigError, match=r"^--judge-verdict 'maybe'"):
        judges.make_judge("toy", verdict="maybe")


def test_smollm2_in_process_judge_always_gives_a_verdict():
    """SmolLM2-135M-Instruct mostly fails to end a generated verdict as asked; read from logprobs,
    every verdict on ordinary text is a valid probability."""
    _smollm2("tokenizer")
    judge = judges.make_judge("smollm2", pairwise=True, device="cpu")
    assert isinstance(judge, judges.LocalJudge) and judge.verdict == "logprobs"
    prefixes = ["The river runs past the old mill.", "Ada opened the shop at nine."]
    firsts, seconds = (
        [" Its wheel turns all day.", " She sold bread."],
        [" Purple sleeps loudly.", " zzz qqq"],
    )
    res = dpo_online.full_pairwise(judge, prefixes, [[x, y] for x, y in zip(firsts, seconds)])
    assert (judge.calls, judge.invalid) == (4, 0)  # 2 pairs x both orders
    assert all(r.invalid_pairs == 0 and all(0.0 <= s <= 1.0 for s in r.scores) for r in res)
    scores = judge.score(
        ["What is the capital of France?", "Name a fruit."], ["Paris.", "An apple."]
    )
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores) and judge.invalid == 0


def test_win_tie_loss_votes_each_order_and_asks_both_in_one_batch():
    class Ordered:  # P(first wins) from the text; records every batch it was asked
        def __init__(self, verdicts):
            self.verdicts, self.batches = verdicts, []

        def prefer_ordered(self, prefixes, first, second):
            self.batches.append(list(zip(prefixes, first, second)))
            return [self.verdicts.get((f, s)) for f, s in zip(first, second)]

    judge = Ordered(
        {
            ("win", "ref"): 0.9,  # both orders prefer "win"
            ("ref", "win"): 0.2,
            ("lose", "ref"): 0.1,  # both orders prefer "ref"
            ("ref", "lose"): 0.7,
            ("even", "ref"): 0.8,  # the orders disagree: a tie
            ("ref", "even"): 0.6,
            ("half", "ref"): 0.5,  # one order undecided: a tie
            ("ref", "half"): 0.0,
            ("ref", "unparsed"): 0.3,  # ("unparsed", "ref") has no verdict
        }
    )
    shown = ["win", "lose", "even", "half", "unparsed"]
    prefixes = [f"p{i}" for i in range(5)]
    out = judges.win_tie_loss(judge, prefixes, shown, ["ref"] * 5)
    assert out == [1.0, 0.0, 0.5, 0.5, None]
    (batch,) = judge.batches  # one batch: every pair a-first, then every pair b-first
    assert batch == [(p, x, "ref") for p, x in zip(prefixes, shown)] + [
        (p, "ref", x) for p, x in zip(prefixes, shown)
    ]
    assert judges.both_orders(judge, [], [], []) == [] and len(judge.batches) == 1  # no call
    with pytest.raises(ValueError, match="lengths differ"):
        judges.both_orders(judge, ["p"], ["a", "b"], ["c"])

    class Symmetric:  # no prefer_ordered: prefer() is asked in both orders
        def prefer(self, prefixes, a, b):
            return [1.0 if x == "good" else 0.0 if y == "good" else 0.5 for x, y in zip(a, b)]

    assert judges.both_orders(Symmetric(), ["p", "q"], ["good", "x"], ["bad", "y"]) == [
        (1.0, 0.0),
        (0.5, 0.5),
    ]


def test_pairwise_metrics_count_valid_pairs_only():
    results = [
        dpo_online.PairwiseResult(
            [1.0, 0.0], pairs=3, invalid_pairs=1, consistent_pairs=1, tied_pairs=1
        ),
        dpo_online.PairwiseResult(
            [None, None], pairs=1, invalid_pairs=1, consistent_pairs=0, tied_pairs=0
        ),
    ]
    assert dpo_online.pairwise_metrics(results, calls=8, invalid=2) == {
        "judge/calls": 8,
        "judge/invalid_rate": 0.25,
        "judge/position_consistency": 0.5,  # 1 of the 2 valid pairs
        "judge/tie_rate": 0.5,
        "judge/invalid_pairs": 2,
    }
    # no call and no valid pair: rates of 0, not a division by zero
    assert dpo_online.pairwise_metrics([], calls=0, invalid=0)["judge/invalid_rate"] == 0.0


def test_from_args_reads_the_judge_flags():
    from dataclasses import replace

    flags = judges.JudgeArgs(
        judge="http://127.0.0.1:9/v1",
        judge_cache="",
        judge_max_tokens=64,
        judge_concurrency=3,
        judge_timeout=5.0,
        judge_retries=1,
    )
    judge = judges.from_args(flags)  # --judge-temperature 0 by default: greedy
    assert isinstance(judge, judges.HTTPJudge) and judge.model == "default"
    assert (judge.max_tokens, judge.temperature, judge.cache) == (64, 0.0, None)
    assert (judge.concurrency, judge.timeout, judge.retries) == (3, 5.0, 1)
    warm = judges.from_args(replace(flags, judge_temperature=1.0))
    assert warm.temperature == 1.0
    toy_judge = judges.from_args(replace(flags, judge="toy"), pairwise=True)
    assert isinstance(toy_judge.judge, toy.ContinuationJudge)
