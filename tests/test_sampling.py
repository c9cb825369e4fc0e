"""sampling.py: the decoding loop (masks, EOS, stop strings, padding, the KV cache) and sequence log-probs."""
import types

import pytest
import torch

import sampling
from sampling import Rollout
from test_common import char_tokenizer, model, qwen3_tokenizer, tiny_qwen3, tok  # noqa: F401 (fixtures)


class _ScriptCache:
    def __init__(self, keys):
        self.keys, self.step = keys, 0


class _DroppableScriptCache(_ScriptCache):
    def batch_select_indices(self, indices):  # like DynamicCache: finished rows leave the batch
        self.keys = [self.keys[i] for i in indices.tolist()]


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token script per prompt (keyed by the prompt's last token); mimics the HF call signature."""

    def __init__(self, scripts: dict, vocab_size: int, eos=None, droppable: bool = True):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.vocab_size, self.calls, self.droppable = scripts, vocab_size, 0, droppable
        self.generation_config = types.SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0):
        self.calls += 1
        cache = past_key_values
        if cache is None:
            cache = (_DroppableScriptCache if self.droppable else _ScriptCache)(input_ids[:, -1].tolist())
        else:
            cache.step += 1
        assert len(cache.keys) == input_ids.shape[0] == attention_mask.shape[0] == position_ids.shape[0]
        logits = torch.full((len(cache.keys), 1, self.vocab_size), -1e4)
        for i, k in enumerate(cache.keys):
            script = self.scripts[k]
            logits[i, 0, script[min(cache.step, len(script) - 1)]] = 0.0
        return types.SimpleNamespace(logits=logits, past_key_values=cache)



# ---------------------------------------------------------------------------------------------------- sampling


def test_completion_mask_eos_and_pad_equal_eos(tok):
    eos = tok.eos_token_id
    tok_pad_eos = char_tokenizer()
    tok_pad_eos.pad_token = tok_pad_eos.eos_token  # pad id == eos id: the mask must still find the first EOS
    a, b, c = tok.convert_tokens_to_ids(["a", "b", "c"])
    x, y = tok.convert_tokens_to_ids(["x", "y"])
    scripts = {x: [a, b, eos, c, c, c], y: [a, a, a, a, a, a, a, a]}
    for t, droppable in ((tok, True), (tok_pad_eos, True), (tok, False)):
        m = ScriptedLM(scripts, len(t), droppable=droppable)
        r = sampling.sample(m, t, ["x", "ay"], max_new_tokens=5, greedy=True)
        assert r.completion_ids[0, :3].tolist() == [a, b, eos]
        assert r.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
        assert r.finished.tolist() == [True, False]  # the second row was cut by max_new_tokens
        assert r.prompt_mask.tolist() == [[0, 1], [1, 1]] and r.prompt_ids[1].tolist() == [a, y]
        assert r.texts(t) == ["ab", "aaaaa"]
        assert r.texts(t, skip_special_tokens=False)[0] == "ab<|im_end|>"


def test_stops_early_when_all_rows_finished(tok):
    eos = tok.eos_token_id
    a, x, y = tok.convert_tokens_to_ids(["a", "x", "y"])
    m = ScriptedLM({x: [a, eos], y: [eos]}, len(tok))
    r = sampling.sample(m, tok, ["x", "y"], max_new_tokens=50)
    assert r.completion_ids.shape[1] == 2 and m.calls == 2
    assert r.completion_mask.tolist() == [[1, 1], [1, 0]] and r.finished.all()


def test_eos_defaults_include_generation_config(tok):
    a, b, x = tok.convert_tokens_to_ids(["a", "b", "x"])
    m = ScriptedLM({x: [a, b, a, a]}, len(tok), eos=[b, 1])
    r = sampling.sample(m, tok, ["x"], max_new_tokens=4)
    assert r.completion_ids.tolist() == [[a, b]] and r.finished.tolist() == [True]
    r = sampling.sample(m, tok, ["x"], max_new_tokens=4, eos_token_ids=[a])
    assert r.completion_ids.tolist() == [[a]] and r.completion_mask.tolist() == [[1]]


