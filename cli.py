"""The command line: an `Args` dataclass becomes the flags (field foo_bar -> --foo-bar, help from
the docstring under the field), and a UserError becomes one line and exit status 2."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass

from errors import TRACEBACK_ENV, ConfigError, UserError


def run_cli(main, args_cls, argv: list[str] | None = None):
    """`main(parse_args(args_cls))`, where a UserError ends in one line `error: <message>` and exit
    status 2 (the traceback only with POSTTRAIN_TRACEBACK=1). Other exceptions are bugs and keep
    their traceback."""
    args = parse_args(args_cls, argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", "")
        resume = " (--resume continues from the last checkpoint)" if hasattr(args, "resume") else ""
        print(f"\ninterrupted: {out} keeps what was written{resume}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("0", ""):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows (default: X), except for None: a default that depends on the model is spelled out in
    the help text."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _flag_kwargs(tp) -> dict:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_kwargs(inner[0]) if len(inner) == 1 else {"type": str}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if origin in (list, tuple):
        return {"type": (typing.get_args(tp) or (str,))[0], "nargs": "+"}
    return {"type": tp}


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """An instance of dataclass `cls` from the command line: field foo_bar -> --foo-bar, help from
    the docstring under the field (field_docs)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    doc = description if description is not None else sys.modules[cls.__module__].__doc__
    parser = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        kwargs = _flag_kwargs(hints[f.name])
        if kwargs.get("action") is argparse.BooleanOptionalAction and f.name.startswith("no_"):
            # argparse reads any flag spelled --no-... as False: a field named no_x is a plain
            # switch
            kwargs = {"action": "store_true"}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        help_text = docs.get(f.name, " ").replace("%", "%%")  # argparse %-formats help strings
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs)
    return cls(**vars(parser.parse_args(argv)))


# The ranges of the flags that mean the same in every script (one name, one meaning), checked by
# check_flags in every script before anything loads: (low, high, whether low itself is allowed).
COUNTS = (
    "max_steps",
    "batch_size",
    "micro_batch_size",
    "num_iterations",
    "eval_size",
    "eval_samples",
    "num_samples",
    "limit",
    "toy_train_size",
    "lora_r",
    "max_length",
    "max_prompt_length",
    "max_new_tokens",
    "max_completion_length",
    "prefix_tokens",
    "suffix_tokens",
    "continuation_tokens",
    "thought_tokens",
    "answer_tokens",
    "gate_prefixes",
)
RANGES = {
    **{name: (1, math.inf, True) for name in COUNTS},
    "num_generations": (2, math.inf, True),  # a group of one has no relative advantage
    "lr": (0.0, math.inf, False),
    "temperature": (0.0, math.inf, True),  # 0 = greedy (evaluation); a trainer needs > 0
    "loss_temperature": (0.0, math.inf, False),
    "top_p": (0.0, 1.0, False),
    "warmup_ratio": (0.0, 1.0, True),
    "min_lr_ratio": (0.0, 1.0, True),
    "lora_alpha": (0.0, math.inf, False),
    "lora_dropout": (0.0, 1.0, True),
    "lmbda": (0.0, 1.0, True),  # GKD's on-policy share
    "max_grad_norm": (0.0, math.inf, True),
    "save_every": (0, math.inf, True),
    "eval_every": (0, math.inf, True),
    "log_completions": (0, math.inf, True),
}


# A trainer's log-probs divide by the sampling temperature: 0 (greedy) gives no gradient signal.
TRAIN_RANGES = {**RANGES, "temperature": (0.0, math.inf, False)}


def check_flags(args) -> None:
    """Every flag of `args` named in RANGES (TRAIN_RANGES for a trainer's TrainArgs; None is a
    default still to fill) is a finite number in its range; else a ConfigError naming the flag,
    its value and the range."""
    ranges = TRAIN_RANGES if isinstance(args, TrainArgs) else RANGES
    for name, (low, high, closed) in ranges.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        inside = (value >= low if closed else value > low) and value <= high
        if not (math.isfinite(value) and inside):
            left = f">= {low}" if closed else f"> {low}"
            bound = left if high == math.inf else f"{left} and <= {high}"
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be {bound}")


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` and of the classes it extends (the
    nearest definition wins): the help text of its flag."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # a class without source (defined in a string): no help
            continue
        for field, doc in zip(body, body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


@dataclass
class TrainArgs:
    """The flags every trainer shares, with the same names and meaning in each. A script's `Args`
    extends it with the method's own flags, and may redeclare a field here to change its default.
    None means "filled by the script's DEFAULTS table" (toy world, or a real model on the
    device)."""

    model: str = "toy"
    """hub id or local dir of a causal LM; 'toy' = the toy base, 'smollm2' = the offline real
    model"""
    data: str = "toy"
    """training data (JSONL or a hub dataset id); 'toy' = the method's toy task"""
    eval_data: str = ""
    """held-out data of the same schema, its first --eval-size rows (rlmt.py: --gate-prefixes);
    '' = the toy's held-out split, or the last tenth of --data (the held-out rule of every script)
    """
    init_adapter: str = ""
    """PEFT adapter(s) merged into the model before a fresh LoRA is added ('' = none)"""
    out: str = "runs/run"
    """run directory: args.json, metrics.jsonl, samples.jsonl, the adapter, checkpoint/,
    summary.json"""
    seed: int = 0
    """random seed (data order, LoRA init, sampling)"""
    lr: float | None = None
    """peak learning rate (AdamW; unset: the script's default for the model and device)"""
    warmup_ratio: float = 0.1
    """share of the steps with a linear warmup from 0"""
    min_lr_ratio: float = 0.1
    """after warmup, cosine decay to this share of the peak LR (1.0 keeps it constant)"""
    max_steps: int = 100
    """optimizer steps"""
    batch_size: int = 8
    """prompts or examples per optimizer step per device"""
    micro_batch_size: int = 32
    """rows per forward/backward; gradients accumulate over the micro-batches of a step"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 = off)"""
    lora_r: int | None = None
    """LoRA rank (unset: the script's default for the model and device)"""
    lora_alpha: float | None = None
    """LoRA alpha (default 2 x rank)"""
    lora_dropout: float = 0.0
    """dropout on the LoRA input"""
    load_in_4bit: bool | None = None
    """QLoRA: NF4 base weights (unset: the script's default for the model and device)"""
    gradient_checkpointing: bool | None = None
    """recompute activations in backward (unset: the script's default for the model and device)"""
    toy_train_size: int = 4000
    """toy training rows"""
    save_every: int = 50
    """checkpoint every N steps (for --resume)"""
    resume: bool = False
    """continue from <out>/checkpoint"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    report_to: str = ""
    """also log to wandb or trackio"""
