"""LoRA against PEFT (the oracle), the base switch, merge, QLoRA training, errors, gradients."""

import json
import os

import pytest
import torch
from conftest import tiny_qwen3

import cli
import loading
import lora
import toy
from errors import ConfigError

SUBSET = ["q_proj", "v_proj", "down_proj"]


def tiny(seed=0, dtype=torch.float32):
    """conftest's tiny Qwen3 at hidden 64 over 300 ids (the ids() below), in `dtype`."""
    return tiny_qwen3(vocab_size=300, seed=seed, hidden=64).to(dtype)


def ids(b=2, t=12, seed=1):
    return torch.randint(0, 300, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits.float()


def randomize(model, seed=2):
    """Non-zero adapters: B starts at zero, which would hide every scaling or key-name bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, SUBSET])
@pytest.mark.parametrize("rslora", [False, True])
def test_round_trip_with_peft(tmp_path, targets, rslora):
    from peft import LoraConfig, PeftModel, get_peft_model

    x = ids()
    # ours -> PEFT
    ours = lora.add_lora(tiny(), r=4, alpha=8, targets=targets, use_rslora=rslora)
    randomize(ours)
    lora.save_adapter(ours, str(tmp_path / "ours"), base_model_name_or_path="tiny")
    theirs = PeftModel.from_pretrained(tiny(), str(tmp_path / "ours")).eval()
    d1 = (logits(ours, x) - logits(theirs, x)).abs().max().item()
    # PEFT -> ours
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), use_rslora=rslora, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(tiny(), cfg)
    with torch.no_grad():
        for i, p in enumerate(p for n, p in peft_model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = lora.load_adapter(tiny(), str(tmp_path / "peft"))
    d2 = (logits(peft_model.eval(), x) - logits(loaded, x)).abs().max().item()
    print(f"targets={len(targets)} rslora={rslora}: ours->peft {d1:.2e}, peft->ours {d2:.2e}")
    assert d1 <= 1e-5 and d2 <= 1e-5
    assert (logits(loaded, x) - logits(tiny(), x)).abs().max() > 1e-3  # the adapter does something


def test_saved_config_and_keys(tmp_path):
    from safetensors import safe_open

    m = lora.add_lora(tiny(), r=4, alpha=16, dropout=0.05, targets=SUBSET, use_rslora=True)
    lora.save_adapter(m, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (
        4,
        16,
        0.05,
        True,
    )
    assert cfg["target_modules"] == sorted(SUBSET)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 3 * 2 and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert set(lora.lora_state_dict(m)) == keys


def test_init_scaling_and_repr():
    m = lora.add_lora(tiny(), r=4, alpha=8)
    layer = m.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora.LoraLinear) and layer.scaling == 2.0
    assert (
        torch.all(layer.lora_B.weight == 0) and layer.lora_A.weight.abs().max() <= 1 / 8
    )  # bound 1/sqrt(in)
    assert (
        lora.add_lora(tiny(), r=4, alpha=8, use_rslora=True).model.layers[0].mlp.up_proj.scaling
        == 4.0
    )
    assert not isinstance(m.lm_head, lora.LoraLinear) and len(lora.lora_layers(m)) == 2 * 7
    assert "r=4, alpha=8" in repr(layer)
    x = ids()
    assert torch.equal(logits(m, x), logits(tiny(), x))  # B = 0: starts as the base


def test_disabled_is_exactly_the_base():
    x = ids()
    base = logits(tiny(), x)
    m = lora.add_lora(tiny(), r=4, alpha=8, dropout=0.1)
    randomize(m)
    m.train()  # dropout on the adapter path must not leak into the base path
    with lora.disabled(m):
        assert torch.equal(logits(m, x), base)
    assert not torch.equal(logits(m, x), base)
    with pytest.raises(RuntimeError):
        with lora.disabled(m):
            raise RuntimeError("boom")
    assert all(layer.enabled for _, layer in lora.lora_layers(m))  # restored after the exception


def test_merge_equals_unmerged():
    x = ids()
    m = lora.add_lora(tiny(), r=4, alpha=8, targets=SUBSET)
    randomize(m)
    before = logits(m, x)
    lora.merge(m)
    assert not lora.lora_layers(m) and type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    diff = (logits(m, x) - before).abs().max().item()
    print(f"merge max diff {diff:.2e}")
    assert diff <= 1e-5


def test_merged_block_for_sampling():
    x = ids()
    m = lora.add_lora(tiny(), r=4, alpha=8, targets=SUBSET)
    randomize(m)
    base_w = m.model.layers[0].self_attn.q_proj.base.weight.clone()
    before = logits(m, x)
    with lora.merged(m):
        layer = m.model.layers[0].self_attn.q_proj
        assert layer.merged_weight is not None and not torch.equal(layer.merged_weight, base_w)
        assert (
            logits(m, x) - before
        ).abs().max().item() <= 1e-5  # no-grad forward: the merged weight
        with lora.disabled(m):
            assert torch.equal(logits(m, x), logits(tiny(), x))  # disabled still means the base
        loss = m(input_ids=x).logits.float().pow(2).mean()  # with gradients: the adapter path
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.lora_parameters(m))
    assert all(layer.merged_weight is None for _, layer in lora.lora_layers(m))
    assert torch.equal(
        m.model.layers[0].self_attn.q_proj.base.weight, base_w
    )  # the base is untouched
    assert torch.equal(logits(m, x), before)


def test_unknown_target_error():
    with pytest.raises(ValueError, match=r"qproj.*match no Linear.*q_proj") as e:
        lora.add_lora(tiny(), r=4, alpha=8, targets=["qproj", "v_proj"])
    assert "v_proj'" not in str(e.value).split("Linear modules")[0]  # names only the unknown one


def test_only_lora_trains_and_gradients_flow():
    m = lora.add_lora(tiny(), r=4, alpha=8)
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.lora_parameters(m)} and len(trainable) == 2 * 2 * 7
    x = ids()
    m.train()
    m(input_ids=x, labels=x).loss.backward()
    q = m.model.layers[0].self_attn.q_proj
    assert q.lora_B.weight.grad.abs().sum() > 0 and torch.all(
        q.lora_A.weight.grad == 0
    )  # B = 0 at init
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    randomize(m)
    m.zero_grad()
    m(input_ids=x, labels=x).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.lora_parameters(m))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    m = lora.add_lora(tiny(), r=4, alpha=8)
    randomize(m)
    m.train()
    x = ids()
    m(input_ids=x, labels=x).loss.backward()
    expected = [p.grad.clone() for p in lora.lora_parameters(m)]
    m.zero_grad()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # the frozen embeddings' output must require grad for reentrant checkpointing
        m.enable_input_require_grads()
    m(input_ids=x, labels=x).loss.backward()
    for p, g in zip(lora.lora_parameters(m), expected):
        torch.testing.assert_close(p.grad, g)


def test_bf16_base_keeps_fp32_adapters():
    m = lora.add_lora(tiny(dtype=torch.bfloat16), r=4, alpha=8)
    randomize(m)
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(m))
    out = m(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(
        p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in lora.lora_parameters(m)
    )


def test_load_adapter_errors(tmp_path):
    m = lora.add_lora(tiny(), r=4, alpha=8, targets=SUBSET)
    lora.save_adapter(m, str(tmp_path))
    with pytest.raises(
        ValueError, match=r"safetensors: LoRA keys .*16 missing \['base_model.*mlp.gate"
    ):
        lora.load_adapter(lora.add_lora(tiny(), r=4, alpha=8), str(tmp_path))
    with pytest.raises(
        ValueError, match=r"adapter_model.safetensors: .* 0 missing .*4 unexpected .*down_proj"
    ):
        lora.load_adapter(
            lora.add_lora(tiny(), r=4, alpha=8, targets=["q_proj", "v_proj"]), str(tmp_path)
        )
    with pytest.raises(
        ValueError, match=r"safetensors: key .*' has shape \(4, \d+\), the model expects \(8"
    ):
        lora.load_adapter(lora.add_lora(tiny(), r=8, alpha=8, targets=SUBSET), str(tmp_path))
    sd = lora.lora_state_dict(m)
    with pytest.raises(ValueError, match="ckpt: .*missing"):
        lora.load_lora_state_dict(
            lora.add_lora(tiny(), r=4, alpha=8, targets=SUBSET),
            dict(list(sd.items())[1:]),
            source="ckpt",
        )
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json.*use_dora"):
        lora.load_adapter(tiny(), str(tmp_path))


def test_state_dict_round_trip():
    a = lora.add_lora(tiny(), r=4, alpha=8)
    randomize(a)
    b = lora.add_lora(tiny(), r=4, alpha=8)
    lora.load_lora_state_dict(b, lora.lora_state_dict(a))
    x = ids()
    assert torch.equal(logits(a, x), logits(b, x))


def _qwen3_4bit(tmp_path):
    from transformers import BitsAndBytesConfig, Qwen3ForCausalLM

    tiny().save_pretrained(str(tmp_path / "base"))
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return Qwen3ForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=q, device_map="cpu"
    )


def test_qlora_trains_and_merges(tmp_path):
    pytest.importorskip("bitsandbytes")
    m = lora.add_lora(_qwen3_4bit(tmp_path), r=8, alpha=16)
    assert type(m.model.layers[0].self_attn.q_proj.base).__name__ == "Linear4bit"
    assert {id(p) for p in m.parameters() if p.requires_grad} == {
        id(p) for p in lora.lora_parameters(m)
    }
    opt = torch.optim.AdamW(lora.lora_parameters(m), lr=1e-2)
    x = ids(b=4, t=16)
    with torch.no_grad():  # an eval forward first, as sampling does: must not break later backward
        m.eval()(input_ids=x)
    m.train()
    m(input_ids=x, labels=x).loss.backward()
    assert all(
        p.grad.abs().sum() > 0 for p in lora.lora_parameters(m)[1::2]
    )  # every B, down to layer 0
    losses = []
    for _ in range(20):
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"QLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 1.0
    m.eval()
    with lora.disabled(m):
        base = logits(m, x)
    before = logits(m, x)
    lora.save_adapter(m, str(tmp_path / "adapter"))
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(_qwen3_4bit(tmp_path), str(tmp_path / "adapter")).eval()
    for mod in (
        theirs.modules()
    ):  # the same bitsandbytes CPU kernel as ours (see lora._keep_4bit_differentiable)
        if type(mod).__name__ == "Linear4bit":
            mod.support_avx512bf16_for_cpu = False
    peft_diff = (logits(theirs, x) - before).abs().max().item()
    print(f"QLoRA ours vs PEFT max diff {peft_diff:.2e}")
    assert peft_diff <= 1e-5
    lora.merge(m)  # 4-bit base: dequantized and kept dense
    assert type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    diff = (logits(m, x) - before).abs().max().item()
    print(
        f"QLoRA merge max diff {diff:.2e} (base moved by {(before - base).abs().max().item():.2f})"
    )
    assert diff < 0.05 * (before - base).abs().max().item()  # bf16 compute in the 4-bit path


def test_qlora_after_an_eval_forward_of_the_base(tmp_path):
    """bitsandbytes may repack 4-bit weights for a CPU inference kernel with no backward; add_lora
    undoes it."""
    pytest.importorskip("bitsandbytes")
    x = ids()
    q = _qwen3_4bit(tmp_path).eval()
    with torch.no_grad():
        q(input_ids=x)
    m = lora.add_lora(q, r=4, alpha=8)
    randomize(m)
    m.train()(input_ids=x, labels=x).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.lora_parameters(m))


def _adapter(tmp_path, name, seed, init_adapter=None):
    """A random adapter for tiny(); with init_adapter, an args.json that records it as a run of this
    repo would."""
    m = tiny()
    lora.add_lora(m, r=4, alpha=8, targets=SUBSET)
    randomize(m, seed=seed)
    d = tmp_path / name
    lora.save_adapter(m, str(d))
    if init_adapter is not None:
        (d / "args.json").write_text(json.dumps({"init_adapter": init_adapter, "seed": 0}))
    return str(d)


def test_lineage_order_dedupe_and_merge(tmp_path):
    a = _adapter(tmp_path, "a", 3)
    b = _adapter(tmp_path, "b", 4, init_adapter=a)  # trained on base + a
    c = _adapter(tmp_path, "c", 5, init_adapter=b)  # trained on base + a + b
    assert lora.lineage(c) == [a, b, c]
    assert lora.expand(f"{a}+{c}") == [a, b, c]  # a given twice is applied once
    assert lora.lineage(a) == [a]
    by_hand = tiny()
    for p in (a, b, c):
        lora.merge(lora.load_adapter(by_hand, p))
    chained = tiny()
    assert lora.merge_adapters(chained, c) == [a, b, c]
    assert not lora.lora_layers(chained)
    x = ids()
    torch.testing.assert_close(logits(chained, x), logits(by_hand, x), rtol=0, atol=0)
    assert (
        logits(chained, x).sub(logits(tiny(), x)).abs().max() > 1e-3
    )  # the adapters did something
    plain = tiny()
    assert lora.merge_adapters(plain, "") == []


def test_lineage_with_a_missing_start_is_an_error(tmp_path):
    import errors

    b = _adapter(tmp_path, "b", 4, init_adapter=str(tmp_path / "gone"))
    with pytest.raises(errors.MissingError, match="gone.*init_adapter in .*args.json"):
        lora.lineage(b)
    with pytest.raises(errors.MissingError, match="--init-adapter"):
        lora.merge_adapters(tiny(), b)
    with pytest.raises(errors.MissingError, match="--arms"):
        lora.merge_adapters(tiny(), str(tmp_path / "nothing"), flag="--arms")


def test_init_adapter_is_merged_into_the_student_before_its_lora(tmp_path):
    torch.manual_seed(0)
    student = lora.add_lora(loading.load_model(toy.student_model_dir()), 4, 8.0)
    for _, m in lora.lora_layers(student):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    lora.save_adapter(student, str(tmp_path / "ad"))
    by_hand = lora.merge(
        lora.load_adapter(loading.load_model(toy.student_model_dir()), str(tmp_path / "ad"))
    )
    flags = cli.TrainArgs(init_adapter=str(tmp_path / "ad"), lora_r=4, lora_alpha=8.0)
    model, params = lora.trainable_model(flags, "cpu", toy.student_model_dir())
    x = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(
            model(x).logits, by_hand(x).logits, atol=1e-5
        )  # the fresh LoRA starts at zero
    # the fresh LoRA trains, the merged base stays frozen
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_full_fine_tuning_trains_every_weight_and_refuses_4bit(tmp_path):
    model, params = lora.trainable_model(cli.TrainArgs(), "cpu", toy.student_model_dir(), full=True)
    assert not lora.lora_layers(model) and len(params) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="--full cannot train 4-bit weights"):
        lora.trainable_model(cli.TrainArgs(load_in_4bit=True), "cpu", full=True)


def test_train_only_tokens_updates_those_embedding_rows_only():
    tok, model = toy.load_tokenizer(), loading.load_model("toy")
    before = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ConfigError, match=r"--train-tokens: \['think'\] are not single tokens"):
        lora.train_only_tokens(model, tok, "<think>,think")
    params, rows = lora.train_only_tokens(model, tok, "<think>, </think>")
    assert rows.tolist() == tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    model(torch.randint(5, 100, (2, 16)), labels=torch.randint(5, 100, (2, 16))).loss.backward()
    opt.step()
    w = model.get_input_embeddings().weight.detach()
    changed = (w != before).any(-1).nonzero().flatten().tolist()
    assert changed == sorted(rows.tolist())
