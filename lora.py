"""Hand-written LoRA and QLoRA, a switch back to the base model, merge, and PEFT-format adapters.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a linear layer W and learns a low-rank update:

    h = W x + (alpha / r) * B A x,    A: [r, in], B: [out, r]

A starts Kaiming-uniform (a = sqrt(5), the nn.Linear default, as in PEFT) and B at zero, so the
wrapped model starts equal to the base. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by
alpha / sqrt(r), which keeps the update's size stable as r grows. QLoRA (Dettmers et al. 2023,
arXiv 2305.14314) puts the same adapters over a frozen 4-bit NF4 base (bitsandbytes Linear4bit).

Dtype: A and B are fp32 (fp32 masters, so small optimizer steps are not rounded away) and are cast
to the input's dtype in forward, so a bf16 model computes in bf16. Dropout acts on the adapter's
input only. Gradient checkpointing: transformers' default (use_reentrant=False) needs nothing; with
reentrant checkpointing call `model.enable_input_require_grads()` (common.load_model does).

Adapters use PEFT's format (`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`,
and `adapter_config.json`): PEFT loads ours, and adapters saved by PEFT load here.
"""
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def _is_4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # no 4-bit layer exists unless bitsandbytes was imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


class LoraLinear(nn.Module):
    """A frozen `base` layer (nn.Linear or bitsandbytes Linear4bit) plus (alpha/r) B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, target: str = "", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base, self.r, self.alpha, self.use_rslora, self.target = base, r, alpha, use_rslora, target
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A, self.lora_B = nn.Linear(base.in_features, r, **kw), nn.Linear(r, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged_weight: torch.Tensor | None = None  # set inside merged(): W + (alpha/r) B A, no-grad use only

    @property
    def weight(self) -> torch.Tensor:  # code that reads `proj.weight` (dtype, shape) keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None and self.enabled and not torch.is_grad_enabled():
            return F.linear(x, self.merged_weight, self.base.bias)  # inside merged(): one GEMM instead of three
        out = self.base(x)
        if not self.enabled:
            return out
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return out + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A in fp32: what merging adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, enabled={self.enabled}"


def _keep_4bit_differentiable(layer: nn.Module) -> None:
    # bitsandbytes, on CPUs with AVX512-BF16, repacks 4-bit weights for a faster kernel at the first
    # eval-mode forward without grad. That kernel has no backward: gradients through the frozen base
    # (to every adapter below it) would silently be zero. Keep the standard layout, or restore it
    # (bitsandbytes re-quantizes the double-quantized scales then: logits move by ~1e-3).
    layer.support_avx512bf16_for_cpu = False
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

        layer.weight.data, layer.weight.quant_state = unpack(layer.weight.data, state)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(module name, LoraLinear) for every adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's list form: full name or dotted suffix


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
             targets: Iterable[str] = DEFAULT_TARGETS, use_rslora: bool = False,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap each nn.Linear / Linear4bit whose name ends in a target; freeze every other parameter."""
    if lora_layers(model):
        raise ValueError("add_lora: the model already has LoRA layers")
    targets = [targets] if isinstance(targets, str) else list(targets)
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # Linear4bit is one
    unknown = [t for t in targets if not any(_matches(n, t) for n, _ in linear)]
    if unknown:
        raise ValueError(f"add_lora: LoRA target(s) {unknown} match no Linear module; Linear modules "
                         f"in this model: {sorted({n.rsplit('.', 1)[-1] for n, _ in linear})}")
    model.requires_grad_(False)
    for name, module in linear:
        if _is_4bit(module):
            _keep_4bit_differentiable(module)  # all 4-bit layers: gradients pass through every one
        target = next((t for t in targets if _matches(name, t)), None)
        if target is not None:
            parent, _, child = name.rpartition(".")
            wrapped = LoraLinear(module, r, alpha, dropout, use_rslora, target, dtype)
            setattr(model.get_submodule(parent), child, wrapped)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable A and B matrices of every adapter."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside this block the model is exactly the base: the reference policy with no second copy."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    try:
        for m in layers:
            m.enabled = False
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


