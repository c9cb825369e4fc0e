"""chat.py: assistant-only masks from generation tags and turn by turn, the end-of-turn token, text
markers."""

import pytest
from conftest import qwen3_tokenizer_dir
from transformers import AutoTokenizer

import chat
import errors
import loading
import toy

THOUGHTS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\n5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "<think>\n4 plus 4 is 8.\n</think>\n\n8"},
]
# conversations Qwen3's stock template renders as its training variant does: one assistant turn
SINGLE_TURNS = [
    [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\n5"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "A greeting.", "content": "Hello!"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


@pytest.fixture(scope="module")
def qwen3():
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def smollm2():
    try:
        return loading.load_tokenizer("smollm2")
    except errors.MissingError as e:
        pytest.skip(str(e))


def spans(tokenizer, ids, mask):
    out, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out


@pytest.mark.parametrize("which", ["qwen3", "toy"])
def test_generation_tags_and_turn_by_turn_give_the_same_mask(which, qwen3):
    tok = qwen3 if which == "qwen3" else toy.load_tokenizer()
    template = (
        toy.TRAINING_CHAT_TEMPLATE
    )  # has the tags; rendered turn by turn, the tags are only ignored
    for conv in [THOUGHTS, *SINGLE_TURNS]:
        tagged = chat.assistant_mask(tok, conv, template)
        assert chat.turn_by_turn_mask(tok, conv, template) == tagged
    ids, mask = chat.assistant_mask(tok, THOUGHTS, template)
    assert spans(tok, ids, mask) == [
        "<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>",
        "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>",
    ]


def test_stock_qwen3_template_turn_by_turn_equals_its_training_variant(qwen3):
    assert not chat.has_generation_tags(qwen3.chat_template)
    for conv in SINGLE_TURNS:
        assert chat.assistant_mask(qwen3, conv) == chat.assistant_mask(
            qwen3, conv, toy.TRAINING_CHAT_TEMPLATE
        )


def test_template_that_rewrites_earlier_turns_is_a_clear_error(qwen3):
    # the stock template drops the first turn's thought once a later user turn follows
    with pytest.raises(
        errors.ConfigError, match=r"assistant turn 2 is not a token prefix.*generation"
    ):
        chat.assistant_mask(qwen3, THOUGHTS)
    bare = toy.load_tokenizer()
    bare.chat_template = None
    with pytest.raises(errors.ConfigError, match="no chat template"):
        chat.assistant_mask(bare, THOUGHTS)


def test_smollm2_loss_tokens_are_the_assistant_turns_only(smollm2):
    assert not chat.has_generation_tags(smollm2.chat_template)
    ids, mask = chat.assistant_mask(smollm2, THOUGHTS)
    got = spans(smollm2, ids, mask)
    print("SmolLM2 loss tokens:", got)
    assert got == [
        "<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>",
        "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>",
    ]
    masked_out = smollm2.decode([i for i, m in zip(ids, mask) if not m])
    assert (
        "You are terse." in masked_out
        and "What is 2+3?" in masked_out
        and "<|im_start|>assistant\n" in masked_out
    )
    assert "2 plus 3" not in masked_out


def test_end_of_turn_token(qwen3, smollm2):
    for tok in (qwen3, smollm2, toy.load_tokenizer()):
        assert tok.convert_ids_to_tokens(chat.end_of_turn_id(tok)) == "<|im_end|>"
    plain = toy.load_tokenizer(chat_template="{% for m in messages %}{{ m.content }}\n{% endfor %}")
    assert (
        chat.end_of_turn_id(plain) is None
    )  # nothing special after the content: no stop token to add
    bare = toy.load_tokenizer()
    bare.chat_template = None
    assert chat.end_of_turn_id(bare) is None


def test_markers_single_or_multi_token(qwen3, smollm2):
    assert len(chat.marker_ids(qwen3, "</think>")) == 1
    close = chat.marker_ids(smollm2, "</think>")
    assert len(close) > 1 and smollm2.decode(close) == "</think>"
    assert (
        chat.find_ids([5, 7, 3, 9, 3, 1], [3]) == 2
        and chat.find_ids([5, 7, 3, 9, 3, 1], [3], last=True) == 4
    )
    assert (
        chat.find_ids([1, 2, 3, 1, 2], [1, 2], last=True) == 3
        and chat.find_ids([1, 2], [2, 1]) is None
    )
    for text in ("I add.</think>\n\nThe answer", "x</think>>\n\nyes", "no close here"):
        ids = smollm2(text, add_special_tokens=False)["input_ids"]
        span = chat.marker_span(smollm2, ids, "</think>")
        if "</think>" not in text:
            assert span is None
            continue
        start, end = span
        assert "</think>" not in smollm2.decode(ids[: end - 1]) and "</think>" in smollm2.decode(
            ids[:end]
        )
        assert "</" not in smollm2.decode(ids[:start])
    ids = qwen3("a</think>b</think>c", add_special_tokens=False)["input_ids"]
    start, end = chat.marker_span(qwen3, ids, "</think>")
    assert qwen3.decode(ids[:start]) == "a" and qwen3.decode(ids[end:]) == "b</think>c"
