"""Chat templates of any causal LM: the assistant-only loss mask, the end-of-turn token, and text
markers.

- `assistant_mask`: token ids of a conversation and a mask that is 1 on what each assistant turn
  writes (its content and its end-of-turn token, not the role header). From `{% generation %}` tags
  where the template has them; otherwise turn by turn with the template itself: the tokens that
  `messages[:i+1]` adds to `messages[:i]` + generation prompt belong to assistant turn i. That needs
  every rendering to be a token prefix of the next one, which is checked (a template that rewrites
  earlier turns as the conversation grows, as Qwen3's stock template drops earlier thoughts, is a
  `ConfigError`);
- `end_of_turn_id`: the token a template writes right after assistant content (Qwen3's and SmolLM2's
  `<|im_end|>`, Llama 3's `<|eot_id|>`), found by rendering a one-turn conversation;
- `marker_ids` / `find_ids` / `marker_span`: a text marker such as `</think>` in a list of token
  ids, whether the
  tokenizer has it as one token (Qwen3) or splits it into several (SmolLM2: `</`, `think`, `>`).
"""

from __future__ import annotations

import sys

import errors

GENERATION_TAGS = (
    "{% generation %}",
    "{%- generation %}",
    "{% generation -%}",
    "{%- generation -%}",
)


def has_generation_tags(template: str | None) -> bool:
    return bool(template) and any(tag in template for tag in GENERATION_TAGS)


def render_ids(
    tokenizer,
    messages: list[dict],
    template: str | None = None,
    add_generation_prompt: bool = False,
) -> list[int]:
    """The conversation through the chat template, tokenized as apply_chat_template does (no extra
    specials)."""
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer, template: str | None = None) -> int | None:
    """The special token the template writes right after an assistant turn's content; None when the
    template writes none (or there is no template). Whitespace between content and the token is
    skipped."""
    content = "Sure."
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}],
            chat_template=template,
            tokenize=False,
        )
    except Exception:  # no template, or one that wants other roles: no end-of-turn token to report
        return None
    at = text.rfind(content)
    if at < 0:
        return None
    special = set(tokenizer.all_special_ids) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    for i in tokenizer(text[at + len(content) :], add_special_tokens=False)["input_ids"]:
        if i in special:
            return i
        if tokenizer.decode(
            [i]
        ).strip():  # plain text first: the template ends turns with no special token
            return None
    return None


def assistant_mask(
    tokenizer, messages: list[dict], template: str | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a conversation, mask 1 on each assistant turn's output; `template`
    overrides the tokenizer's. ConfigError when the template cannot give the mask."""
    template = template or tokenizer.chat_template
    if not template:
        raise errors.ConfigError(
            "the tokenizer has no chat template, so chat messages cannot be rendered; give it "
            "one or use {'prompt', 'completion'} / {'text'} rows"
        )
    if has_generation_tags(template):
        enc = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    return turn_by_turn_mask(tokenizer, messages, template)


def turn_by_turn_mask(
    tokenizer, messages: list[dict], template: str
) -> tuple[list[int], list[int]]:
    """The mask without generation tags: what rendering assistant turn i adds after the generation
    prompt, up to and including the end-of-turn token (the newline a template writes after it is
    never generated)."""
    ids = render_ids(tokenizer, messages, template)
    mask = [0] * len(ids)
    eot = end_of_turn_id(tokenizer, template)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = (
            render_ids(tokenizer, messages[:i], template, add_generation_prompt=True) if i else []
        )
        after = render_ids(tokenizer, messages[: i + 1], template)
        if after[: len(before)] != before or ids[: len(after)] != after:
            raise errors.ConfigError(
                f"chat template: the conversation rendered up to assistant turn {i} is not a token "
                "prefix of the "
                "longer renderings (the template rewrites earlier turns, e.g. drops their "
                "thoughts, or merges "
                "tokens across turns), so the assistant-only mask cannot be built turn by turn; "
                "give the tokenizer "
                f"a template with {{% generation %}}...{{% endgeneration %}} around assistant "
                "output"
            )
        end = len(after)
        if eot is not None and eot in after[len(before) :]:
            end = len(after) - after[::-1].index(
                eot
            )  # through the last end-of-turn token of the turn
        mask[len(before) : end] = [1] * (end - len(before))
    return ids, mask


# ---- markers such as </think> --------------------------------------------------------------------


def marker_ids(tokenizer, marker: str, warn: str = "") -> list[int]:
    """The token ids of `marker` written alone: one id where the tokenizer has it as a token, else
    its pieces. `warn` (a script name): say so in one line on stderr when it is several tokens."""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if warn and len(ids) > 1:
        print(
            f"{warn}: {marker} is {len(ids)} tokens of this tokenizer, not one: it is looked for "
            "in the decoded "
            f"text (sft_think.py --train-tokens can add it as one token)",
            file=sys.stderr,
            flush=True,
        )
    return ids


def find_ids(ids: list[int], sub: list[int], last: bool = False) -> int | None:
    """Index of the first (or last) occurrence of the id sequence `sub` in `ids`; None when
    absent."""
    n = len(sub)
    if not n:
        return None
    starts = range(len(ids) - n, -1, -1) if last else range(len(ids) - n + 1)
    return next((s for s in starts if ids[s : s + n] == sub), None)


def marker_span(tokenizer, ids: list[int], marker: str) -> tuple[int, int] | None:
    """[start, end) of the tokens that hold the first `marker` in the decoded text of `ids`; None
    when absent.

    The marker's own ids are looked up first; a model may also write a marker in other pieces (a
    token that joins `>` with the next characters, or Qwen3's `</think>` spelt in characters), so
    the decoded text decides: `end` is the shortest prefix whose text holds the marker, `start` the
    longest one whose text ends before it."""
    sub = marker_ids(tokenizer, marker)
    at = find_ids(ids, sub)
    if at is not None and marker not in tokenizer.decode(ids[:at], skip_special_tokens=False):
        return at, at + len(sub)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    pos = text.find(marker)
    if pos < 0:
        return None
    lo, hi = 1, len(ids)  # the text of ids[:hi] holds the marker; find the smallest such hi
    while lo < hi:
        mid = (lo + hi) // 2
        if marker in tokenizer.decode(ids[:mid], skip_special_tokens=False):
            hi = mid
        else:
            lo = mid + 1
    start = hi - 1
    while start > 0 and len(tokenizer.decode(ids[:start], skip_special_tokens=False)) > pos:
        start -= 1
    return start, hi
