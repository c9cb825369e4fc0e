"""The command line: an `Args` dataclass becomes the flags (field foo_bar -> --foo-bar, help from
the docstring under the field), and a UserError becomes one line and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from errors import TRACEBACK_ENV, UserError


def run_cli(main, args_cls, argv: list[str] | None = None):
    """`main(parse_args(args_cls))`, where a UserError ends in one line `error: <message>` and exit
    status 2 (the traceback only with POSTTRAIN_TRACEBACK=1). Other exceptions are bugs and keep
    their traceback."""
    args = parse_args(args_cls, argv)
    try:
        return main(args)
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
    metadata."""
    hints = typing.get_type_hints(cls)
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
        help_text = f.metadata.get("help", " ").replace(
            "%", "%%"
        )  # argparse %-formats help strings
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs)
    return cls(**vars(parser.parse_args(argv)))
