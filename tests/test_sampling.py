"""sampling.py: the decoding loop (masks, EOS, stop strings, padding, the KV cache) and sequence
log-probs."""

import types

import pytest
import torch
from test_common import char_tokenizer, model, qwen3_tokenizer, tiny_qwen3, tok  # noqa: F401 (fixtures)

import errors
import loading
import sampling
import toy
from sampling import Rollout


class _ScriptCache:
    def __init__(self, keys):
        self.keys, self.step = keys, 0


class _DroppableScriptCache(_ScriptCache):
    def batch_select_indices(self, indices):  # like DynamicCache: rows leave the batch (or repeat)
        self.keys = [self.keys[i] for i in indices.tolist()]


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token script per prompt (keyed by the prompt's last token); mimics the HF call
    signature."""

    def __init__(self, scripts: dict, vocab_size: int, eos=None, droppable: bool = True):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.vocab_size, self.calls, self.droppable = (
            scripts,
            vocab_size,
            0,
            droppable,
        )
        self.generation_config = types.SimpleNamespace(eos_token_id=eos)
        self.batch_rows = []  # rows of every call's input

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=True,
        logits_to_keep=0,
    ):
        self.calls += 1
        self.batch_rows.append(input_ids.shape[0])
        cache = past_key_values
        if cache is None:
            cache = (_DroppableScriptCache if self.droppable else _ScriptCache)(
                input_ids[:, -1].tolist()
            )
        else:
            cache.step += 1
        assert (
            len(cache.keys)
            == input_ids.shape[0]
            == attention_mask.shape[0]
            == position_ids.shape[0]
        )
        logits = torch.full((len(cache.keys), 1, self.vocab_size), -1e4)
        for i, k in enumerate(cache.keys):
            script = self.scripts[k]
            logits[i, 0, script[min(cache.step, len(script) - 1)]] = 0.0
        return types.SimpleNamespace(logits=logits, past_key_values=cache)


# --------------------------------------------------------------------------------------------------
# sampling


def test_completion_mask_eos_and_pad_equal_eos(tok):
    eos = tok.eos_token_id
    tok_pad_eos = char_tokenizer()
    tok_pad_eos.pad_token = (
        tok_pad_eos.eos_token
    )  # pad id == eos id: the mask must still find the first EOS
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
        m = ScriptedLM(
            {x: ids("ab\n\ncd"), y: ids("Q: 7\nA:xx"), z: ids("aaaaaaaa")},
            len(tok),
            droppable=droppable,
        )
        r = sampling.sample(m, tok, ["##\n\nx", "y", "z"], max_new_tokens=8, stop=["\n\n", "A:"])
        assert r.completion_mask.sum(1).tolist() == [4, 7, 8]
        assert r.finished.tolist() == [True, True, False]
        assert r.texts(tok) == ["ab\n\n", "Q: 7\nA:", "aaaaaaaa"]


def test_stop_string_inside_a_multi_char_token():
    qtok = qwen3_tokenizer()
    target = qtok("Let me think.\n\nSo the answer is 4", add_special_tokens=False)["input_ids"]
    prompt = qtok("Question:", add_special_tokens=False)["input_ids"]
    m = ScriptedLM({prompt[-1]: target}, len(qtok))
    r = sampling.sample(
        m, qtok, [prompt], max_new_tokens=len(target), stop="\n\n", eos_token_ids=[]
    )
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
    assert (
        len({tuple(x) for x in r.completion_ids[:3].tolist()}) > 1
    )  # sampling differs within a group


def test_seeded_generator_is_deterministic_and_batch_size_invariant(model, tok):
    def run(seed, **kw):
        return sampling.sample(
            model,
            tok,
            ["hello", "a"],
            n=2,
            max_new_tokens=8,
            temperature=1.3,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        ).completion_ids

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = [
        sampling.sample(
            model, tok, ["hello", "a", "xyz"], max_new_tokens=8, greedy=True, batch_size=bs
        )
        for bs in (None, 1, 2)
    ]
    assert all(torch.equal(greedy[0].completion_ids, g.completion_ids) for g in greedy[1:])
    assert torch.equal(greedy[0].prompt_ids, greedy[1].prompt_ids)


def test_tiny_top_p_is_greedy(model, tok):
    g = sampling.sample(model, tok, ["hello"], max_new_tokens=8, greedy=True).completion_ids
    s = sampling.sample(
        model,
        tok,
        ["hello"],
        n=3,
        max_new_tokens=8,
        top_p=1e-6,
        generator=torch.Generator().manual_seed(0),
    ).completion_ids
    assert all(torch.equal(g[0], row) for row in s)


def test_left_padding_logits_equal_unpadded(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(ids).logits
        out = model(
            padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
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
    # make a token the model does emit an EOS: rows now end at different steps and leave the cache
    # midway
    stop_id = free.completion_ids[0, 2].item()
    r = sampling.sample(
        model, tok, prompts, max_new_tokens=12, greedy=True, eos_token_ids=[stop_id]
    )
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
    (
        logp * r.completion_mask
    ).sum().backward()  # inference tensors would refuse to be saved for backward
    assert m.lm_head.weight.grad is not None
    assert isinstance(r, Rollout)


def test_empty_prompt_is_an_error(model, tok):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.sample(model, tok, ["a", ""], max_new_tokens=2)


# ------------------------------------------------------------------------- the previous sampler,
# kept as a reference


def _legacy_sample(model, tokenizer, prompts, **kw) -> dict:
    """The previous implementation of sampling.sample (every row prefilled, finished rows dropped
    from the KV cache at once, torch.multinomial; kept in the sampling benchmark), for the
    token-for-token comparisons below."""
    from bench.sampling_bench import legacy_sample

    r = legacy_sample(model, tokenizer, prompts, **kw)
    return {
        f: getattr(r, f)
        for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "finished")
    }


def _assert_same_rollout(r: Rollout, ref: dict, what=""):
    for f, want in ref.items():
        assert torch.equal(getattr(r, f), want), f"{what}: {f} differs"


@pytest.fixture(scope="module")
def toy_base():
    toy = pytest.importorskip("toy")
    return toy.load_model(), toy.load_tokenizer()


def _toy_prompts(tokenizer, lengths=(40, 29, 47)):
    import toy

    docs = toy.documents("train", len(lengths), seed=0)
    return [
        tokenizer(d["text"], add_special_tokens=False)["input_ids"][:k]
        for d, k in zip(docs, lengths)
    ]


@pytest.mark.parametrize(
    "case",
    [
        dict(n=4, eos="e", temperature=1.5),  # rows end at different steps and leave the cache
        dict(
            n=4, eos="\n", temperature=1.3, top_p=0.9, batch_size=6
        ),  # chunks that split a prompt's samples
        dict(n=3, eos="", temperature=1.5, stop=["e ", "."]),  # stop strings
        dict(n=2, eos="e", greedy=True, batch_size=4),
    ],
)
def test_samples_equal_the_previous_sampler_token_for_token(toy_base, case):
    m, t = toy_base
    case = dict(case)
    eos = [t.convert_tokens_to_ids(c) for c in case.pop("eos")] + [t.eos_token_id]
    prompts = _toy_prompts(t)
    for seed in (0, 1):
        kw = dict(max_new_tokens=24, eos_token_ids=eos, **case)
        ref = _legacy_sample(m, t, prompts, generator=torch.Generator().manual_seed(seed), **kw)
        r = sampling.sample(m, t, prompts, generator=torch.Generator().manual_seed(seed), **kw)
        _assert_same_rollout(r, ref, f"{case} seed {seed}")
        assert len(set(r.completion_mask.sum(1).tolist())) > 2  # rows ended at different steps


def test_how_often_the_loop_checks_does_not_change_samples(toy_base, monkeypatch):
    m, t = toy_base
    prompts = _toy_prompts(t)
    eos = [t.convert_tokens_to_ids(" "), t.eos_token_id]
    for greedy in (False, True):
        kw = dict(n=3, max_new_tokens=20, eos_token_ids=eos, greedy=greedy)
        base = sampling.sample(m, t, prompts, generator=torch.Generator().manual_seed(3), **kw)
        for every in (1, 3):
            monkeypatch.setattr(sampling, "CHECK_EVERY", every)
            r = sampling.sample(m, t, prompts, generator=torch.Generator().manual_seed(3), **kw)
            _assert_same_rollout(
                r, {f: getattr(base, f) for f in ("completion_ids", "completion_mask", "finished")}
            )


def test_static_cache_equals_dynamic_cache(toy_base):
    m, t = toy_base
    prompts = _toy_prompts(t)
    eos = [t.convert_tokens_to_ids("."), t.eos_token_id]
    for kw in (
        dict(greedy=True),
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9, stop=[". "]),
    ):
        kw = dict(n=3, max_new_tokens=20, eos_token_ids=eos, batch_size=6, **kw)
        dyn = sampling.sample(m, t, prompts, generator=torch.Generator().manual_seed(0), **kw)
        static = sampling.sample(
            m, t, prompts, generator=torch.Generator().manual_seed(0), static_cache=True, **kw
        )
        _assert_same_rollout(
            static,
            {
                f: getattr(dyn, f)
                for f in (
                    "prompt_ids",
                    "prompt_mask",
                    "completion_ids",
                    "completion_mask",
                    "finished",
                )
            },
            str(kw),
        )


def test_static_cache_refuses_what_it_cannot_hold(model, tok):
    with pytest.raises(ValueError, match="needs static_cache=True"):
        sampling.sample(model, tok, ["a"], max_new_tokens=2, compile_decode=True)
    m = ScriptedLM({tok.convert_tokens_to_ids("a"): [5]}, len(tok))
    with pytest.raises(ValueError, match="full attention"):
        sampling.sample(m, tok, ["a"], max_new_tokens=2, static_cache=True)


class _LegacyTupleLM(torch.nn.Module):
    """A model that takes and returns its KV cache as per-layer (key, value) tuples."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.generation_config = inner, inner.generation_config

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=True,
        logits_to_keep=0,
    ):
        from transformers import DynamicCache

        cache = (
            DynamicCache(past_key_values, config=self.inner.config)
            if past_key_values is not None
            else None
        )
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        legacy = tuple((layer.keys, layer.values) for layer in out.cache.layers)
        return types.SimpleNamespace(logits=out.logits, past_key_values=legacy)


