"""Hand-written LoRA and QLoRA, a switch back to the base model, merge, and PEFT-format adapters.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a linear layer W and learns a low-rank update:

    h = W x + (alpha / r) * B A x,    A: [r, in], B: [out, r]

A starts Kaiming-uniform (a = sqrt(5), the nn.Linear default, as in PEFT) and B at zero, so the
wrapped model starts equal to the base. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by
alpha / sqrt(r), which keeps the update's size stable as r grows. QLoRA (Dettmers et al. 2023,
arXiv 2305.14314) puts the same adapters over a frozen 4-bit NF4 base (bitsandbytes Linear4bit).
`hub_defaults` picks that setup for a real model on CUDA and a lighter one (no 4-bit, r 16) on a
CPU.

Dtype: A and B are fp32 (fp32 masters, so small optimizer steps are not rounded away) and are cast
to the input's dtype in forward, so a bf16 model computes in bf16. Dropout acts on the adapter's
input only. Gradient checkpointing: transformers' default (use_reentrant=False) needs nothing; with
reentrant checkpointing call `model.enable_input_require_grads()` (loading.load_model does).

Adapters use PEFT's format (`adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`, and `adapter_config.json`): PEFT loads ours, and adapters
saved by PEFT load here.

Which parameters train: `trainable_model` loads a model (its --init-adapter lineage merged in) with
a fresh LoRA, or every weight for full fine-tuning; `train_only_tokens` trains a few embedding rows.
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

import chat
import dataio
import loading
from errors import ConfigError, DataError, MissingError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = (
    "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)
)
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def _is_4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # no 4-bit layer exists unless bitsandbytes was imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


class LoraLinear(nn.Module):
    """A frozen `base` layer (nn.Linear or bitsandbytes Linear4bit) plus (alpha/r) B A."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        target: str = "",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.base, self.r, self.alpha, self.use_rslora, self.target = (
            base,
            r,
            alpha,
            use_rslora,
            target,
        )
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A, self.lora_B = (
            nn.Linear(base.in_features, r, **kw),
            nn.Linear(r, base.out_features, **kw),
        )
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged_weight: torch.Tensor | None = (
            None  # set inside merged(): W + (alpha/r) B A, no-grad use only
        )

    @property
    def weight(self) -> torch.Tensor:  # code that reads `proj.weight` (dtype, shape) keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None and self.enabled and not torch.is_grad_enabled():
            return F.linear(
                x, self.merged_weight, self.base.bias
            )  # inside merged(): one GEMM instead of three
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
    return name == target or name.endswith(
        "." + target
    )  # PEFT's list form: full name or dotted suffix


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap each nn.Linear / Linear4bit whose name ends in a target; freeze every other
    parameter."""
    if lora_layers(model):
        raise ValueError("add_lora: the model already has LoRA layers")
    targets = [targets] if isinstance(targets, str) else list(targets)
    linear = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    ]  # Linear4bit is one
    unknown = [t for t in targets if not any(_matches(n, t) for n, _ in linear)]
    if unknown:
        raise ValueError(
            f"add_lora: LoRA target(s) {unknown} match no Linear module; Linear modules "
            f"in this model: {sorted({n.rsplit('.', 1)[-1] for n, _ in linear})}"
        )
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


# Off CUDA: bitsandbytes' fast 4-bit kernels are CUDA's; a 135M-1B model's activations fit in a
# CPU's memory, so recomputing them (gradient checkpointing) only costs time; rank 16 and lr 1e-4
# let a small model learn in tens of steps, where a model card's QLoRA learning rate (1e-5 and
# below, for a 4B model and hundreds of steps) barely moves.
SMALL_DEVICE_SETUP = {
    "lr": 1e-4,
    "lora_r": 16,
    "load_in_4bit": False,
    "gradient_checkpointing": False,
}
_SETUP_NAMES = {
    "lora_r": "lora r",
    "load_in_4bit": "4-bit",
    "gradient_checkpointing": "checkpointing",
}


def hub_defaults(model: str, device: torch.device | str, card: dict, given: dict) -> dict:
    """The training setup of a real model (any --model but the toy): each key of `card` (the
    script's values for one CUDA GPU, from its model card) takes the user's value in `given` when
    set (not None), else the card's on CUDA, else SMALL_DEVICE_SETUP's. Prints the result in one
    line (rank 0 of torchrun only)."""
    kind = torch.device(device).type
    setup = card if kind == "cuda" else {k: SMALL_DEVICE_SETUP.get(k, v) for k, v in card.items()}
    out = {k: v if given.get(k) is None else given[k] for k, v in setup.items()}
    if os.environ.get("RANK", "0") == "0":
        shown = [
            f"{_SETUP_NAMES.get(k, k)} "
            f"{('on' if v else 'off') if isinstance(v, bool) else f'{v:g}'}"
            for k, v in out.items()
        ]
        print(f"defaults for {model} on {kind}: {', '.join(shown)}", flush=True)
    return out


def load_merged(args, device, name: str | None = None):
    """The model (`name`, default --model) with --init-adapter (and the adapters it was trained
    on, oldest first) merged into its weights; --load-in-4bit and --gradient-checkpointing as set
    (the flags of cli.TrainArgs)."""
    model = loading.load_model(
        name or args.model,
        device=device,
        load_in_4bit=args.load_in_4bit,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    merge_adapters(model, args.init_adapter)
    return model


def load_policy(args, device, name: str | None = None):
    """The policy every trainer starts from: load_merged's model with a fresh LoRA of --lora-r /
    --lora-alpha / --lora-dropout on top. The reference policy (LoRA off) is then the merged
    model."""
    model = load_merged(args, device, name)
    return add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)


def trainable_model(args, device, name: str | None = None, full: bool = False):
    """(model, the parameters that train): load_policy's model and its LoRA parameters, or with
    `full` the merged model and every weight of it (full fine-tuning; a 4-bit base cannot)."""
    if full and args.load_in_4bit:
        raise ConfigError(
            "--full cannot train 4-bit weights; use LoRA (drop --full) with --load-in-4bit"
        )
    if full:
        model = load_merged(args, device, name)
        return model, [p for p in model.parameters() if p.requires_grad]
    model = load_policy(args, device, name)
    return model, lora_parameters(model)


def keep_rows(keep: torch.Tensor):
    """A gradient hook that zeroes every row where `keep` is 0: with no weight decay AdamW then
    leaves those rows bit-identical."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * keep

    return hook


def train_only_tokens(model, tokenizer, tokens: str, added: dict[str, list[int]] | None = None):
    """Think-token embedding tuning: only the embedding rows (and LM-head rows) of the comma list
    `tokens` train, every other weight frozen. `added`: tokens chat.add_marker_tokens put in the
    tokenizer; the embedding (and an untied head) grows to hold them. Returns (the parameters the
    optimizer updates, the token ids whose rows train); the optimizer needs no weight decay."""
    names = [t.strip() for t in tokens.split(",") if t.strip()]
    ids = [chat.marker_ids(tokenizer, n) for n in names]
    unknown = [n for n, i in zip(names, ids) if len(i) != 1]
    if unknown:
        raise ConfigError(f"--train-tokens: {unknown} are not single tokens of this tokenizer")
    ids = [i[0] for i in ids]
    if added:
        loading.grow_embeddings(model, tokenizer, added)
    for p in model.parameters():
        p.requires_grad_(False)
    rows = torch.tensor(ids)
    params = []
    for w in loading.embedding_weights(model):
        w.requires_grad_(True)
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        keep[rows] = 1
        w.register_hook(keep_rows(keep))
        params.append(w)
    return params, rows.to(model.get_input_embeddings().weight.device)


def save_trained(
    model, tokenizer, out, model_name: str, merged: bool = False, full: bool = False
) -> None:
    """The trained adapter in PEFT format in `out` (its base recorded unless it is the toy);
    `merged` also writes the merged full model and its tokenizer to out/model. `full` (a model
    trained without adapters): only the model and its tokenizer, in out/model."""
    if full:
        with dataio.disk_errors(Path(out) / "model"):
            model.save_pretrained(Path(out) / "model")
            tokenizer.save_pretrained(Path(out) / "model")
            dataio.make_readable(Path(out) / "model")
        return
    save_adapter(
        model, str(out), base_model_name_or_path=None if model_name == "toy" else model_name
    )
    if merged:
        with dataio.disk_errors(Path(out) / "model"):
            merge(model).save_pretrained(Path(out) / "model")
            tokenizer.save_pretrained(Path(out) / "model")
            dataio.make_readable(Path(out) / "model")


def fill_defaults(args, table: dict[str, tuple]) -> None:
    """Set each field of `args` that is None from a script's DEFAULTS table, {field: (toy value,
    real-model value on one CUDA GPU as in the method's model card)}: the toy value for --model toy;
    for a real model the card's on CUDA, else SMALL_DEVICE_SETUP's (hub_defaults, by the kind of
    device --device asks for). A value the user gave is kept. Then --lora-alpha, if unset: 2 x
    rank."""
    if args.model == "toy":
        chosen = {name: toy for name, (toy, _) in table.items()}
    else:
        card = {name: real for name, (_, real) in table.items()}
        # the kind of device asked for (lifecycle.start_run checks that it exists)
        cuda = str(args.device).startswith("cuda") or (
            args.device == "auto" and torch.cuda.is_available()
        )
        chosen = hub_defaults(args.model, "cuda" if cuda else "cpu", card, vars(args))
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_r


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
    """Inside this block, forwards without gradients use one weight W + (alpha/r) B A per adapted
    layer: one GEMM instead of three (the base's and A's and B's), which is what dominates
    token-by-token sampling with a small batch. The base weights are not touched (the merged copy is
    separate and dropped on exit), forwards with gradients keep the adapter path, and 4-bit layers
    keep it too. Costs one copy of each adapted weight while inside; logits match the adapter path
    up to float rounding."""
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
    """W += (alpha/r) B A in every wrapped layer, then put the plain layer back in the wrapper's
    place.

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
            base = nn.Linear(
                m.base.in_features,
                m.base.out_features,
                bias=m.base.bias is not None,
                device=w.device,
                dtype=state.dtype,
            ).requires_grad_(False)
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
    return {
        f"{PREFIX}{name}.{ab}.weight": getattr(m, ab).weight.detach()
        for name, m in lora_layers(model)
        for ab in ("lora_A", "lora_B")
    }


@torch.no_grad()
def load_lora_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Copy adapter weights in (keys with or without PEFT's prefix); errors name `source` and the
    key."""
    own = lora_state_dict(model)
    given = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in sd.items()}
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    if missing or unexpected:  # a few of each by name: enough to see which modules differ
        raise DataError(
            f"{source}: LoRA keys do not match the model: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    for k, v in given.items():
        if v.shape != own[k].shape:
            raise DataError(
                f"{source}: key '{k}' has shape {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)}"
            )
        own[k].copy_(v)


def _peft_config(
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    targets: Iterable[str],
    base_model_name_or_path: str | None,
) -> dict:
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # PEFT types lora_alpha as int
    # The fields PEFT's LoraConfig has written for many versions; PEFT fills the rest with defaults.
    return dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        target_modules=sorted(set(targets)),
        bias="none",
        fan_in_fan_out=False,
        use_dora=False,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
        init_lora_weights=True,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={},
        alpha_pattern={},
        auto_mapping=None,
        revision=None,
        loftq_config={},
        megatron_config=None,
        megatron_core="megatron.core",
    )