def test_stop_strings_char_level(tok):
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    x, y, z = tok.convert_tokens_to_ids(["x", "y", "z"])
    # "##" in the prompt must not count; the stop "\n\n" spans two tokens; row z never stops
    for droppable in (True, False):
        m = ScriptedLM({x: ids("ab\n\ncd"), y: ids("Q: 7\nA:xx"), z: ids("aaaaaaaa")}, len(tok), droppable=droppable)
        r = sampling.sample(m, tok, ["##\n\nx", "y", "z"], max_new_tokens=8, stop=["\n\n", "A:"])
        assert r.completion_mask.sum(1).tolist() == [4, 7, 8]
        assert r.finished.tolist() == [True, True, False]
        assert r.texts(tok) == ["ab\n\n", "Q: 7\nA:", "aaaaaaaa"]


def test_stop_string_inside_a_multi_char_token():
    qtok = qwen3_tokenizer()
    target = qtok("Let me think.\n\nSo the answer is 4", add_special_tokens=False)["input_ids"]
    prompt = qtok("Question:", add_special_tokens=False)["input_ids"]
    m = ScriptedLM({prompt[-1]: target}, len(qtok))
    r = sampling.sample(m, qtok, [prompt], max_new_tokens=len(target), stop="\n\n", eos_token_ids=[])
    kept = r.completion_ids[0][r.completion_mask[0].bool()].tolist()
    # the mask ends with the token that completed "\n\n", whatever it holds besides
    assert "\n\n" in qtok.decode(kept) and "\n\n" not in qtok.decode(kept[:-1])
    assert r.finished.item() and len(kept) < len(target)


def test_n_samples_ordering_and_groups(model, tok):
    g = torch.Generator().manual_seed(0)
    r = sampling.sample(model, tok, ["abc", "de"], n=3, max_new_tokens=6, generator=g)
    assert r.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.completion_ids.shape == (6, 6) and r.prompt_ids.shape == (6, 3)
    assert all(r.prompt_ids[i].tolist() == r.prompt_ids[0].tolist() for i in range(3))
    assert r.prompt_ids[3].tolist() == [0] + tok("de", add_special_tokens=False)["input_ids"]
    assert len({tuple(x) for x in r.completion_ids[:3].tolist()}) > 1  # sampling differs within a group


def test_seeded_generator_is_deterministic_and_batch_size_invariant(model, tok):
    def run(seed, **kw):
        return sampling.sample(model, tok, ["hello", "a"], n=2, max_new_tokens=8, temperature=1.3, top_p=0.9,
                             generator=torch.Generator().manual_seed(seed), **kw).completion_ids
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = [sampling.sample(model, tok, ["hello", "a", "xyz"], max_new_tokens=8, greedy=True, batch_size=bs)
              for bs in (None, 1, 2)]
    assert all(torch.equal(greedy[0].completion_ids, g.completion_ids) for g in greedy[1:])
    assert torch.equal(greedy[0].prompt_ids, greedy[1].prompt_ids)


def test_tiny_top_p_is_greedy(model, tok):
    g = sampling.sample(model, tok, ["hello"], max_new_tokens=8, greedy=True).completion_ids
    s = sampling.sample(model, tok, ["hello"], n=3, max_new_tokens=8, top_p=1e-6,
                      generator=torch.Generator().manual_seed(0)).completion_ids
    assert all(torch.equal(g[0], row) for row in s)


