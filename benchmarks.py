"""The reasoning benchmarks eval_reasoning.py scores: where each lives on the hub, the rule that
grades its answers, the instruction of its user turn, and its problems as {"id", "prompt", "gold",
"rule"} from the hub, a local JSONL / Parquet file in the hub's schema, or the toy world."""

from __future__ import annotations

import random

import answers
import dataio
import errors
import toy

# name -> (hub id, config, split, answer rule); the toy counterparts are toy arithmetic in each
# answer format
BENCHMARKS = {
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "math"),
    "gpqa": ("Idavidrein/gpqa", "gpqa_diamond", "train", "mc"),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "math"),
    "toy_gsm8k": ("toy", (1, 2, 3), "gsm8k", "gsm8k"),
    "toy_math": ("toy", (1, 2, 3), "math", "math"),
    "toy_gpqa": ("toy", (1, 2, 3), "mc", "mc"),
    "toy_olympiad": ("toy", (4, 5), "math", "math"),
}


NAMES = {"gsm8k": "GSM8K", "math500": "MATH-500", "gpqa": "GPQA-Diamond"}


NAMES["olympiadbench"] = "OlympiadBench"


# what the user turn asks for; the toy model was trained on bare questions, so its prompts carry
# none
INSTRUCTION = {
    "gsm8k": "Solve the problem step by step. Give the final answer on the last line as '#### "
    "<number>'.",
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "mc": "Think step by step, then give the letter of the correct choice on the last line as "
    "'Answer: X'.",
}


# GPQA lists the correct answer first; the order shown is shuffled per problem
GPQA_OPTIONS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


RULE = {name: rule for name, (*_, rule) in BENCHMARKS.items()} | {"math": "math", "mc": "mc"}


def data_sources(data: str) -> dict[str, str]:
    """--data bench=file,... as {bench: file}."""
    return dict(item.split("=", 1) for item in data.split(",") if "=" in item)


def load_benchmark(
    name: str, source: str = "", limit: int | None = None, seed: int = 0
) -> list[dict]:
    """Problems {"id", "prompt" (the user turn), "gold", "rule"} of one benchmark: the toy
    counterparts generated, else `source` (a local JSONL / Parquet file in the hub schema) or the
    hub dataset. GPQA's four choices are put in one seeded order per problem, recorded in "choices"
    (GPQA lists the correct answer first)."""
    if name not in BENCHMARKS:
        raise errors.ConfigError(
            f"--benchmarks: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})"
        )
    hub, config, split, rule = BENCHMARKS[name]
    if hub == "toy":
        rows = toy.arithmetic("test", limit or 64, seed=seed, difficulty=list(config), style=split)
        return [
            {"id": f"{name}-{i}", "prompt": r["prompt"], "gold": r["answer"], "rule": rule}
            for i, r in enumerate(rows)
        ]
    rows = _read_local(source) if source else _read_hub(name)
    problems = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        where = f"{source}:{i + 1}" if source else f"{hub}[{split}] row {i}"
        if name == "gpqa":
            problems.append(gpqa_problem(row, i, seed, where))
            continue
        question, gold = question_and_gold(name, row, where)
        pid = str(row.get("unique_id", row.get("id", i)))
        prompt = str(question).strip() + "\n\n" + INSTRUCTION[rule]
        problems.append({"id": pid, "prompt": prompt, "gold": gold, "rule": rule})
    return problems


def question_and_gold(name: str, row: dict, where: str) -> tuple[str, str]:
    """GSM8K, MATH-500 and OlympiadBench rows in their hub schemas."""
    if name == "gsm8k":
        return _field(row, "question", where), answers.gold_answer(_field(row, "answer", where))
    if name == "math500":
        return _field(row, "problem", where), str(_field(row, "answer", where))
    final = _field(row, "final_answer", where)
    return _field(row, "question", where), str(final[0] if isinstance(final, list) else final)


def gpqa_problem(row: dict, i: int, seed: int, where: str) -> dict:
    """A GPQA row with its four choices in one order seeded by (seed, record id)."""
    options = [_field(row, k, where).strip() for k in GPQA_OPTIONS]
    order = list(range(4))
    random.Random(f"{seed}-{row.get('Record ID', i)}").shuffle(order)
    choices = [options[j] for j in order]
    listed = "\n".join(f"{'ABCD'[j]}) {c}" for j, c in enumerate(choices))
    question = _field(row, "Question", where).strip() + "\n" + listed
    return {
        "id": str(row.get("Record ID", i)),
        "prompt": question + "\n\n" + INSTRUCTION["mc"],
        "gold": "ABCD"[order.index(0)],
        "rule": "mc",
        "choices": choices,
    }


def _read_local(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional, only for Parquet files

        return pq.read_table(path).to_pylist()
    return dataio.read_jsonl(path)


def _read_hub(name: str) -> list[dict]:
    hub, config, split, _ = BENCHMARKS[name]
    try:
        import datasets  # optional: local files need no `datasets`
    except ImportError:
        raise errors.MissingError(
            f"{name}: loading {hub} needs `pip install datasets` (or --data {name}=file.jsonl)"
        )
    try:
        return [dict(r) for r in datasets.load_dataset(hub, config, split=split)]
    except Exception as e:  # datasets raises many types: one line with the dataset and the cause
        gated = ""
        if name == "gpqa":
            gated = (
                " (a gated dataset: accept its terms on the hub and log in with `hf auth login`)"
            )
        cause = " ".join(str(e).split())[:300]
        raise errors.MissingError(f"{name}: could not load {hub}{gated}: {cause}") from None


def _field(row: dict, key: str, where: str):
    if key not in row or row[key] in (None, ""):
        present = ", ".join(row) or "none"
        raise errors.DataError(f"{where}: field {key!r}: missing (present: {present})")
    return row[key]