def test_legacy_tuple_cache(model, tok):
    wrapped = _LegacyTupleLM(model)
    prompts = ["hello", "a", "xyz"]
    stop_id = (
        sampling.sample(model, tok, prompts, max_new_tokens=4, greedy=True)
        .completion_ids[0, 1]
        .item()
    )
    for kw in (dict(greedy=True, eos_token_ids=[stop_id]), dict(temperature=1.2, eos_token_ids=[])):
        a = sampling.sample(
            model,
            tok,
            prompts,
            n=3,
            max_new_tokens=10,
            generator=torch.Generator().manual_seed(0),
            **kw,
        )
        b = sampling.sample(
            wrapped,
            tok,
            prompts,
            n=3,
            max_new_tokens=10,
            generator=torch.Generator().manual_seed(0),
            **kw,
        )
        _assert_same_rollout(
            b,
            {f: getattr(a, f) for f in ("completion_ids", "completion_mask", "finished")},
            str(kw),
        )
    # a tuple cache never drops rows: the previous sampler drew for every row there too
    kw = dict(n=3, max_new_tokens=10, temperature=1.2, eos_token_ids=[stop_id])
    _assert_same_rollout(
        sampling.sample(wrapped, tok, prompts, generator=torch.Generator().manual_seed(1), **kw),
        _legacy_sample(wrapped, tok, prompts, generator=torch.Generator().manual_seed(1), **kw),
    )


