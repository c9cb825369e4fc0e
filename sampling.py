"""Rollouts: prompts in, completions out, and their log-probs, the same way in every script.

- `render_prompt` / `encode_prompts`: a prompt (text, or chat messages through the chat template) to token ids,
  with errors that name file:line and field;
- `sample`: our own KV-cache decoding loop over left-padded prompts (n samples per prompt, temperature, top-p,
  stop ids and stop strings) returning a `Rollout`, whose completion mask is 1 up to and including the first
  stop token (never inferred from the pad id, which may equal EOS);
- `sequence_logprobs`: log pi(token) of the completion tokens (and the entropy) through the fused LM-head kernel,
  so [B, T, V] logits are never held;
- `micro_batch`: some rows of a rollout without the columns that are padding in all of them.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

import common
import lora

# ---- Prompts -------------------------------------------------------------------------------------------------------


def render_prompt(prompt, tokenizer) -> str:
    """A list of chat messages goes through the chat template with the generation prompt; a string stays as is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompts(rows: list[dict], tokenizer, source: str, max_prompt_length: int, field: str = "prompt") -> list[dict]:
    """Each row as {"ids": prompt token ids, field: the rendered text, + its other columns, "_line" dropped}.

    `field` holds a string or a list of {"role", "content"} messages; an error names `source`:line and the field
    (rows carry "_line", their line in the file, when they were read from one)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        if field not in row:
            raise common.DataError(f"{where}: field {field!r}: missing (present: {', '.join(sorted(row)) or 'none'})")
        prompt = row[field]
        ok = isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt))
        if not ok:
            raise common.DataError(f"{where}: field {field!r}: expected a string or a list of "
                                   f"{{'role': str, 'content': str}} messages, got {type(prompt).__name__}")
        text = render_prompt(prompt, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > max_prompt_length:
            raise common.DataError(f"{where}: field {field!r}: {len(ids)} tokens (allowed 1..{max_prompt_length})")
        out.append({**{k: v for k, v in row.items() if k != "_line"}, field: text, "ids": ids})
    return out


# ---- Sampling ------------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """n completions per prompt; row i*n+j is sample j of prompt i (group[row] == i)."""

    prompt_ids: torch.Tensor       # [R, P] left-padded
    prompt_mask: torch.Tensor      # [R, P] 1 on prompt tokens
    completion_ids: torch.Tensor   # [R, C] right-padded
    completion_mask: torch.Tensor  # [R, C] 1 up to and including the first EOS / stop token
    finished: torch.Tensor         # [R] bool: ended by EOS or a stop string (False = cut by max_new_tokens)
    group: torch.Tensor            # [R] long: prompt index

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion side by side, the input of sequence_logprobs(..., logits_to_keep=C)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """prompt_mask and completion_mask side by side (0 on padding and after the end of a completion)."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Decoded completions (masked part only)."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]
        return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, the model's generation_config EOS ids, and Qwen3's
    end-of-turn `<|im_end|>` and end-of-text `<|endoftext|>` when the vocabulary has them (a base model's
    generation config names only one of the two, and a chat completion ends with the other)."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None):
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator) -> torch.Tensor:
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest top set whose mass reaches top_p; a token is
        # dropped when the mass strictly before it already exceeds top_p, so the most likely token always stays.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_hits(tokenizer, rows: list[list[int]], stop: list[str]) -> list[bool]:
    """Did the last token of each row complete a stop string? Only text ending in the new characters counts."""
    window = max(len(s.encode("utf-8")) for s in stop) + 2  # a token adds >= 1 byte, so this covers any stop
    longest = max(len(s) for s in stop)
    cur = tokenizer.batch_decode([r[-window:] for r in rows], skip_special_tokens=False)
    prev = tokenizer.batch_decode([r[-window:-1] for r in rows], skip_special_tokens=False)
    hits = []
    for c, p in zip(cur, prev):
        new = len(c) - len(p) if c.startswith(p) else len(c)
        tail = c[max(0, len(c) - new - longest + 1):]
        hits.append(any(s in tail for s in stop))
    return hits


