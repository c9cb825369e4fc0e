"""chat.py: assistant-only masks from generation tags and turn by turn, the end-of-turn token, text
markers."""

import pytest
from conftest import qwen3_tokenizer_dir
from transformers import AutoTokenizer

import chat
import errors
import loading
import sampling
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

# thoughts in reasoning_content (first turn) and in the content (second turn)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "reasoning_content": "2 plus 3 is 5.", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "<think>\n4 plus 4 is 8.\n</think>\n\n8"},
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


# ---- training rows -> token ids ----


@pytest.mark.parametrize("no_think", [False, True])
def test_real_qwen3_mask_is_exactly_each_assistant_turn(no_think, qwen3):
    tok = qwen3
    ids, mask = chat.encode_row(
        {"messages": CONVERSATION}, "x:1", tok, chat.training_template(tok), no_think
    )
    got = spans(tok, ids, mask)
    if no_think:
        assert got == ["<think>\n\n</think>\n\n5<|im_end|>", "<think>\n\n</think>\n\n8<|im_end|>"]
    else:  # interleaved: the first turn keeps its reasoning too (the stock template would drop it)
        assert got == [
            "<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>",
            "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>",
        ]
    # the unmasked rest is the system, the users and the role headers
    text = tok.decode(ids)
    assert (
        text.count("<|im_start|>assistant\n") == 2
        and "<|im_start|>user\nAnd 4+4?<|im_end|>" in text
    )


def test_toy_and_real_tokenizers_mask_the_same_text(qwen3):
    masks = []
    for tok in (qwen3, toy.load_tokenizer()):
        ids, mask = chat.encode_row(
            {"messages": CONVERSATION}, "x:1", tok, chat.training_template(tok), False
        )
        masks.append(spans(tok, ids, mask))
    assert masks[0] == masks[1]


def test_template_that_cannot_be_masked_is_a_clear_error():
    # a template that rewrites earlier turns (here: a running count in front) has no turn-by-turn
    # mask
    tok = toy.load_tokenizer(
        chat_template="{{ messages|length }}{% for m in messages %}{{ m.content }}<|im_end|>{% "
        "endfor %}"
    )
    template = chat.training_template(tok)
    with pytest.raises(errors.ConfigError, match="generation"):
        chat.encode_row({"messages": CONVERSATION}, "x:1", tok, template, False)


def test_rows_without_messages_need_no_template_and_any_template_is_masked_turn_by_turn():
    tok = toy.load_tokenizer()
    tok.chat_template = None
    assert chat.training_template(tok) is None
    ids, mask = chat.encode_row({"text": "ab"}, "x:1", tok, None, False)
    assert tok.decode(ids) == "ab<|im_end|>" and mask == [1, 1, 1]
    ids, mask = chat.encode_row({"prompt": "Q", "completion": "A"}, "x:2", tok, None, False)
    assert mask == [0, 1, 1] and tok.decode(ids) == "QA<|im_end|>"
    with pytest.raises(errors.ConfigError, match="x:3: chat messages need a chat template"):
        chat.encode_row({"messages": CONVERSATION}, "x:3", tok, None, False)
    # a ChatML template that knows nothing of reasoning_content: the thought goes into the content,
    # masked turn by turn
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    template = chat.training_template(tok)
    assert template == tok.chat_template
    ids, mask = chat.encode_row({"messages": CONVERSATION}, "x:4", tok, template, False)
    assert spans(tok, ids, mask) == [
        "<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>",
        "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>",
    ]


def test_bad_rows_name_file_and_line():
    tok = toy.load_tokenizer()
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "only a prompt"}]
    with pytest.raises(errors.DataError, match=r"data.jsonl:2"):
        chat.encode_rows(rows, tok, toy.TRAINING_CHAT_TEMPLATE, False, 512, "data.jsonl")
    with pytest.raises(errors.DataError, match=r"data.jsonl:1: .*max-length"):
        chat.encode_rows(
            [{"text": "x" * 100}], tok, toy.TRAINING_CHAT_TEMPLATE, False, 50, "data.jsonl"
        )


def test_pack_fills_rows_greedily_up_to_max_length():
    examples = [([1] * 3, [1] * 3), ([2] * 4, [1] * 4), ([3] * 2, [1] * 2)]
    assert chat.pack(examples, 6) == [[examples[0]], [examples[1], examples[2]]]


def test_split_conversation_and_target_ids():
    tok = toy.load_tokenizer()
    msgs = SINGLE_TURNS[0]
    prompt, target = chat.split_conversation({"messages": msgs}, tok, "x:1")
    rendered = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    # the last turn as the template renders it after the generation prompt, through <|im_end|>
    assert prompt == msgs[:-1] and target.endswith("<|im_end|>")
    assert tok.apply_chat_template(msgs, tokenize=False).startswith(rendered + target)
    assert chat.split_conversation({"prompt": "Q", "completion": "A"}, tok, "x:2") == (
        "Q",
        "A<|im_end|>",
    )
    assert chat.target_ids(None, tok, "x:3", 4) is None
    assert chat.target_ids("ab", tok, "x:3", 4) == tok("ab", add_special_tokens=False)["input_ids"]
    with pytest.raises(errors.DataError, match=r"x:3: target: 5 tokens \(allowed 1..4"):
        chat.target_ids("abcde", tok, "x:3", 4)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "robot", "content": "hi"}], "turn 1: role 'robot' is not one of system, user"),
        ([{"role": "user"}], "turn 1: 'content' missing or not a string"),
        ([{"role": "user", "content": "a"}, "hi"], "turn 2: expected an object, got str"),
    ],
)
def test_every_turn_is_checked_before_a_template_renders_it(messages, message):
    row = {"messages": messages + [{"role": "assistant", "content": "ok"}]}
    with pytest.raises(errors.DataError, match=f"^d.jsonl:7: field 'messages': {message}"):
        chat.check_fields(row, "d.jsonl:7")
    with pytest.raises(errors.DataError, match=f"^d.jsonl:7: field 'prompt': {message}"):
        sampling.encode_prompts(
            [{"prompt": messages, "_line": 7}], toy.load_tokenizer(), "d.jsonl", 64
        )
    chat.check_fields(
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, "x"
    )