@contextlib.contextmanager
def merged(model: nn.Module):
    """Inside this block, forwards without gradients use one weight W + (alpha/r) B A per adapted layer: one GEMM
    instead of three (the base's and A's and B's), which is what dominates token-by-token sampling with a small
    batch. The base weights are not touched (the merged copy is separate and dropped on exit), forwards with
    gradients keep the adapter path, and 4-bit layers keep it too. Costs one copy of each adapted weight while
    inside; logits match the adapter path up to float rounding."""
    layers = [m for _, m in lora_layers(model) if not _is_4bit(m.base)]
    try:
        with torch.no_grad():
            for m in layers:
                w = m.base.weight
                m.merged_weight = (w.float() + m.delta_weight().to(w.device)).to(w.dtype)
        yield model
    finally:
        for m in layers:
            m.merged_weight = None


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """W += (alpha/r) B A in every wrapped layer, then put the plain layer back in the wrapper's place.

    A 4-bit base is dequantized and kept as a dense nn.Linear in the dtype the weight had before
    quantization (re-quantizing would round most of the small update away); it costs that memory.
    To export a merged model, merge into the base loaded in bf16 rather than into the 4-bit one.
    """
    for name, m in lora_layers(model):
        base = m.base
        if _is_4bit(base):
            from bitsandbytes.functional import dequantize_4bit

            _keep_4bit_differentiable(base)
            state = base.weight.quant_state
            w = dequantize_4bit(base.weight.data, state).float()
            base = nn.Linear(m.base.in_features, m.base.out_features, bias=m.base.bias is not None,
                             device=w.device, dtype=state.dtype).requires_grad_(False)
            if m.base.bias is not None:
                base.bias.copy_(m.base.bias)
        else:
            w = base.weight.float()
        base.weight.copy_(w + m.delta_weight().to(w.device))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names (`base_model.model.<module>.lora_A.weight`)."""
    return {f"{PREFIX}{name}.{ab}.weight": getattr(m, ab).weight.detach()
            for name, m in lora_layers(model) for ab in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy adapter weights in (keys with or without PEFT's prefix); errors name `source` and the key."""
    own = lora_state_dict(model)
    given = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in sd.items()}
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    if missing or unexpected:  # a few of each by name: enough to see which modules differ
        raise ValueError(f"{source}: LoRA keys do not match the model: {len(missing)} missing {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}")
    for k, v in given.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: key '{k}' has shape {tuple(v.shape)}, "
                             f"the model expects {tuple(own[k].shape)}")
        own[k].copy_(v)


def _atomic_write(path: str, write) -> None:
    """write(tmp), then rename over `path`: a killed run never leaves a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None) -> None:
    """Write `path/adapter_model.safetensors` and `path/adapter_config.json` in PEFT's format."""
    from safetensors.torch import save_file

    layers = [m for _, m in lora_layers(model)]
    settings = {(m.r, m.alpha, getattr(m.lora_dropout, "p", 0.0), m.use_rslora) for m in layers}
    if len(settings) != 1:
        raise ValueError(f"save_adapter: need LoRA layers that share (r, alpha, dropout, rslora); got {settings}")
    r, alpha, dropout, rslora = settings.pop()
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # PEFT types lora_alpha as int
    # The fields PEFT's LoraConfig has written for many versions; PEFT fills the rest with defaults.
    config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
        target_modules=sorted({m.target for m in layers}), bias="none", fan_in_fan_out=False, use_dora=False,
        base_model_name_or_path=base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        inference_mode=True, init_lora_weights=True, modules_to_save=None, layers_to_transform=None,
        layers_pattern=None, rank_pattern={}, alpha_pattern={}, auto_mapping=None, revision=None,
        loftq_config={}, megatron_config=None, megatron_core="megatron.core")
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    _atomic_write(os.path.join(path, WEIGHTS_NAME), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(os.path.join(path, CONFIG_NAME), lambda f: Path(f).write_text(text, encoding="utf-8"))


# PEFT features this file does not implement; an adapter that uses one is refused, not misread.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "rank_pattern",
                "alpha_pattern", "layer_replication", "exclude_modules", "trainable_token_indices",
                "target_parameters", "use_qalora")


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT-format LoRA adapter, adding LoRA layers from its config when the model has none.

    If the model has LoRA layers, keys and shapes must match the file; the file's alpha and rsLoRA win.
    """
    from safetensors.torch import load_file

    cfg_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    cfg = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}, expected 'LORA'")
    bad = [k for k in _UNSUPPORTED if cfg.get(k) not in (None, False, {}, [])]
    bad += ["bias"] * (cfg.get("bias", "none") != "none")
    bad += ["target_modules"] * (not isinstance(cfg.get("target_modules"), list))  # a regex string
    if bad:
        raise ValueError(f"{cfg_path}: unsupported field(s) {bad}; this LoRA reads plain LoRA / rsLoRA "
                         "adapters with target_modules given as a list")
    rslora = bool(cfg.get("use_rslora", False))
    if not lora_layers(model):
        add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"], rslora)
    for _, m in lora_layers(model):
        m.alpha, m.use_rslora = cfg["lora_alpha"], rslora
        m.scaling = m.alpha / math.sqrt(m.r) if rslora else m.alpha / m.r
    load_lora_state_dict(model, load_file(weights_path), source=weights_path)
    return model