def _sample_rows(model, tokenizer, rows, max_new_tokens, temperature, top_p, stop, eos, greedy, generator,
                 pad_id, device):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long).to(device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).to(device)
    prompt_ids, prompt_mask = ids, mask
    # Left padding shifts real tokens right; positions counted over real tokens keep each row identical to its
    # unpadded run (RoPE is shift-invariant, but absolute-position models and numerics are not).
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    alive = torch.arange(len(rows), device=device)  # rows the model still decodes, in KV-cache order
    tokens, masks, history = [], [], [[] for _ in rows]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, next_pos = _cache_of(out), pos[:, -1:] + 1
    # transformers 5 renamed the forward argument past_key_values to cache (the old name warns, then goes away)
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    # Finished rows leave the KV cache when it can drop rows (DynamicCache), so the long tail of one slow
    # completion does not pay for the whole batch; otherwise they ride along writing pad tokens.
    compact = hasattr(cache, "batch_select_indices")
    for step in range(max_new_tokens):
        live = ~finished[alive]
        picked = _next_tokens(out.logits[:, -1, :], temperature, top_p, greedy, generator)
        picked = torch.where(live, picked, torch.full_like(picked, pad_id))
        tok = torch.full((len(rows),), pad_id, dtype=torch.long, device=device)
        tok[alive] = picked
        tokens.append(tok)
        masks.append(~finished)  # the EOS / stop token itself stays in the mask
        ended = live & torch.isin(picked, eos_t)
        if stop:
            writing = alive[live].tolist()
            for i, t in zip(writing, tok[writing].tolist()):
                history[i].append(t)
            hits = torch.tensor(_stop_hits(tokenizer, [history[i] for i in writing], stop), device=device)
            ended[live] |= hits
        finished[alive[ended]] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if compact and bool(ended.any()):
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, mask, next_pos, picked = alive[keep], mask[keep], next_pos[keep], picked[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=picked[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_kwarg: cache})
        cache, next_pos = _cache_of(out), next_pos + 1
    completion = torch.stack(tokens, 1) if tokens else ids.new_zeros((len(rows), 0))
    comp_mask = torch.stack(masks, 1).long() if masks else ids.new_zeros((len(rows), 0))
    return prompt_ids, prompt_mask, completion, comp_mask, finished


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pad_to(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([extra, x] if left else [x, extra], dim=1)


def sample(model, tokenizer, prompts: list[str] | list[list[int]], n: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | str | None = None,
           eos_token_ids: int | list[int] | None = None, greedy: bool = False,
           generator: torch.Generator | None = None, batch_size: int | None = None, merge_lora: bool = True) -> Rollout:
    """n completions per prompt with a KV cache (no HF generate), `batch_size` rows at a time; see Rollout.

    eos_token_ids: the ids that end a completion (default: stop_token_ids(model, tokenizer)).

    merge_lora: sample with each LoRA layer's W + (alpha/r) B A as one weight (lora.merged: ~25% faster on the toy,
    one extra copy of the adapted weights while sampling; 4-bit layers are left as they are)."""
    rows_per_prompt = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str)
                       else [int(t) for t in p] for p in prompts]
    if not rows_per_prompt:
        raise ValueError("sample() needs at least one prompt")
    for i, r in enumerate(rows_per_prompt):
        if not r:
            raise ValueError(f"prompt {i} is empty: sampling needs at least one prompt token")
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    eos = stop_token_ids(model, tokenizer) if eos_token_ids is None else \
        ([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    rows = [r for r in rows_per_prompt for _ in range(n)]
    group = torch.arange(len(prompts), device=device).repeat_interleave(n)
    batch_size = batch_size or len(rows)
    parts = []
    was_training = model.training
    model.eval()  # no dropout while sampling; the caller's mode comes back below
    try:
        with torch.inference_mode(), (lora.merged(model) if merge_lora else contextlib.nullcontext()):
            for start in range(0, len(rows), batch_size):
                parts.append(_sample_rows(model, tokenizer, rows[start:start + batch_size], max_new_tokens,
                                          temperature, top_p, stop, eos, greedy, generator, pad_id, device))
    finally:
        model.train(was_training)
    P = max(p[0].shape[1] for p in parts)
    C = max(p[2].shape[1] for p in parts)
    # clone() outside inference mode: inference tensors cannot be saved for backward (embedding lookups save ids)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(p[0], P, pad_id, left=True) for p in parts]).clone(),
        prompt_mask=torch.cat([_pad_to(p[1], P, 0, left=True) for p in parts]).clone(),
        completion_ids=torch.cat([_pad_to(p[2], C, pad_id, left=False) for p in parts]).clone(),
        completion_mask=torch.cat([_pad_to(p[3], C, 0, left=False) for p in parts]).clone(),
        finished=torch.cat([p[4] for p in parts]).clone(),
        group=group.clone(),
    )


# ---- Log-probs of completions without materialising [B, T, V] logits ----------------------------------------------


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                      temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None):
    """log pi(x_t | x_<t) / T-softmax for the last K tokens: [B, K] fp32 (and the entropy [B, K] if asked).

    The decoder's final hidden states go through the fused LM-head kernel in row chunks, so full-vocabulary logits
    are never held for the whole batch. The hidden state at position t predicts token t+1.
    """
    from kernels import linear_token_logprobs

    K = logits_to_keep
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    if hasattr(head, "lora_A") or getattr(head, "bias", None) is not None:
        raise NotImplementedError("sequence_logprobs needs a plain bias-free LM head (no LoRA on lm_head)")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # same positions as in sample()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    h = hidden[:, -K - 1:-1]
    B, _, H = h.shape
    out = linear_token_logprobs(h.reshape(B * K, H), head.weight, input_ids[:, -K:].reshape(B * K),
                                temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)
    if return_entropy:
        return out[0].view(B, K), out[1].view(B, K)
    return out.view(B, K)


def micro_batch(roll: Rollout, rows) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids, attention_mask and completion width K of some rollout rows (a slice or index tensor), without the
    columns that are padding in every one of them (left of the prompts, right of the completions): less compute,
    the same log-probs, since positions are counted over real tokens."""
    pm, cm = roll.prompt_mask[rows], roll.completion_mask[rows]
    left = int((pm.sum(0) == 0).long().cumprod(0).sum())
    width = max(1, int(cm.sum(1).max()))
    ids = torch.cat([roll.prompt_ids[rows, left:], roll.completion_ids[rows, :width]], 1)
    return ids, torch.cat([pm[:, left:], cm[:, :width]], 1), width
