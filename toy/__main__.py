"""Write or show the toy tasks.

python -m toy export --out data/    # every task as JSONL in the repo's data schemas
python -m toy show                  # print one example of every task
"""

from __future__ import annotations

import argparse
from typing import Sequence

from toy.model import TRAINING_CHAT_TEMPLATE, load_tokenizer
from toy.tasks import DIFFICULTIES, DOMAINS, STYLES, arithmetic, documents, export, instructions


def show() -> None:
    tok = load_tokenizer(TRAINING_CHAT_TEMPLATE)
    for style in STYLES:
        print(
            tok.apply_chat_template(
                arithmetic("train", 1, difficulty=3, style=style)[0]["messages"], tokenize=False
            )
        )
    print(tok.apply_chat_template(instructions("train", 1)[0]["messages"], tokenize=False))
    for d in DOMAINS:
        print(documents("train", 1, domains=[d])[0]["text"], end="\n\n")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    px = sub.add_parser("export", help="write every task as JSONL")
    px.add_argument("--out", required=True, help="output directory")
    px.add_argument("--n-train", type=int, default=5000, help="records per train file")
    px.add_argument("--n-test", type=int, default=500, help="records per test file")
    px.add_argument("--seed", type=int, default=0, help="generator seed")
    px.add_argument(
        "--difficulty",
        type=int,
        nargs="+",
        default=[2],
        choices=sorted(DIFFICULTIES),
        help="arithmetic level(s) of the main files",
    )
    sub.add_parser("show", help="print one example of every task")
    args = p.parse_args(argv)
    if args.cmd == "export":
        for path in export(args.out, args.n_train, args.n_test, args.seed, args.difficulty):
            print(path)
    else:
        show()


if __name__ == "__main__":
    main()