def test_left_padding_logits_equal_unpadded(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(out[:, 3:], ref, rtol=0, atol=1e-5)


def test_greedy_alone_equals_greedy_in_padded_batch(model, tok):
    prompts = ["a", "hello world", "xyz"]
    batch = sampling.sample(model, tok, prompts, max_new_tokens=12, greedy=True)
    for i, p in enumerate(prompts):
        alone = sampling.sample(model, tok, [p], max_new_tokens=12, greedy=True)
        assert alone.prompt_mask.all()
        n = alone.completion_ids.shape[1]
        assert batch.completion_ids[i, :n].tolist() == alone.completion_ids[0].tolist()
        assert batch.completion_mask[i, :n].tolist() == alone.completion_mask[0].tolist()


def test_rows_leaving_the_kv_cache_do_not_disturb_the_others(model, tok):
    prompts = ["a", "hello world", "xyz", "q"]
    free = sampling.sample(model, tok, prompts, max_new_tokens=12, greedy=True, eos_token_ids=[])
    assert not free.finished.any()
    # make a token the model does emit an EOS: rows now end at different steps and leave the cache midway
    stop_id = free.completion_ids[0, 2].item()
    r = sampling.sample(model, tok, prompts, max_new_tokens=12, greedy=True, eos_token_ids=[stop_id])
    ends = []
    for i in range(len(prompts)):
        row = free.completion_ids[i].tolist()
        end = row.index(stop_id) + 1 if stop_id in row else len(row)
        ends.append(end)
        assert r.completion_ids[i, :end].tolist() == row[:end]
        assert r.completion_mask[i].sum().item() == end and r.finished[i].item() == (stop_id in row)
    assert len(set(ends)) > 1


def test_sample_restores_training_mode_and_outputs_are_autograd_safe(tok):
    m = tiny_qwen3()
    m.train()
    r = sampling.sample(m, tok, ["abc", "d"], n=2, max_new_tokens=5)
    assert m.training
    logp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1])
    (logp * r.completion_mask).sum().backward()  # inference tensors would refuse to be saved for backward
    assert m.lm_head.weight.grad is not None
    assert isinstance(r, Rollout)


def test_empty_prompt_is_an_error(model, tok):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.sample(model, tok, ["a", ""], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------- log-probs


def naive_logprobs(model, ids, mask, k, temperature=1.0):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=pos).logits[:, -k - 1:-1].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, ids[:, -k:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_equals_naive(model, temperature):
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -2:] = 0  # after EOS
    with torch.no_grad():
        lp, ent = sampling.sequence_logprobs(model, ids, mask, 6, temperature=temperature, return_entropy=True)
        ref_lp, ref_ent = naive_logprobs(model, ids, mask, 6, temperature)
    assert lp.shape == (3, 6) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)


def test_sequence_logprobs_gradients_match_naive():
    torch.manual_seed(1)
    ids = torch.randint(3, 99, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    grads = []
    for fn in (lambda m: sampling.sequence_logprobs(m, ids, mask, 5, temperature=0.7),
               lambda m: naive_logprobs(m, ids, mask, 5, 0.7)[0]):
        m = tiny_qwen3(seed=3)
        fn(m).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(m.parameters()))
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_sampling_and_gradients_with_lora(tok):
    lora = pytest.importorskip("lora")
    m = lora.add_lora(tiny_qwen3(seed=4), r=4, alpha=8)
    params = lora.lora_parameters(m)
    r = sampling.sample(m, tok, ["abc", "de"], n=2, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    logp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1])
    (logp * r.completion_mask).sum().backward()
    # B starts at zero, so dL/dA = 0 on the first step while dL/dB is not
    assert all(p.grad is not None for p in params)
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_real_qwen3_vocab_sampling_and_logprobs():
    qtok = qwen3_tokenizer()
    m = tiny_qwen3(vocab_size=151936, hidden=16)
    r = sampling.sample(m, qtok, ["Hello", "What is 2+2?"], n=2, max_new_tokens=5, stop=["\n"],
                      generator=torch.Generator().manual_seed(0))
    k = r.completion_ids.shape[1]
    with torch.no_grad():
        lp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, k, temperature=0.7)
        ref, _ = naive_logprobs(m, r.input_ids, r.attention_mask, k, 0.7)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    assert len(r.texts(qtok)) == 4


@pytest.mark.gpu
def test_cuda_bf16_sampling_and_logprobs(tok):
    m = tiny_qwen3().to("cuda", torch.bfloat16)
    r = sampling.sample(m, tok, ["hello", "a"], n=2, max_new_tokens=8, generator=torch.Generator("cuda").manual_seed(0))
    assert r.completion_ids.device.type == "cuda"
    lp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1], temperature=0.7)
    ref, _ = naive_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1], 0.7)
    torch.testing.assert_close(lp, ref, rtol=0, atol=5e-2)  # bf16 hidden states


