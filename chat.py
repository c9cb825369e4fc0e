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
  ids, whether the tokenizer has it as one token (Qwen3) or splits it into several (SmolLM2: `</`,
  `think`, `>`); `add_marker_tokens` makes the split ones tokens of their own;
- training rows to token ids: `encode_row` / `encode_rows` turn a JSONL row of any accepted schema
  ({'messages'}, {'prompt', 'completion'}, {'text'}) into (input_ids, loss mask) with the template
  of `training_template` (`strip_thoughts` for a run without thoughts); `pack` and `collate` make
  batches of them, packed or padded; `split_conversation` / `target_ids` give a row's prompt and
  its target (the last assistant turn, or the completion) for methods that sample from the prompt.
"""

from __future__ import annotations

import re
import sys

import torch

import errors
from toy.model import TRAINING_CHAT_TEMPLATE

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


def add_marker_tokens(tokenizer, markers: str) -> dict[str, list[int]]:
    """The markers of a comma list (e.g. '<think>,</think>') that this tokenizer splits into pieces
    (SmolLM2 writes `</think>` as `</`, `think`, `>`) become new tokens, to be added before the data
    is encoded so the training text holds them as one token each. They are added as ordinary, not
    special, tokens, as Qwen3 has its own: decoded text keeps them. Returns each added token's
    former pieces (loading.grow_embeddings starts its new embedding row at their mean)."""
    names = [t.strip() for t in markers.split(",") if t.strip()]
    pieces = {n: marker_ids(tokenizer, n) for n in names}
    new = {n: ids for n, ids in pieces.items() if len(ids) != 1}
    if new:
        tokenizer.add_tokens(list(new))
    return new


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


# ---- training rows -> token ids -----------------------------------------------------------------

THINK_RE = re.compile(r"<think>.*?</think>\s*", re.DOTALL)

ROW_FIELDS = {  # field: (accepted JSON types, what the error says is expected)
    "messages": (list, "a list of {'role', 'content'} objects"),
    "prompt": ((str, list), "a string or a list of messages"),
    "completion": ((str, list), "a string or a list of messages"),
    "text": (str, "a string"),
}


def strip_thoughts(messages: list[dict]) -> list[dict]:
    """The same conversation without reasoning: the `raw` arm of
    Jarrodbarnes/qwen3-0.6B-interleaved-thinking."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if m.get("role") == "assistant" and isinstance(m.get("content"), str):
            m["content"] = THINK_RE.sub("", m["content"])
        out.append(m)
    return out


def training_template(tokenizer) -> str | None:
    """The chat template that renders the training conversations: the tokenizer's own when it has
    {% generation %} tags; for Qwen3's stock template (which drops the thoughts of earlier turns)
    the training variant that keeps them; else the tokenizer's own, masked turn by turn
    (assistant_mask). None when the tokenizer has no template (then only prompt/completion
    strings and text rows can be encoded)."""
    template = tokenizer.chat_template or None
    if template is None or has_generation_tags(template):
        return template
    # Qwen3's stock template (real or toy)
    qwen3 = "<|im_start|>" in template and "<think>" in template and "reasoning_content" in template
    return TRAINING_CHAT_TEMPLATE if qwen3 else template


def fold_reasoning(messages: list[dict], template: str) -> list[dict]:
    """A template that never reads `reasoning_content` (SmolLM2's, most non-Qwen3 ones) would drop
    the thought: write it into the content as `<think>...</think>`, the form Qwen3's template
    renders."""
    if "reasoning_content" in template:
        return messages
    out = []
    for m in messages:
        if m.get("reasoning_content"):
            thought = m["reasoning_content"].strip()
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = f"<think>\n{thought}\n</think>\n\n{m.get('content') or ''}"
        out.append(m)
    return out


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates render


def check_messages(messages: list, where: str, field: str) -> None:
    """Every turn of a conversation is an object whose role is one of ROLES and whose content is a
    string (or null beside tool calls or a thought), checked before any template renders it (a
    template drops an unknown role silently)."""
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise errors.DataError(
                f"{where}: field {field!r}: turn {k}: expected an object, got {type(m).__name__}"
            )
        if m.get("role") not in ROLES:
            raise errors.DataError(
                f"{where}: field {field!r}: turn {k}: role {m.get('role')!r} is not one of "
                f"{', '.join(ROLES)}"
            )
        tool_or_thought = m.get("tool_calls") or m.get("reasoning_content")
        if not isinstance(m.get("content"), str) and not (
            m.get("content") is None and tool_or_thought
        ):
            raise errors.DataError(
                f"{where}: field {field!r}: turn {k}: 'content' missing or not a string"
            )


def check_fields(row: dict, where: str) -> None:
    """Each field of ROW_FIELDS that the row has holds an accepted type, and every conversation
    its turns (check_messages)."""
    for name, (types, expected) in ROW_FIELDS.items():
        if name not in row:
            continue
        if not isinstance(row[name], types):
            raise errors.DataError(
                f"{where}: field {name!r}: expected {expected}, got {type(row[name]).__name__}"
            )
        if isinstance(row[name], list):
            check_messages(row[name], where, name)