def test_draws_equal_torch_multinomial():
    # _next_tokens draws what torch.multinomial(probs, 1) draws, without its host sync; this pins
    # the equivalence for the installed torch (the previous sampler called torch.multinomial)
    torch.manual_seed(0)
    for V in (7, 1000):
        logits = torch.randn(5, V) * 3
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        for _ in range(3):
            want = torch.multinomial(torch.softmax(logits / 0.9, -1), 1, generator=g1).squeeze(-1)
            got, ok = sampling._next_tokens(logits, 0.9, 1.0, False, g2)
            assert torch.equal(got, want) and ok.item()


def test_non_finite_logits_are_an_error_when_sampling(tok):
    class NanLM(ScriptedLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[:] = float("nan")
            return out

    m = NanLM({tok.convert_tokens_to_ids("a"): [5]}, len(tok))
    with pytest.raises(RuntimeError, match="inf, nan"):
        sampling.sample(m, tok, ["a"], n=2, max_new_tokens=3)


def test_prefill_once_per_prompt_and_finished_rows_leave_the_batch(tok):
    eos = tok.eos_token_id
    a, b, x, y = tok.convert_tokens_to_ids(["a", "b", "x", "y"])
    scripts = {x: [a, b, eos], y: [b, b, b, b]}
    results = []
    for droppable, greedy, rows in (
        (True, True, [2, 6, 6, 6]),
        (True, False, [2, 6, 6, 3, 3]),
        (False, True, [2, 6, 6, 6, 6]),
    ):
        m = ScriptedLM(scripts, len(tok), droppable=droppable)
        results.append(
            sampling.sample(
                m, tok, ["x", "ay"], n=3, max_new_tokens=4 + (not greedy), greedy=greedy
            )
        )
        # one prefill row per prompt, then 3 rows each; ended rows ride along until the loop checks
        # (greedy: every CHECK_EVERY steps; sampling: every step, dropping them once a quarter of
        # the batch ended); a cache that cannot repeat rows gets every row prefilled
        assert m.batch_rows == rows, (droppable, greedy)
    for r in results:
        C = r.completion_ids.shape[1]
        assert r.completion_ids.tolist() == [[a, b, eos] + [0] * (C - 3)] * 3 + [[b] * C] * 3
        assert r.completion_mask.tolist() == [[1, 1, 1] + [0] * (C - 3)] * 3 + [[1] * C] * 3
        assert (
            r.prompt_ids.tolist() == [[0, x]] * 3 + [[a, y]] * 3
            and r.finished.tolist() == [True] * 3 + [False] * 3
        )


def test_preallocated_cache_layer_grows_in_place_and_drops_rows(model):
    from transformers.cache_utils import DynamicLayer

    ids = torch.randint(3, 99, (3, 5))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True).cache
        cache = sampling._preallocate(model(input_ids=ids, use_cache=True).cache, capacity=6)
    layer, plain = cache.layers[0], ref.layers[0]
    assert isinstance(layer, DynamicLayer) and layer.buffers[0].shape[-2] == 6
    for n in (1, 2):  # the second update runs out of room and doubles it
        k, v = torch.randn(3, 2, n, 8), torch.randn(3, 2, n, 8)
        for x in (layer, plain):
            x.update(k, v)
        assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)
    assert layer.get_seq_length() == 8 and layer.buffers[0].shape[-2] == 12
    keep = torch.tensor([2, 0])
    cache.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    assert torch.equal(cache.layers[0].keys, ref.layers[0].keys) and cache.get_seq_length() == 8


