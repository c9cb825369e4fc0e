"""Rollouts: prompts in, completions out, and their log-probs, the same way in every script.

- `render_prompt` / `encode_prompts`: a prompt (text, or chat messages through the chat template) to
  token ids,
  with errors that name file:line and field;
- `cut_documents`: documents cut by tokens into a prefix (a prompt) and the true continuation;
- `step_generator`: the generator of one training batch on one rank, so a resumed run samples the
  same;
- `sample`: our own KV-cache decoding loop over left-padded prompts (n samples per prompt sharing
  one prefill, temperature, top-p, stop ids and stop strings; optionally a static KV cache and a
  compiled decode step) returning a `Rollout`, whose completion mask is 1 up to and including the
  first stop token (never inferred from the pad id, which may equal EOS);
- `sequence_logprobs`: log pi(token) of the completion tokens (and the entropy) through the fused
  LM-head kernel, so [B, T, V] logits are never held; the rows of a group run their shared prompt
  once (`completion_hidden`);
- `micro_batch`: some rows of a rollout without the columns that are padding in all of them;
- `rollout_logprobs`: sequence_logprobs of a whole rollout, in micro-batches, without gradients.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import weakref
from dataclasses import dataclass

import torch

import chat
import errors
import lora

# ---- Prompts -------------------------------------------------------------------------------------


def render_prompt(prompt, tokenizer) -> str:
    """A list of chat messages goes through the chat template with the generation prompt; a string
    stays as is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompts(
    rows: list[dict], tokenizer, source: str, max_prompt_length: int, field: str = "prompt"
) -> list[dict]:
    """Each row as {"ids": prompt token ids, field: the rendered text, + its other columns, "_line"
    dropped}.

    `field` holds a string or a list of {"role", "content"} messages; an error names `source`:line
    and the field
    (rows carry "_line", their line in the file, when they were read from one)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        if field not in row:
            raise errors.DataError(
                f"{where}: field {field!r}: missing (present: {', '.join(sorted(row)) or 'none'})"
            )
        prompt = row[field]
        if not isinstance(prompt, (str, list)):
            raise errors.DataError(
                f"{where}: field {field!r}: expected a string or a list of "
                f"{{'role': str, 'content': str}} messages, got {type(prompt).__name__}"
            )
        if isinstance(prompt, list):
            chat.check_messages(prompt, where, field)
        text = render_prompt(prompt, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > max_prompt_length:
            raise errors.DataError(
                f"{where}: field {field!r}: {len(ids)} tokens (allowed 1..{max_prompt_length})"
            )
        out.append({**{k: v for k, v in row.items() if k != "_line"}, field: text, "ids": ids})
    return out


def cut_documents(
    rows: list[dict],
    tokenizer,
    source: str,
    prefix_tokens: int,
    continuation_tokens: int,
    *,
    min_tokens: int,
    too_short: str | None = None,
) -> tuple[list[dict], int]:
    """Each row's 'text' cut by tokens into its first prefix_tokens tokens (a prompt) and the (at
    most) continuation_tokens after them (the true continuation): [{**the row's other fields,
    "prefix_ids", "continuation_ids", "prefix", "continuation"}] (the texts decoded from the ids),
    and how many short documents were skipped.

    A document of fewer than `min_tokens` tokens is skipped and counted, or, when `too_short` is
    given, an error "source:line: field 'text': N tokens" followed by `too_short`. A missing or
    non-string 'text' is an error naming source:line (rows carry "_line" when read from a file)."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        text = row.get("text")
        if not isinstance(text, str):
            got = "missing" if text is None else f"expected str, got {type(text).__name__}"
            raise errors.DataError(f"{where}: field 'text': {got}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens:
            if too_short is None:
                skipped += 1
                continue
            raise errors.DataError(f"{where}: field 'text': {len(ids)} tokens{too_short}")
        prefix, continuation = (
            ids[:prefix_tokens],
            ids[prefix_tokens : prefix_tokens + continuation_tokens],
        )
        out.append(
            {
                **{k: v for k, v in row.items() if k != "text"},
                "prefix_ids": prefix,
                "continuation_ids": continuation,
                "prefix": tokenizer.decode(prefix),
                "continuation": tokenizer.decode(continuation),
            }
        )
    return out, skipped


# ---- Sampling ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """n completions per prompt; row i*n+j is sample j of prompt i (group[row] == i)."""

    prompt_ids: torch.Tensor  # [R, P] left-padded
    prompt_mask: torch.Tensor  # [R, P] 1 on prompt tokens
    completion_ids: torch.Tensor  # [R, C] right-padded
    completion_mask: torch.Tensor  # [R, C] 1 up to and including the first EOS / stop token
    finished: (
        torch.Tensor
    )  # [R] bool: ended by EOS or a stop string (False = cut by max_new_tokens)
    group: torch.Tensor  # [R] long: prompt index

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion side by side, the input of sequence_logprobs(...,
        logits_to_keep=C)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """prompt_mask and completion_mask side by side (0 on padding and after the end of a
        completion)."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def tokens(self) -> list[list[int]]:
        """Each completion's token ids (masked part only: up to and including its end)."""
        return [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Decoded completions (masked part only)."""
        return tokenizer.batch_decode(self.tokens(), skip_special_tokens=skip_special_tokens)

    def length_metrics(self) -> dict:
        """The completions' mean, min and max length in tokens, and the share cut by the budget
        (never ended), under TRL's names."""
        lengths = self.completion_mask.sum(1).float()
        return {
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": (~self.finished).float().mean().item(),
        }


def rollout_from_tokens(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device,
    finished: list[bool] | None = None,
    group: torch.Tensor | None = None,
) -> Rollout:
    """Given prompt and completion token lists in the sampler's layout (prompts left-padded,
    completions right-padded, masks 1 on real tokens), so sequence_logprobs scores them as it scores
    samples. Every completion counts as finished unless `finished` says otherwise; row i is its own
    group unless `group` is given."""
    P, C = max(len(p) for p in prompts), max(1, max(len(c) for c in completions))

    def left(rows, width, value):
        return torch.tensor([[value] * (width - len(r)) + r for r in rows], device=device)

    def right(rows, width, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)

    return Rollout(
        prompt_ids=left(prompts, P, pad_id),
        prompt_mask=left([[1] * len(p) for p in prompts], P, 0),
        completion_ids=right(completions, C, pad_id),
        completion_mask=right([[1] * len(c) for c in completions], C, 0),
        finished=torch.tensor(
            [True] * len(prompts) if finished is None else finished, device=device
        ),
        group=torch.arange(len(prompts), device=device) if group is None else group,
    )


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, the model's generation_config EOS ids,
    and the chat template's end-of-turn token (a base model's generation config names its
    end-of-text only, and a chat completion ends with the template's end of turn: Qwen3's
    `<|im_end|>`, Llama 3's `<|eot_id|>`)."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    if getattr(tokenizer, "chat_template", None):
        ids.add(chat.end_of_turn_id(tokenizer))
    return sorted(i for i in ids if i is not None)


def _nucleus(probs: torch.Tensor, top_p: float, candidates: int = 256) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751): keep the smallest top set whose
    mass reaches top_p; a token is dropped when the mass strictly before it already exceeds top_p,
    so the most likely token stays.

    Sorting the whole vocabulary costs ~4 s per step for 256 rows x 151,936 on a CPU core pair. The
    (c+1)-th most likely token is dropped exactly when the top c hold more than top_p, so rows where
    the top `candidates` do (a trained model at T < 1: nearly all) are cut from a top-k instead; the
    rest are sorted. On CUDA the sort is
    cheap and the check would wait for the device every step: it sorts."""

    def cut(sorted_p, order, out):
        return out.scatter_(
            -1, order, sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
        )

    if probs.device.type == "cuda" or probs.shape[-1] <= 4 * candidates:
        return cut(*probs.sort(dim=-1, descending=True), torch.zeros_like(probs))
    top, order = probs.topk(candidates, dim=-1)  # sorted, largest first
    inside = top.sum(-1) > top_p
    out = torch.zeros_like(probs)
    if bool(inside.all()):
        return cut(top, order, out)
    rows = (~inside).nonzero().squeeze(1)
    out[rows] = cut(*probs[rows].sort(dim=-1, descending=True), torch.zeros_like(probs[rows]))
    keep = inside.nonzero().squeeze(1)
    out[keep] = cut(top[keep], order[keep], torch.zeros_like(probs[keep]))
    return out


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator):
    """The next token of each row, and for sampling a 0-dim bool: were the probabilities finite."""
    if greedy or temperature == 0:
        return logits.argmax(-1), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    ok = torch.isfinite(probs.sum())
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    # What torch.multinomial(probs, 1) computes (argmax of p / q, q ~ Exp(1): the same draws, the
    # same tokens), without the validity check that waits for the device on every call; `ok` is
    # checked where the loop syncs.
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1).to(logits.device), ok


def _stop_hits(tokenizer, rows: list[list[int]], stop: list[str]) -> list[bool]:
    """Did the last token of each row complete a stop string? Only text ending in the new characters
    counts."""
    window = (
        max(len(s.encode("utf-8")) for s in stop) + 2
    )  # a token adds >= 1 byte, so this covers any stop
    longest = max(len(s) for s in stop)
    cur = tokenizer.batch_decode([r[-window:] for r in rows], skip_special_tokens=False)
    prev = tokenizer.batch_decode([r[-window:-1] for r in rows], skip_special_tokens=False)
    hits = []
    for c, p in zip(cur, prev):
        new = len(c) - len(p) if c.startswith(p) else len(c)
        tail = c[max(0, len(c) - new - longest + 1) :]
        hits.append(any(s in tail for s in stop))
    return hits


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long).to(device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).to(
        device
    )
    return ids, mask


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _select_rows(cache, index: torch.Tensor):
    """The cache holding rows `index` of its batch (a repeated index copies a row), or None if it
    cannot."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    if isinstance(cache, tuple) and all(
        isinstance(layer, tuple) for layer in cache
    ):  # legacy per-layer (k, v)
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)
    return None


