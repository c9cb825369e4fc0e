"""The toy model: character tokenizer with Qwen3's special tokens and chat templates, the Qwen3
configs, and the shipped checkpoints (base, distillation student, thinking-SFT adapter)."""

from __future__ import annotations

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
BASE_DIR = TOY_DIR / "base"
STUDENT_DIR = TOY_DIR / "student"
SFT_ADAPTER_DIR = TOY_DIR / "sft_think"
SFT_INSTRUCT_DIR = (
    TOY_DIR / "sft_instruct"
)  # thinking SFT on toy instructions: rlmt.py starts from it
SFT_FORMATS_DIR = (
    TOY_DIR / "sft_formats"
)  # thinking SFT over the three answer formats: an evaluation arm
DOMAIN_ADAPTERS = (
    "story",
    "news",
    "code",
)  # toy/<domain>: language-model SFT on one domain; karcher_merge.py merges them

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3 marks <think> and </think> as non-special (they survive skip_special_tokens=True).
_SPECIAL_FLAG = {
    "<|endoftext|>": True,
    "<|im_start|>": True,
    "<|im_end|>": True,
    "<think>": False,
    "</think>": False,
}
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB = SPECIAL_TOKENS + CHARS  # id = position; fixed forever (the shipped base depends on it)
PAD_ID, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID = range(5)
MODEL_VOCAB_SIZE = 128  # embedding rows: len(VOCAB) = 101 padded to a multiple of 64

CHAT_TEMPLATE = (TOY_DIR / "chat_template.jinja").read_text()
"""Qwen3's chat template, byte for byte (from Qwen3's tokenizer_config.json)."""
TRAINING_CHAT_TEMPLATE = (TOY_DIR / "chat_template_training.jinja").read_text()
"""Qwen3's template for training: every assistant turn renders
`<think>\\n{reasoning}\\n</think>\\n\\n` (empty reasoning gives the empty block Qwen3 writes when
thinking is off) and its output, from `<think>` through `<|im_end|>`, sits in `{% generation %}`;
the role header and the newline after `<|im_end|>` stay outside (the model never generates them: it
stops at `<|im_end|>`)."""


def load_tokenizer(chat_template: str | None = None):
    """The toy character tokenizer as a `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad
    `<|endoftext|>`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # BPE without merges over a character vocabulary = one token per character; no pre-tokenizer,
    # so spaces and newlines are ordinary characters. Characters outside the vocabulary are dropped.
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[]))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if _SPECIAL_FLAG[t]]
    )
    core.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t in SPECIAL_TOKENS
            if not _SPECIAL_FLAG[t]
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        chat_template=chat_template or CHAT_TEMPLATE,
    )
    return tok


# ----------------------------------------------------------------------------------------------
# Model configs
# ----------------------------------------------------------------------------------------------


def tiny_config(vocab_size: int | None = None):
    """The toy base model's Qwen3Config: 0.8M parameters, hidden 128, 4 layers, GQA 4/2 heads."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size or MODEL_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=PAD_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
        use_cache=True,
    )


def student_config(vocab_size: int | None = None):
    """A smaller Qwen3Config (0.1M parameters: hidden 64, 2 layers) for distillation students."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size or MODEL_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=PAD_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
        use_cache=True,
    )


# ----------------------------------------------------------------------------------------------
# The shipped checkpoints
# ----------------------------------------------------------------------------------------------


def _shipped(path: Path, weights: str, command: str) -> Path:
    if not (path / weights).exists():
        raise FileNotFoundError(
            f"{path / weights} is missing; rebuild it with `{command}` from the repo root"
        )
    return path


def base_model_dir() -> Path:
    """The toy base model's directory (config, weights, tokenizer)."""
    return _shipped(BASE_DIR, "model.safetensors", "python scripts/pretrain_toy.py")


def student_model_dir() -> Path:
    """A smaller pretrained toy model (`student_config`, same corpus) for distillation."""
    return _shipped(STUDENT_DIR, "model.safetensors", "python scripts/pretrain_toy.py --student")


def sft_adapter_dir() -> Path:
    """The toy base's thinking-SFT LoRA adapter (PEFT format), the starting point of the RL
    scripts."""
    return _shipped(
        SFT_ADAPTER_DIR, "adapter_model.safetensors", "python sft_think.py --out toy/sft_think"
    )


def domain_adapter_dirs() -> list[Path]:
    """The toy base's per-domain adapters (toy/story, toy/news, toy/code), the inputs of
    karcher_merge.py."""
    return [
        _shipped(
            TOY_DIR / d, "adapter_model.safetensors", f"python scripts/make_toy_adapters.py {d}"
        )
        for d in DOMAIN_ADAPTERS
    ]


def load_model(path: str | Path | None = None):
    """A toy model (the base by default) in eval mode, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or base_model_dir(), dtype="float32").eval()