def test_zero_new_tokens(model, tok):
    r = sampling.sample(model, tok, ["ab", "c"], n=2, max_new_tokens=0)
    assert (
        r.completion_ids.shape == (4, 0) and r.prompt_ids.shape == (4, 2) and not r.finished.any()
    )


@pytest.mark.gpu
def test_cuda_static_cache_and_compiled_decode_equal_dynamic_greedy(toy_base):
    m, t = toy_base
    m = m.to("cuda")
    try:
        prompts = _toy_prompts(t)
        kw = dict(
            n=2,
            max_new_tokens=24,
            greedy=True,
            eos_token_ids=[t.convert_tokens_to_ids("."), t.eos_token_id],
        )
        dyn = sampling.sample(m, t, prompts, **kw)
        for extra in (dict(static_cache=True), dict(static_cache=True, compile_decode=True)):
            r = sampling.sample(m, t, prompts, **kw, **extra)
            assert torch.equal(r.completion_ids, dyn.completion_ids), extra
            assert torch.equal(r.completion_mask, dyn.completion_mask), extra
    finally:
        m.to("cpu")


# --------------------------------------------------------------------------------------------------
# log-probs


def naive_logprobs(model, ids, mask, k, temperature=1.0):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(ids, attention_mask=mask, position_ids=pos).logits[:, -k - 1 : -1].float()
        / temperature
    )
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
        lp, ent = sampling.sequence_logprobs(
            model, ids, mask, 6, temperature=temperature, return_entropy=True
        )
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
    for fn in (
        lambda m: sampling.sequence_logprobs(m, ids, mask, 5, temperature=0.7),
        lambda m: naive_logprobs(m, ids, mask, 5, 0.7)[0],
    ):
        m = tiny_qwen3(seed=3)
        fn(m).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(m.parameters()))
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_shared_prompts_give_the_per_row_logprobs_and_gradients(tok):
    """group= runs each prompt once and repeats its KV cache: the log-probs and the LoRA gradients
    of one forward per row, on a rollout with left padding, ragged completions, micro-batches that
    cut a group, and a group of one row."""
    lora = pytest.importorskip("lora")
    m = lora.add_lora(tiny_qwen3(seed=5), r=4, alpha=8)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    r = sampling.sample(
        m,
        tok,
        ["abcdef", "ab", "xyzw"],
        n=3,
        max_new_tokens=7,
        generator=torch.Generator().manual_seed(0),
    )
    assert r.prompt_mask.sum(1).unique().numel() == 3 and not bool(r.completion_mask.all())
    m.train()
    batch_sizes = []  # of the decoder's forwards: the shared prompts run once per group
    m.model.register_forward_pre_hook(
        lambda mod, args, kw: batch_sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    for rows, prompt_rows in ((slice(None), 3), (slice(2, 6), 2), (torch.tensor([0, 1, 4, 8]), 3)):
        out = []
        for group in (None, r.group[rows]):
            batch_sizes.clear()
            m.zero_grad()
            ids, attn, K = sampling.micro_batch(r, rows)
            lp, ent = sampling.sequence_logprobs(
                m, ids, attn, K, temperature=0.7, return_entropy=True, group=group
            )
            cm = r.completion_mask[rows, :K]
            (lp * cm).sum().backward()
            grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            out.append((lp * cm, ent * cm, grads))
            assert batch_sizes[0] == (ids.shape[0] if group is None else prompt_rows)
        (lp0, ent0, g0), (lp1, ent1, g1) = out
        torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-5)
        assert g0.keys() == g1.keys() and any("lora_A" in n for n in g0)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_shared_prompts_only_where_exact():
    m = tiny_qwen3(seed=6)
    ascending, shuffled = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert sampling._group_firsts(ascending).tolist() == [0, 2]
    assert sampling._group_firsts(shuffled) is None  # rows of a group must be adjacent
    assert sampling._can_share_prompts(m.eval(), ascending, prompt_width=3)
    assert not sampling._can_share_prompts(m, None, prompt_width=3)
    assert not sampling._can_share_prompts(m, ascending, prompt_width=0)
    lora = pytest.importorskip("lora")
    dropped = lora.add_lora(tiny_qwen3(seed=6), r=4, alpha=8, dropout=0.1)
    assert sampling._can_share_prompts(dropped.eval(), ascending, 3)  # no dropout in eval mode
    assert not sampling._can_share_prompts(dropped.train(), ascending, 3)  # rows would share masks
    m.gradient_checkpointing_enable()
    assert not sampling._can_share_prompts(m.train(), ascending, 3)  # no cache to share