def _cache_kwarg(module) -> str:
    """The name of module.forward's KV-cache argument: transformers 5 renamed past_key_values to
    cache (the old name warns, then goes away)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _prefill(model, prompts: list[list[int]], counts: list[int], pad_id: int, device):
    """One forward per distinct prompt; its KV cache and next-token logits are then repeated for its
    `counts` rows. Returns the rows' prompt ids, mask, positions, the cache and the [R, V]
    logits."""
    ids, mask = _left_pad(prompts, pad_id, device)
    # Left padding shifts real tokens right; positions counted over real tokens keep each row
    # identical to its unpadded run (RoPE is shift-invariant, but absolute-position models and
    # numerics are not).
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    cache, logits = _cache_of(out), out.logits[:, -1, :]
    if any(c != 1 for c in counts):
        index = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], device=device)
        cache = _select_rows(cache, index)
        if cache is None:  # a cache type we cannot repeat: prefill every row instead
            rows = [p for p, c in zip(prompts, counts) for _ in range(c)]
            return _prefill(model, rows, [1] * len(rows), pad_id, device)
        ids, mask, pos, logits = ids[index], mask[index], pos[index], logits[index]
    return ids, mask, pos, cache, logits


@functools.cache
def _preallocated_layer():
    """A transformers DynamicLayer whose keys and values are views into buffers with room to grow: a
    new token is written in place, where DynamicLayer's torch.cat copies the whole cache on every
    step (a fifth of a 128-token rollout's time on the toy model, on CPU). Rows leave
    (batch_select_indices) as in a DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, layer, capacity: int):
            super().__init__()
            self.device, self.is_initialized, self.length = (
                layer.keys.device,
                True,
                layer.keys.shape[-2],
            )
            self.buffers = [
                t.new_empty(t.shape[:2] + (max(capacity, self.length), t.shape[-1]))
                for t in (layer.keys, layer.values)
            ]
            for buf, t in zip(self.buffers, (layer.keys, layer.values)):
                buf[:, :, : self.length] = t
            self._views()

        def _views(self):
            self.keys, self.values = (buf[:, :, : self.length] for buf in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.buffers[0].shape[-2]:  # out of room: twice the room
                self.buffers = [
                    torch.cat([buf, torch.empty_like(buf)], dim=-2) for buf in self.buffers
                ]
            for buf, t in zip(self.buffers, (key_states, value_states)):
                buf[:, :, self.length : end] = t
            self.length = end
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self.buffers = [buf[indices] for buf in self.buffers]
            self._views()

    return PreallocatedLayer


def _preallocate(cache, capacity: int):
    """The DynamicCache's layers with room for `capacity` positions each; any other cache as it
    is."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        cache.layers = [_preallocated_layer()(layer, capacity) for layer in layers]
    return cache


def _static_cache(model, cache, max_cache_len: int):
    """A transformers StaticCache of max_cache_len positions holding the prefilled (DynamicCache)
    rows. Its layers write at the cache's own running length, the same column for every row, as the
    dynamic cache does; the per-row position_ids of left-padded rows only feed RoPE, so both need
    nothing else."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    layers, config = getattr(cache, "layers", None), getattr(model, "config", None)
    static = (
        StaticCache(config=config, max_cache_len=max_cache_len)
        if layers and config is not None
        else None
    )
    if (
        static is None
        or len(layers) != len(static.layers)
        or any(type(s) is not StaticLayer for s in static.layers)
    ):
        raise ValueError(
            "static_cache=True needs a model whose layers are all full attention and which "
            "returns a "
            "transformers Cache (sliding-window and legacy tuple caches: use static_cache=False)"
        )
    for s, d in zip(static.layers, layers):
        s.lazy_initialization(d.keys[:, :, :0], d.values[:, :, :0])
        width = d.keys.shape[-2]
        s.keys[:, :, :width].copy_(d.keys)
        s.values[:, :, :width].copy_(d.values)
        s.cumulative_length.fill_(width)
    return static


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_forward(model):
    """model's forward under torch.compile, built once per model: CUDA graphs ("reduce-overhead") on
    CUDA, where replaying one graph per token removes the kernel-launch overhead that dominates
    small-batch decoding."""
    device = next(model.parameters()).device
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    fns = _COMPILED.setdefault(model, {})
    if mode not in fns:
        fns[mode] = torch.compile(model.__call__, mode=mode, dynamic=False)
    fn = fns[mode]
    if device.type != "cuda":
        return fn

    def step(**kwargs):
        # the previous token's outputs are consumed by now
        torch.compiler.cudagraph_mark_step_begin()
        return fn(**kwargs)

    return step


def _true_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of mask's True entries, in order, given their number (known on the host: no
    device sync)."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