def encode_row(
    row: dict, where: str, tokenizer, template: str | None, no_think: bool
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = trained) for one JSONL row of any accepted schema."""
    check_fields(row, where)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if "messages" in row:
        messages = strip_thoughts(row["messages"]) if no_think else row["messages"]
        if not any(m.get("role") == "assistant" for m in messages):
            raise errors.DataError(f"{where}: field 'messages' has no assistant turn")
        if not template:
            raise errors.ConfigError(
                f"{where}: chat messages need a chat template and the tokenizer has none; "
                f"give it one, or write {{'prompt', 'completion'}} strings or {{'text'}} rows"
            )
        return assistant_mask(tokenizer, fold_reasoning(messages, template), template)
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list):  # conversational prompt/completion
            return encode_row(
                {"messages": row["prompt"] + row["completion"]},
                where,
                tokenizer,
                template,
                no_think,
            )
        completion = THINK_RE.sub("", row["completion"]) if no_think else row["completion"]
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        return p + c, [0] * len(p) + [1] * len(c)
    if "text" in row:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
        return ids, [1] * len(ids)
    raise errors.DataError(
        f"{where}: expected a 'messages', 'prompt'+'completion' or 'text' field, got {sorted(row)}"
    )


def encode_rows(rows, tokenizer, template, no_think, max_length, source):
    """`encode_row` on every row of `source`, each at most `max_length` tokens with something to
    train on; errors name `source`:line."""
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        ids, mask = encode_row(row, where, tokenizer, template, no_think)
        if len(ids) > max_length:
            raise errors.DataError(f"{where}: {len(ids)} tokens > --max-length {max_length}")
        if sum(mask) == 0:
            raise errors.DataError(f"{where}: nothing to train on (empty loss mask)")
        examples.append((ids, mask))
    return examples


def pack(examples, max_length):
    """Greedy packing into rows of at most max_length tokens: each row is a list of examples, and
    `collate` gives each its own positions (restarting at 0) and a block-diagonal causal mask, so no
    token attends across an example boundary and the loss is exactly the unpacked one."""
    rows, cur, used = [], [], 0
    for ids, mask in examples:
        if cur and used + len(ids) > max_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append((ids, mask))
        used += len(ids)
    if cur:
        rows.append(cur)
    return rows


def collate(batch, pad_id, device, mask_dtype=torch.float32):
    """Right-padded tensors (input_ids, attention_mask, loss_mask, position_ids) of a list of
    examples, or of packed rows (lists of examples): then attention_mask is a 4D additive mask [B,
    1, T, T] that keeps each example to itself, and position_ids restart at every example."""
    packed = bool(batch) and isinstance(batch[0], list)
    rows = batch if packed else [[ex] for ex in batch]
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, width), dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    # which example a token belongs to; -1 = padding
    seg = torch.full((B, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for j, (x, m) in enumerate(row):
            ids[b, at : at + len(x)] = torch.tensor(x)
            loss_mask[b, at : at + len(m)] = torch.tensor(m)
            pos[b, at : at + len(x)] = torch.arange(len(x))
            seg[b, at : at + len(x)] = j
            at += len(x)
    attn = (seg >= 0).long()
    if packed:
        # query q sees key k when both are in the same example and k <= q; a padding query sees
        # itself (no NaN rows)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = (same & causal) | torch.eye(width, dtype=torch.bool)
        attn = torch.zeros(B, 1, width, width, dtype=mask_dtype).masked_fill(
            ~allowed[:, None], torch.finfo(mask_dtype).min
        )
    return ids.to(device), attn.to(device), loss_mask.to(device), pos.to(device)


def split_conversation(row: dict, tokenizer, where: str) -> tuple[list | str, str | None]:
    """(prompt, target text) of a row: {'messages'} = the turns before the last (an assistant turn)
    and that turn as the chat template renders it after the generation prompt (thought included);
    {'prompt', 'completion'?}."""
    check_fields(row, where)
    if "messages" in row:
        msgs = row["messages"]
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise errors.DataError(
                f"{where}: field 'messages': expected a list ending with an assistant turn"
            )
        # the prompt as sampling.render_prompt writes it: the template with the generation prompt
        prompt_text = tokenizer.apply_chat_template(
            msgs[:-1], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt_text):
            raise errors.DataError(
                f"{where}: field 'messages': the chat template renders the conversation with a "
                f"different start than its prompt; pass {{'prompt', 'completion'}} rows instead"
            )
        eos = tokenizer.eos_token or ""
        target = full[len(prompt_text) :]
        target = (
            target[: target.rindex(eos) + len(eos)] if eos and eos in target else target.rstrip()
        )
        return msgs[:-1], target
    if "prompt" not in row:
        raise errors.DataError(
            f"{where}: expected 'messages' or 'prompt' (present: "
            f"{', '.join(sorted(row)) or 'none'})"
        )
    completion = row.get("completion")
    if completion is not None and not isinstance(completion, str):
        raise errors.DataError(
            f"{where}: field 'completion': expected str, got {type(completion).__name__}"
        )
    if (
        completion is not None
        and tokenizer.eos_token
        and not completion.endswith(tokenizer.eos_token)
    ):
        completion += tokenizer.eos_token  # the student learns to stop where the target stops
    return row["prompt"], completion


def target_ids(target: str | None, tokenizer, where: str, max_length: int) -> list[int] | None:
    """The token ids of a target text from `split_conversation` (None stays None), 1 to
    `max_length` of them."""
    if target is None:
        return None
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not 1 <= len(ids) <= max_length:
        raise errors.DataError(
            f"{where}: target: {len(ids)} tokens (allowed 1..{max_length}, --max-length)"
        )
    return ids