def test_sampling_and_gradients_with_lora(tok):
    lora = pytest.importorskip("lora")
    m = lora.add_lora(tiny_qwen3(seed=4), r=4, alpha=8)
    params = lora.lora_parameters(m)
    r = sampling.sample(
        m, tok, ["abc", "de"], n=2, max_new_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    logp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1])
    (logp * r.completion_mask).sum().backward()
    # B starts at zero, so dL/dA = 0 on the first step while dL/dB is not
    assert all(p.grad is not None for p in params)
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_real_qwen3_vocab_sampling_and_logprobs():
    qtok = qwen3_tokenizer()
    m = tiny_qwen3(vocab_size=151936, hidden=16)
    r = sampling.sample(
        m,
        qtok,
        ["Hello", "What is 2+2?"],
        n=2,
        max_new_tokens=5,
        stop=["\n"],
        generator=torch.Generator().manual_seed(0),
    )
    k = r.completion_ids.shape[1]
    with torch.no_grad():
        lp = sampling.sequence_logprobs(m, r.input_ids, r.attention_mask, k, temperature=0.7)
        ref, _ = naive_logprobs(m, r.input_ids, r.attention_mask, k, 0.7)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    assert len(r.texts(qtok)) == 4


@pytest.mark.gpu
def test_cuda_bf16_sampling_and_logprobs(tok):
    m = tiny_qwen3().to("cuda", torch.bfloat16)
    r = sampling.sample(
        m,
        tok,
        ["hello", "a"],
        n=2,
        max_new_tokens=8,
        generator=torch.Generator("cuda").manual_seed(0),
    )
    assert r.completion_ids.device.type == "cuda"
    lp = sampling.sequence_logprobs(
        m, r.input_ids, r.attention_mask, r.completion_ids.shape[1], temperature=0.7
    )
    ref, _ = naive_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1], 0.7)
    torch.testing.assert_close(lp, ref, rtol=0, atol=5e-2)  # bf16 hidden states