def _stop_step(tokenizer, stop, history, alive, picked, writing) -> torch.Tensor:
    """Appends the new tokens of the writing rows to their host-side history; which batch rows
    completed a stop."""
    host_alive, host_tok, host_writing = torch.stack([alive, picked, writing.long()]).tolist()
    live = [b for b, w in enumerate(host_writing) if w]
    for b in live:
        history[host_alive[b]].append(host_tok[b])
    hit = [False] * len(host_alive)
    for b, h in zip(live, _stop_hits(tokenizer, [history[host_alive[b]] for b in live], stop)):
        hit[b] = h
    return torch.tensor(hit, device=picked.device)


# The host learns which rows have ended every step when it must (a draw covers the rows still
# writing only, and stop strings are decoded on the host), otherwise every CHECK_EVERY steps;
# finished rows ride along writing pad until a check drops them from the KV cache: at every
# CHECK_EVERY-th step, or once a quarter of the batch ended.
CHECK_EVERY = 8
STATIC_BLOCK = 64


def _sample_rows(
    model,
    tokenizer,
    prompts,
    counts,
    max_new_tokens,
    temperature,
    top_p,
    stop,
    eos,
    greedy,
    generator,
    pad_id,
    device,
    static_cache=False,
    compile_decode=False,
):
    R = sum(counts)
    if max_new_tokens <= 0:
        ids, mask = _left_pad(
            [p for p, c in zip(prompts, counts) for _ in range(c)], pad_id, device
        )
        return (
            ids,
            mask,
            ids.new_zeros((R, 0)),
            ids.new_zeros((R, 0)),
            torch.zeros(R, dtype=torch.bool, device=device),
        )
    prompt_ids, prompt_mask, pos, cache, logits = _prefill(model, prompts, counts, pad_id, device)
    cache_kwarg = _cache_kwarg(model)
    forward, mask, next_pos = model, prompt_mask, pos[:, -1:] + 1
    if not static_cache:
        cache = _preallocate(cache, prompt_ids.shape[1] + max_new_tokens)
    else:
        size = prompt_ids.shape[1] + max_new_tokens
        if (
            compile_decode
        ):  # whole blocks of positions, so rollouts whose prompts differ in width reuse one graph
            size = -(-size // STATIC_BLOCK) * STATIC_BLOCK
        cache = _static_cache(model, cache, size)
        # one mask for every step: columns not written yet are hidden by causality (they lie after
        # the query)
        mask = torch.cat(
            [prompt_mask, prompt_mask.new_ones((R, size - prompt_mask.shape[1]))], dim=1
        )
        forward = _compiled_forward(model) if compile_decode else model
    # Finished rows leave the KV cache when it can drop rows (DynamicCache; a StaticCache unless
    # compiled, where shapes and addresses stay fixed for the graph), so the long tail of one slow
    # completion does not pay for the whole batch; otherwise they ride along writing pad tokens.
    compact = not compile_decode if static_cache else hasattr(cache, "batch_select_indices")
    drawing = not (greedy or temperature == 0)
    # Draws cover the rows still writing, as if finished rows had left the batch at once: the same
    # generator gives the same samples however often rows are dropped. (Caches that never drop rows
    # draw for every row.)
    live_draws = drawing and (compact or static_cache)
    per_step = live_draws or bool(stop)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
    length = torch.full((R,), max_new_tokens, dtype=torch.long, device=device)  # of each completion
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    alive = torch.arange(R, device=device)  # the output row of each batch row, in KV-cache order
    writing = torch.ones(R, dtype=torch.bool, device=device)  # batch rows that have not ended
    n_writing, ok_all, history = (
        R,
        torch.ones((), dtype=torch.bool, device=device),
        [[] for _ in range(R)],
    )
    for step in range(max_new_tokens):
        B = alive.shape[0]
        if live_draws and n_writing < B:
            rows = _true_rows(writing, n_writing)
            picked, ok = _next_tokens(logits[rows], temperature, top_p, greedy, generator)
            picked = torch.full((B,), pad_id, dtype=torch.long, device=device).index_copy_(
                0, rows, picked
            )
        else:
            picked, ok = _next_tokens(logits, temperature, top_p, greedy, generator)
        if ok is not None:
            ok_all &= ok
        picked = torch.where(writing, picked, pad_id)
        tokens[alive, step] = picked
        ended = writing & torch.isin(picked, eos_t)
        if stop:
            ended |= _stop_step(tokenizer, stop, history, alive, picked, writing)
        length[alive] = torch.where(
            ended, step + 1, length[alive]
        )  # the EOS / stop token stays in the mask
        finished[alive] |= ended
        writing &= ~ended
        last = step == max_new_tokens - 1
        if last or per_step or (step + 1) % CHECK_EVERY == 0:
            n_writing, ok_host = torch.stack([writing.sum(), ok_all.long()]).tolist()
            if not ok_host:
                raise RuntimeError(
                    "sampling: probability tensor contains either inf, nan or element < 0 "
                    "(non-finite logits)"
                )
            if last or n_writing == 0:
                break
            n_ended = B - n_writing
            if compact and n_ended and (4 * n_ended >= B or (step + 1) % CHECK_EVERY == 0):
                keep = _true_rows(writing, n_writing)
                if static_cache:  # StaticLayer has no batch_select_indices
                    for layer in cache.layers:
                        layer.keys, layer.values = (
                            layer.keys.index_select(0, keep),
                            layer.values.index_select(0, keep),
                        )
                else:
                    cache.batch_select_indices(keep)
                alive, mask, next_pos, picked, writing = (
                    alive[keep],
                    mask[keep],
                    next_pos[keep],
                    picked[keep],
                    writing[keep],
                )
        if not static_cache:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = forward(
            input_ids=picked[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kwarg: cache},
        )
        logits, next_pos = out.logits[:, -1, :], next_pos + 1
        if not static_cache:
            cache = _cache_of(out)
    width = int(
        length.max()
    )  # the loop may run past the step where the last row ended; those columns are pad
    completion_mask = (torch.arange(width, device=device) < length[:, None]).long()
    return prompt_ids, prompt_mask, tokens[:, :width], completion_mask, finished


def _pad_to(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([extra, x] if left else [x, extra], dim=1)


def step_generator(seed: int, step: int, rank: int, world: int, device) -> torch.Generator:
    """The generator that samples training batch `step` on rank `rank` of `world`: seeded by (seed,
    step, rank), so a resumed run draws the same completions and no two ranks draw the same."""
    return torch.Generator(device=device).manual_seed(seed * 100003 + step * world + rank)


def sample(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: list[str] | str | None = None,
    eos_token_ids: int | list[int] | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    merge_lora: bool = True,
    static_cache: bool = False,
    compile_decode: bool = False,
) -> Rollout:
    """n completions per prompt with a KV cache (no HF generate), `batch_size` rows at a time; see
    Rollout.

    Each distinct prompt of a chunk is prefilled once and its KV cache repeated for its samples;
    with batch_size a multiple of n (or None: one chunk) every chunk holds whole groups. For a given
    generator the samples do not depend on these choices of the loop (the draws follow the rows
    still writing, in row order).

    eos_token_ids: the ids that end a completion (default: stop_token_ids(model, tokenizer)).

    merge_lora: sample with each LoRA layer's W + (alpha/r) B A as one weight (lora.merged: ~25%
    faster on the toy, one extra copy of the adapted weights while sampling; 4-bit layers are left
    as they are).

    static_cache: decode into a transformers StaticCache pre-allocated to prompt width +
    max_new_tokens: no copy of the whole cache per token (a DynamicCache concatenates), each step
    attends over the full width (masked). compile_decode (needs static_cache): the one-token decode
    forward under torch.compile, with CUDA graphs on CUDA, shapes fixed (finished rows stay in the
    batch): a GPU option (compiling takes a while; on CPU it rarely pays)."""
    if compile_decode and not static_cache:
        raise ValueError(
            "compile_decode=True needs static_cache=True (a growing cache recompiles every step)"
        )
    rows_per_prompt = [
        tokenizer(p, add_special_tokens=False)["input_ids"]
        if isinstance(p, str)
        else [int(t) for t in p]
        for p in prompts
    ]
    if not rows_per_prompt:
        raise ValueError("sample() needs at least one prompt")
    for i, r in enumerate(rows_per_prompt):
        if not r:
            raise ValueError(f"prompt {i} is empty: sampling needs at least one prompt token")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(range(len(prompts)), key=lambda i: len(rows_per_prompt[i]))
    if context and len(rows_per_prompt[longest]) + max_new_tokens > context:
        start = tokenizer.decode(rows_per_prompt[longest][:12])
        raise errors.DataError(
            f"a prompt of {len(rows_per_prompt[longest])} tokens + {max_new_tokens} new tokens "
            f"is longer than the model's context of {context} tokens: {start!r}..."
        )
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    eos = (
        stop_token_ids(model, tokenizer)
        if eos_token_ids is None
        else ([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    )
    device = next(model.parameters()).device
    total = len(rows_per_prompt) * n
    group = torch.arange(len(prompts), device=device).repeat_interleave(n)
    batch_size = batch_size or total
    parts = []
    was_training = model.training
    model.eval()  # no dropout while sampling; the caller's mode comes back below
    try:
        with torch.inference_mode(), lora.merged(model) if merge_lora else contextlib.nullcontext():
            for start in range(0, total, batch_size):
                chunk = [
                    (i, len(list(rows)))
                    for i, rows in itertools.groupby(
                        range(start, min(start + batch_size, total)), key=lambda r: r // n
                    )
                ]
                parts.append(
                    _sample_rows(
                        model,
                        tokenizer,
                        [rows_per_prompt[i] for i, _ in chunk],
                        [c for _, c in chunk],
                        max_new_tokens,
                        temperature,
                        top_p,
                        stop,
                        eos,
                        greedy,
                        generator,
                        pad_id,
                        device,
                        static_cache,
                        compile_decode,
                    )
                )
    finally:
        model.train(was_training)
    P = max(p[0].shape[1] for p in parts)
    C = max(p[2].shape[1] for p in parts)
    # clone() outside inference mode: inference tensors cannot be saved for backward (embedding
    # lookups save ids)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(p[0], P, pad_id, left=True) for p in parts]).clone(),
        prompt_mask=torch.cat([_pad_to(p[1], P, 0, left=True) for p in parts]).clone(),
        completion_ids=torch.cat([_pad_to(p[2], C, pad_id, left=False) for p in parts]).clone(),
        completion_mask=torch.cat([_pad_to(p[3], C, 0, left=False) for p in parts]).clone(),
        finished=torch.cat([p[4] for p in parts]).clone(),
        group=group.clone(),
    )


# ---- Log-probs of completions without materialising [B, T, V] logits -----------------------------


def completion_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    group: torch.Tensor | None = None,
):
    """The decoder's final hidden states that predict the last K tokens, [B, K, H], and the model's
    LM head.

    The hidden state at position t predicts token t+1, so these are positions -K-1 .. -2. Positions
    count real tokens only (left padding does not shift them), as in sample(). What
    sequence_logprobs and a distillation loss feed to the fused LM-head kernels instead of [B, K, V]
    logits.

    group ([B], optional): rows with the same id share their first width - K columns (a rollout
    group's prompt), which then run once, their KV cache repeated for the rows and the gradient
    flowing back through the repeat: the values and gradients of one forward per row (up to float
    rounding) for 1/G of the prompt tokens. Not under checkpointing or active dropout."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    if hasattr(head, "lora_A") or getattr(head, "bias", None) is not None:
        raise NotImplementedError(
            "the fused LM-head kernels need a plain bias-free LM head (no LoRA on lm_head)"
        )
    K = logits_to_keep
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as in sample()
    P = input_ids.shape[1] - K  # the prompt's columns
    first = _group_firsts(group) if _can_share_prompts(model, group, P) else None
    if first is None or len(first) == len(group):
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return hidden[:, -K - 1 : -1], head
    rows = torch.searchsorted(group[first], group)  # each row's index among the firsts
    prompt = decoder(
        input_ids=input_ids[first, :P],
        attention_mask=attention_mask[first, :P],
        position_ids=position_ids[first, :P],
        use_cache=True,
    )
    last = prompt.last_hidden_state[rows, -1:]  # predicts each row's first completion token
    if K == 1:
        return last, head
    cache = _select_rows(_cache_of(prompt), rows)
    if cache is None:  # a cache type that cannot repeat rows: one forward per row after all
        return completion_hidden(model, input_ids, attention_mask, K)
    rest = decoder(
        input_ids=input_ids[:, P : P + K - 1],
        attention_mask=attention_mask[:, : P + K - 1],
        position_ids=position_ids[:, P : P + K - 1],
        use_cache=True,
        **{_cache_kwarg(decoder): cache},
    ).last_hidden_state
    return torch.cat([last, rest], 1), head


def _can_share_prompts(model, group: torch.Tensor | None, prompt_width: int) -> bool:
    """Whether completion_hidden may run each group's prompt once: not when a checkpointed model
    keeps no cache, nor under active dropout (the rows would share its masks)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # its name before transformers 5
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if group is None or prompt_width < 1 or checkpointing:
        return False
    return not (
        model.training and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    )


def _group_firsts(group: torch.Tensor) -> torch.Tensor | None:
    """The index of each group's first row, in group order; None unless the rows come in runs
    of equal, ascending ids (a rollout's rows, or a slice of them)."""
    if len(group) > 1 and bool((group[1:] < group[:-1]).any()):
        return None
    change = torch.ones_like(group, dtype=torch.bool)
    change[1:] = group[1:] != group[:-1]
    return change.nonzero().squeeze(1)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    group: torch.Tensor | None = None,
):
    """log pi(x_t | x_<t) / T-softmax for the last K tokens: [B, K] fp32 (and the entropy [B, K] if
    asked). group: rows sharing a prompt run it once (completion_hidden).

    The decoder's final hidden states go through the fused LM-head kernel in row chunks, so
    full-vocabulary logits are never held for the whole batch.
    """
    from vocab_kernels import linear_token_logprobs

    K = logits_to_keep
    h, head = completion_hidden(model, input_ids, attention_mask, K, group)
    B, _, H = h.shape
    out = linear_token_logprobs(
        h.reshape(B * K, H),
        head.weight,
        input_ids[:, -K:].reshape(B * K),
        temperature=temperature,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
    if return_entropy:
        return out[0].view(B, K), out[1].view(B, K)
    return out.view(B, K)


def micro_batch(roll: Rollout, rows) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids, attention_mask and completion width K of some rollout rows (a slice or index
    tensor), without the columns that are padding in every one of them (left of the prompts, right
    of the completions): less compute, the same log-probs, since positions are counted over real
    tokens."""
    pm, cm = roll.prompt_mask[rows], roll.completion_mask[rows]
    left = int((pm.sum(0) == 0).long().cumprod(0).sum())
    width = max(1, int(cm.sum(1).max()))
    ids = torch.cat([roll.prompt_ids[rows, left:], roll.completion_ids[rows, :width]], 1)
    return ids, torch.cat([pm[:, left:], cm[:, :width]], 1), width


def rollout_logprobs(
    model, roll: Rollout, micro_batch_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """[R, C] log-probs of every completion token of a rollout (C = its width, 0 past each row's
    micro-batch width) at `temperature`, `micro_batch_size` rows at a time, without gradients: the
    reference or old-policy log-probs of a policy-gradient update."""
    R, width = roll.completion_ids.shape
    full = torch.zeros(R, width, device=roll.completion_ids.device)
    with torch.no_grad():
        for s in range(0, R, micro_batch_size):
            ids, attn, K = micro_batch(roll, slice(s, s + micro_batch_size))
            full[s : s + micro_batch_size, :K] = sequence_logprobs(
                model,
                ids,
                attn,
                K,
                temperature=temperature,
                group=roll.group[s : s + micro_batch_size],
            )
    return full