def _write_peft(path: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    dataio.atomic_write(
        os.path.join(path, WEIGHTS_NAME), lambda f: save_file(tensors, f, metadata={"format": "pt"})
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    dataio.atomic_write(
        os.path.join(path, CONFIG_NAME), lambda f: Path(f).write_text(text, encoding="utf-8")
    )


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None) -> None:
    """Write `path/adapter_model.safetensors` and `path/adapter_config.json` in PEFT's format."""
    layers = [m for _, m in lora_layers(model)]
    settings = {(m.r, m.alpha, getattr(m.lora_dropout, "p", 0.0), m.use_rslora) for m in layers}
    if len(settings) != 1:
        raise ValueError(
            f"save_adapter: need LoRA layers that share (r, alpha, dropout, rslora); got {settings}"
        )
    r, alpha, dropout, rslora = settings.pop()
    config = _peft_config(
        r,
        alpha,
        dropout,
        rslora,
        [m.target for m in layers],
        base_model_name_or_path or getattr(model, "name_or_path", None) or None,
    )
    _write_peft(path, lora_state_dict(model), config)


def write_adapter(
    path: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write {module: (A [r, in], B [out, r])} as a PEFT LoRA adapter. Every module must have the
    same r (pad a smaller one with zero rows of A and zero columns of B: exact). alpha defaults to
    r, so the scale is 1 and B A is the whole update."""
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"write_adapter: every module needs the same rank; got {sorted(ranks)}")
    r = ranks.pop()
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    targets = [name.rpartition(".")[2] for name in factors]
    _write_peft(
        path,
        tensors,
        _peft_config(
            r, r if alpha is None else alpha, 0.0, False, targets, base_model_name_or_path
        ),
    )


# PEFT features this file does not implement; an adapter that uses one is refused, not misread.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "exclude_modules",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
)


def _truncate(u, s, vh, rank: int):
    """B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, and the relative Frobenius error of dropping the
    rest."""
    total = float((s * s).sum())
    err = math.sqrt(float((s[rank:] ** 2).sum()) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :], err


def low_rank(a: torch.Tensor, b: torch.Tensor, rank: int):
    """B A truncated to `rank` (A_r, B_r, relative error) by the SVD of the factors' QR cores: exact
    up to the truncation, and never builds [out, in]."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    a_r, b_r, err = _truncate(u, s, vh, rank)
    return a_r @ qa.T, qb @ b_r, err


def svd_factors(delta: torch.Tensor, rank: int):
    """A dense update [out, in] as LoRA factors (A [rank, in], B [out, rank]) by truncated SVD, and
    the relative error."""
    return _truncate(*torch.linalg.svd(delta, full_matrices=False), rank)


def read_adapter_config(path: str) -> dict:
    """`path/adapter_config.json`, checked: a plain LoRA / rsLoRA adapter this file can read, or a
    DataError that names the file and the fields it cannot."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    try:
        cfg = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MissingError(
            f"{cfg_path}: no adapter config (is {path!r} a PEFT adapter directory?)"
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{cfg_path}: not a JSON adapter config ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise DataError(
            f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}, expected 'LORA'"
        )
    bad = [k for k in _UNSUPPORTED if cfg.get(k) not in (None, False, {}, [])]
    bad += ["bias"] * (cfg.get("bias", "none") != "none")
    bad += ["target_modules"] * (not isinstance(cfg.get("target_modules"), list))  # a regex string
    if bad:
        raise DataError(
            f"{cfg_path}: unsupported field(s) {bad}; this LoRA reads plain LoRA / rsLoRA "
            "adapters with target_modules given as a list"
        )
    return cfg


def adapter_scaling(cfg: dict) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return (
        cfg["lora_alpha"] / math.sqrt(cfg["r"])
        if cfg.get("use_rslora")
        else cfg["lora_alpha"] / cfg["r"]
    )


def read_adapter(path: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA adapter without a model: (config, {module name: (A [r, in], B [out, r])}), fp32;
    the update of a module is adapter_scaling(config) * B A. Module names are the model's
    (`model.layers.0.self_attn.q_proj`)."""

    cfg = read_adapter_config(path)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    sd = loading.read_weights(weights_path)
    factors: dict[str, list] = {}
    for key, v in sd.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        stem, dot, ab = name.rpartition(".lora_")
        if not dot or ab not in ("A.weight", "B.weight"):
            raise ValueError(f"{weights_path}: key '{key}' is not a LoRA A/B weight")
        factors.setdefault(stem, [None, None])["AB".index(ab[0])] = v.float()
    for stem, (a, b) in factors.items():
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: module '{stem}' needs lora_A [r, in] and lora_B [out, r], got "
                f"{None if a is None else tuple(a.shape)} and "
                f"{None if b is None else tuple(b.shape)}"
            )
    return cfg, {k: (a, b) for k, (a, b) in factors.items()}


def weight_updates(spec: str) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The updates of adapters 'a+b' (each after its lineage) per weight: {'<module>.weight': [(A,
    s B), ...]} in order, kept factored (loading.Weights adds them as it reads a weight)."""
    updates: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for cfg, factors in map(read_adapter, expand(spec)):
        for name, (a, b) in factors.items():
            scaled = (a, adapter_scaling(cfg) * b)
            updates.setdefault(name + ".weight", []).append(scaled)
    return updates


def read_adapters(
    paths: list[str], base: loading.Weights
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each adapter as {module: (A, s B)} in float64 (its scale s folded into B), checked against
    the base."""
    out = []
    for p in paths:
        require_adapter(p, flag="--adapters")
        try:
            cfg, factors = read_adapter(p)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from e
        s = adapter_scaling(cfg)
        mods = {}
        for name, (a, b) in factors.items():
            w = base.get(name + ".weight") if name + ".weight" in base.where else None
            if w is None or tuple(w.shape) != (b.shape[0], a.shape[1]):
                why = "not in" if w is None else "another shape than"
                raise ConfigError(f"--adapters {p}: module {name!r} ({why} --base {base.name})")
            mods[name] = (a.double(), s * b.double())
        out.append(mods)
    return out


def pad_rank(a: torch.Tensor, b: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) padded with zero rows of A and zero columns of B to rank `width`, in float32."""
    a_pad = torch.cat([a, a.new_zeros(width - a.shape[0], a.shape[1])]).float()
    return a_pad, torch.cat([b, b.new_zeros(b.shape[0], width - b.shape[1])], dim=1).float()


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT-format LoRA adapter, adding LoRA layers from its config when the model has none.

    If the model has LoRA layers, keys and shapes must match the file; the file's alpha and rsLoRA
    win.
    """

    cfg = read_adapter_config(path)
    rslora = bool(cfg.get("use_rslora", False))
    if not lora_layers(model):
        add_lora(
            model,
            cfg["r"],
            cfg["lora_alpha"],
            cfg.get("lora_dropout", 0.0),
            cfg["target_modules"],
            rslora,
        )
    for _, m in lora_layers(model):
        m.alpha, m.use_rslora = cfg["lora_alpha"], rslora
        m.scaling = m.alpha / math.sqrt(m.r) if rslora else m.alpha / m.r
    weights_path = os.path.join(path, WEIGHTS_NAME)
    load_lora_state_dict(model, loading.read_weights(weights_path), source=weights_path)
    return model


# ---------------------------------------------------------------------------------------------
# Lineages: an adapter trained on top of other adapters (--init-adapter) is applied after them
# ---------------------------------------------------------------------------------------------


def lineage(path: str) -> list[str]:
    """`path` and the adapters it was trained on top of, oldest first. A run directory of this repo
    records its starting adapters in args.json (`init_adapter`, adapters joined by '+'); an adapter
    without an args.json (PEFT's, or one of the shipped toy adapters) starts a lineage. A recorded
    start that is no longer there is an error: applying the adapter without it would evaluate a
    model that was never trained."""

    chain: list[str] = []

    def visit(p: str, child: str | None) -> None:
        if not os.path.isfile(os.path.join(p, WEIGHTS_NAME)):
            where = f" (the init_adapter in {os.path.join(child, 'args.json')})" if child else ""
            raise MissingError(f"{p}{where}: no {WEIGHTS_NAME} there")
        args_path = os.path.join(p, "args.json")
        if os.path.isfile(args_path):
            init = json.loads(Path(args_path).read_text(encoding="utf-8")).get("init_adapter") or ""
            for parent in (q for q in str(init).split("+") if q and q != "auto"):
                visit(parent, p)
        if os.path.normpath(p) not in map(os.path.normpath, chain):
            chain.append(p)

    visit(str(path), None)
    return chain


def expand(spec: str) -> list[str]:
    """Adapter dirs joined by '+', each preceded by its lineage, each once, in order."""
    out: list[str] = []
    for part in (p for p in spec.split("+") if p):
        for p in lineage(part):
            if os.path.normpath(p) not in map(os.path.normpath, out):
                out.append(p)
    return out


def expand_arm(spec: str, init_adapter: str = "") -> str:
    """A model spec ('' = the base, adapter dirs joined by '+', or a model dir) with `init_adapter`
    put first and every adapter's lineage written out; a spec that is not all adapter dirs comes
    back as it is."""
    spec = "+".join(p for p in (init_adapter, spec) if p)
    parts = [p for p in spec.split("+") if p]
    return (
        "+".join(expand(spec))
        if parts and all(os.path.isfile(os.path.join(p, WEIGHTS_NAME)) for p in parts)
        else spec
    )


def merge_adapters(model: nn.Module, spec: str, flag: str = "--init-adapter") -> list[str]:
    """Merge the adapters of `spec` ('a+b', each with its lineage) into the model's weights, in
    order; returns them. A missing adapter is a MissingError that names `flag`."""

    try:
        chain = expand(spec)
    except FileNotFoundError as e:
        raise MissingError(
            f"{flag} {e}. Pass directories a script of this repo wrote (--out), joined by "
            f"'+' to apply several in order."
        ) from None
    for p in chain:
        merge(load_adapter(model, p))
    return chain


# ---- Adapters and evaluation arms as a user names them on the command line -----------------------


def require_adapter(path: str | os.PathLike, flag: str = "--init-adapter", hint: str = "") -> str:
    """`path` if it holds a PEFT adapter (adapter_model.safetensors), else a MissingError naming the
    flag."""
    if not (Path(path) / WEIGHTS_NAME).is_file():
        raise MissingError(f"{flag} {path}: no {WEIGHTS_NAME} there. {hint}".strip())
    return str(path)


def load_arm(spec: str, base: str, device=None, load_in_4bit: bool = False, flag: str = "--arms"):
    """A model to evaluate from a spec: '' = `base`; adapter dirs joined by '+' = `base` with each
    merged in turn, each after the adapters it was trained on (lora.lineage: an RL adapter brings
    its SFT adapter); else a model dir or hub id. Returns (model, where its tokenizer is)."""
    parts = [p for p in spec.split("+") if p]
    if parts and not all((Path(p) / WEIGHTS_NAME).is_file() for p in parts):
        if len(parts) > 1:
            raise MissingError(
                f"{flag} {spec!r}: joined with '+' but {parts} are not all adapter dirs"
            )
        return loading.load_model(parts[0], device=device, load_in_4bit=load_in_4bit), parts[0]
    model = loading.load_model(base, device=device, load_in_4bit=load_in_4bit)
    merge_adapters(
        model, spec, flag=flag
    )  # each adapter after the ones it was trained on (its args.json)
    return model, base


def load_frozen(
    base: str, adapters: str, device, load_in_4bit: bool, flag: str, hint: str = ""
) -> nn.Module:
    """A frozen model (a teacher): `base` with each adapter of `adapters` ('a+b') merged in, each
    after the adapters it was trained on, in eval mode, no gradients. A missing adapter is an error
    naming `flag`, with `hint`."""
    for adapter in adapters.split("+"):
        if adapter:
            require_adapter(adapter, flag, hint)
    model, _ = load_arm(adapters, base, device=device, load_in_4bit=load_in_4bit, flag=flag)
    return model.eval().requires_grad_(False)


def resolve_arms(spec: str, model: str, flag: str = "--arms") -> dict[str, str]:
    """--arms (`flag`) 'name=spec,...' as {name: spec}; 'auto' = the model alone, or with the toy
    model: the base, the shipped thinking-SFT adapters and the toy runs/sft_think, runs/grpo,
    runs/rlmt found (an adapter with the args.json of a toy run)."""
    if spec != "auto":
        arms = {}
        for item in spec.split(","):
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise ConfigError(f"{flag} {spec!r}: each arm is name=spec, got {item!r}")
            arms[name.strip()] = value.strip()
        return arms
    if model != "toy":
        return {"base": ""}
    import toy  # lazily: only the toy model's arms need the toy world

    arms = {"base": "", "think": str(toy.sft_adapter_dir())}
    # the same SFT over all three answer formats
    if (toy.SFT_FORMATS_DIR / "adapter_model.safetensors").is_file():
        arms["think_formats"] = str(toy.SFT_FORMATS_DIR)
    for name in ("sft_think", "grpo", "rlmt"):
        d, meta = Path("runs") / name, Path("runs") / name / "args.json"
        trained = (d / WEIGHTS_NAME).is_file() and meta.is_file()
        if trained and json.loads(meta.read_text()).get("model") == "toy":
            arms[f"runs_{name}"] = str(d)
    return arms


def with_lineages(arms: dict[str, str], init_adapter: str) -> dict[str, str]:
    """In-process arms with --init-adapter first and every adapter's lineage written out (tables,
    cache keys)."""
    servers = [s for s in arms.values() if s.startswith(("http://", "https://"))]
    if init_adapter and servers:
        raise ConfigError("--init-adapter applies to in-process arms; --arms has a server")
    try:
        return {n: s if s in servers else expand_arm(s, init_adapter) for n, s in arms.items()}
    except FileNotFoundError as e:
        raise MissingError(f"--arms: {e}") from None


def resolve_compare(spec: str, arms: list[str]) -> list[tuple[str, str]]:
    """--compare 'a-b,...' as [(a, b)] (a minus b); 'auto' = every arm minus the first."""
    if spec == "auto":
        return [(a, arms[0]) for a in arms[1:]]
    pairs = []
    for item in filter(None, spec.split(",")):
        a, _, b = item.partition("-")
        if a not in arms or b not in arms:
            raise ConfigError(
                f"--compare {item!r}: arms are {', '.join(arms)} (write a-b, a minus b)"
            )
        pairs.append((a, b))
    return pairs