def test_nucleus_from_a_top_k_equals_the_full_sort():
    """The CPU shortcut (cut peaked rows from a top-k, sort only the rest) keeps exactly the tokens
    the full sort keeps, with their probabilities, for peaked rows, flat rows and a mix, at the real
    vocabulary size."""

    def by_sort(probs, top_p):
        sp, order = probs.sort(-1, descending=True)
        return torch.zeros_like(probs).scatter_(
            -1, order, sp.masked_fill(sp.cumsum(-1) - sp > top_p, 0.0)
        )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 151_936, generator=g)
    logits[:7] *= 8.0  # peaked: the nucleus is a few tokens
    logits[7:] *= 0.02  # nearly flat: the nucleus is most of the vocabulary
    probs = torch.softmax(logits, -1)
    for top_p in (0.3, 0.9, 0.95, 0.999):
        for rows in (slice(0, 7), slice(7, 12), slice(0, 12)):
            assert torch.equal(
                sampling._nucleus(probs[rows], top_p), by_sort(probs[rows], top_p)
            ), (top_p, rows)


def test_stop_ids_are_eos_generation_config_and_the_templates_end_of_turn():
    import toy

    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=None))
    tok = toy.load_tokenizer()
    tok.eos_token = (
        "<|endoftext|>"  # a base model's EOS: the chat template still ends turns with <|im_end|>
    )
    assert sampling.stop_token_ids(model, tok) == sorted(
        tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    )
    # a template of other strings (Llama 3 style: the end of turn straight after the content, no
    # newline)
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_start|>{% endfor %}"
    )
    assert sampling.stop_token_ids(model, tok) == sorted(
        tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>"])
    )
    tok.chat_template = None  # no template: EOS and the generation config only
    model.generation_config.eos_token_id = [7, 8]
    assert sampling.stop_token_ids(model, tok) == sorted({tok.eos_token_id, 7, 8})
    try:
        smol = loading.load_tokenizer("smollm2")
    except errors.MissingError as e:
        pytest.skip(str(e))
    model.generation_config.eos_token_id = None
    assert smol.convert_ids_to_tokens(sampling.stop_token_ids(model, smol)) == ["<|im_end|>"]


