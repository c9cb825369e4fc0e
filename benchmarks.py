"""The reasoning benchmarks eval_reasoning.py scores: where each lives on the hub, the rule that
grades its answers, the instruction of its user turn, and its problems as {"id", "prompt", "gold",
"rule"} from the hub, a local JSONL / Parquet file in the hub's schema, or the toy world; and the
tables (and a plot) the results are reported in, as the model card
Jarrodbarnes/qwen3-0.6B-interleaved-thinking reports them."""

from __future__ import annotations

import math
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


def chosen(spec: str, model: str) -> list[str]:
    """--benchmarks as a list; 'auto' = the toy ones for the toy model, else the four real ones."""
    if spec != "auto":
        return [b.strip() for b in spec.split(",") if b.strip()]
    return [n for n in BENCHMARKS if n.startswith("toy_")] if model == "toy" else list(NAMES)


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


# ---- the card's tables: per arm and benchmark, macro averages, deltas between arms ---------------


def format_ci(lo_hi: list[float]) -> str:
    """An interval as '[+lo, +hi]' to 3 decimals; 'n/a' when a bound is not finite."""
    if all(map(math.isfinite, lo_hi)):
        return f"[{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]"
    return "n/a"


def arm_table(results: dict, k: int) -> list[dict]:
    """The card's first table: per arm and benchmark, Mean@k with its interval, Pass@k, tokens."""
    rows = []
    for arm, res in results.items():
        for bench, r in res["benchmarks"].items():
            rows.append(
                {
                    "Arm": arm,
                    "Benchmark": NAMES.get(bench, bench),
                    f"Mean@{k}": r["mean_at_k"],
                    "95% CI": format_ci(r["mean_at_k_ci"]),
                    "Correct / Samples": f"{r['correct']} / {r['samples']}",
                    f"Pass@{k}": r.get(f"pass_at_{k}"),
                    "Any Pass / Problems": f"{r['any_pass']} / {r['problems']}",
                    "Avg Completion Tokens": round(r["avg_completion_tokens"], 1),
                    "Truncated": round(r["truncation_rate"], 3),
                }
            )
    return rows


def macro_table(results: dict, k: int) -> list[dict]:
    """The card's second table: per arm, the macro averages over its benchmarks."""
    rows = []
    for arm, res in results.items():
        macro, tps = res["macro"], res["generated_tokens_per_second"]
        row = {"Arm": arm, f"Macro Mean@{k}": macro["mean_at_k"]}
        row[f"Macro Pass@{k}"] = macro[f"pass_at_{k}"]
        row["Macro Avg Completion Tokens"] = round(macro["avg_completion_tokens"], 1)
        row["generated tok/s"] = round(tps, 1) if tps else "cached"
        rows.append(row)
    return rows


def delta_table(compared: list[tuple[str, dict]], k: int) -> list[dict]:
    """The card's third table: per comparison (arm a minus arm b) and benchmark, the deltas with
    their intervals."""
    pk, out = f"pass_at_{k}", []
    for label, rows in compared:
        for bench, r in rows.items():
            out.append(
                {
                    "Comparison": label,
                    "Benchmark": "Macro" if bench == "macro" else NAMES.get(bench, bench),
                    f"Mean@{k} Delta": f"{r['mean_at_k_delta']:+.4f}",
                    "95% CI": format_ci(r["mean_at_k_ci"]),
                    f"Pass@{k} Delta": f"{r[f'{pk}_delta']:+.4f}",
                    f"Pass@{k} 95% CI": format_ci(r[f"{pk}_ci"]),
                    "Avg Token Delta": f"{r['token_delta']:+.1f}",
                }
            )
    return out