# --------------------------------------------------------------------------------------------------
# documents cut into windows, the step generator, no-grad log-probs of a rollout


def test_cut_documents_windows_skips_and_names_file_line():
    tok = toy.load_tokenizer()
    rows = [{"text": "a" * 30, "_line": 3, "domain": "news"}, {"text": "b" * 10, "_line": 4}]
    windows, skipped = sampling.cut_documents(rows, tok, "docs.jsonl", 20, 8, min_tokens=28)
    assert skipped == 1 and len(windows) == 1
    w = windows[0]
    assert (w["prefix"], w["continuation"], w["domain"], w["_line"]) == (
        "a" * 20,
        "a" * 8,
        "news",
        3,
    )
    assert (len(w["prefix_ids"]), len(w["continuation_ids"]), "text" in w) == (20, 8, False)
    # a shorter continuation is what there is, when min_tokens allows it
    windows, _ = sampling.cut_documents(rows, tok, "docs.jsonl", 5, 8, min_tokens=6)
    assert [len(w["continuation_ids"]) for w in windows] == [8, 5]
    with pytest.raises(
        errors.DataError, match=r"^docs\.jsonl:4: field 'text': 10 tokens; too short$"
    ):
        sampling.cut_documents(
            rows, tok, "docs.jsonl", 20, 8, min_tokens=28, too_short="; too short"
        )
    with pytest.raises(errors.DataError, match=r"^docs\.jsonl:1: field 'text': missing$"):
        sampling.cut_documents([{"body": "x"}], tok, "docs.jsonl", 20, 8, min_tokens=1)
    with pytest.raises(
        errors.DataError, match=r"^docs\.jsonl:2: field 'text': expected str, got int$"
    ):
        sampling.cut_documents([{"text": "x"}, {"text": 7}], tok, "docs.jsonl", 1, 8, min_tokens=1)


def test_step_generator_is_seeded_by_seed_step_and_rank():
    def draw(seed, step, rank, world):
        return torch.rand(4, generator=sampling.step_generator(seed, step, rank, world, "cpu"))

    assert torch.equal(draw(1, 5, 0, 2), draw(1, 5, 0, 2))
    assert not torch.equal(draw(1, 5, 0, 2), draw(1, 5, 1, 2))
    assert not torch.equal(draw(1, 5, 0, 2), draw(1, 6, 0, 2))
    assert torch.equal(
        draw(1, 5, 1, 2), torch.rand(4, generator=torch.Generator().manual_seed(100014))
    )


def test_rollout_logprobs_equal_one_pass_and_carry_no_gradient(model):
    roll = sampling.rollout_from_tokens(
        [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[14, 15], [16, 17, 18, 19], [20]], 0, "cpu"
    )
    whole = sampling.sequence_logprobs(model, roll.input_ids, roll.attention_mask, 4, 0.7)
    got = sampling.rollout_logprobs(model, roll, micro_batch_size=2, temperature=0.7)
    assert got.shape == (3, 4) and not got.requires_grad
    mask = roll.completion_mask.bool()
    torch.testing.assert_close(got[mask], whole.detach()[mask], atol=1e-5, rtol=1e-5)
    assert got[2, 1:].eq(0).all()  # the third row's micro-batch is one column wide
