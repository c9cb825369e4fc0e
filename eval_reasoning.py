"""Reasoning evaluation: GSM8K, MATH-500, GPQA-Diamond, OlympiadBench with k samples per problem;
Mean@k and Pass@k with intervals clustered by question, paired comparisons between arms; this repo's
sampler or any OpenAI-compatible server (vLLM, SGLang, `transformers serve`); and a likelihood suite
(lambada_openai, arc_easy, piqa).

The protocol of the model card Jarrodbarnes/qwen3-0.6B-interleaved-thinking: k = 8 samples per
problem, 512 new tokens, T = 0.6, top-p 0.95; per arm and benchmark Mean@k, Pass@k and average
completion tokens, macro averages over the benchmarks, and deltas between arms. With s_i = c_i / n_i
(c_i of the n_i samples of question i right):

    Mean@k = (1/N) sum_i s_i                                  (average sample accuracy: an unbiased pass@1)
    Pass@k = (1/N) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)]    (unbiased; Chen et al. 2021, arXiv 2107.03374)
    95% interval: mean +- 1.96 sd(s_i) / sqrt(N) within [0, 1], over questions: k samples of one question are not
    independent (Miller 2024, arXiv 2411.00640); Wilson's when every s_i is 0 or 1 and N <= 300 (GPQA-Diamond: 198).
    Arms A and B on the same questions: d_i = s_i^A - s_i^B, mean +- 1.96 sd(d_i) / sqrt(N) within [-1, 1].

Answers, after any think block: GSM8K `#### N`, else "The answer is N", else the last number;
MATH-500 and OlympiadBench the last brace-matched \\boxed{}, checked by exact numbers and normal
forms, then Math-Verify (gold first) in worker processes with a per-answer timeout (a timeout is
scored wrong and counted); GPQA `Answer: X`. Model output is never evaluated as code.

Every sample is appended to <out>/generations.jsonl as it finishes, keyed by (model, benchmark,
problem, prompt, sampling parameters, sample index): run the same command again after a kill and
only the missing samples are drawn. A server request that keeps failing is reported and left out of
the scores (never scored wrong); rerun to fill it.

Run:
    python eval_reasoning.py     # toy benchmarks, the arms found: toy base, toy/sft_think, toy/sft_formats, runs/*
    python eval_reasoning.py --model Qwen/Qwen3-0.6B-Base --arms base=,think=runs/sft,rlmt=runs/rlmt \\
        --benchmarks gsm8k,math500 --compare rlmt-think   # rlmt's lineage: runs/sft, then runs/rlmt
    vllm serve Qwen/Qwen3-0.6B-Base --port 8000 &   # the fast path: one server per arm, the same client
    python eval_reasoning.py --model Qwen/Qwen3-0.6B-Base --arms base=http://127.0.0.1:8000 \\
        --benchmarks gsm8k,math500,gpqa,olympiadbench --concurrency 32
    python eval_reasoning.py --suite likelihood                   # toy counterparts of the lm-eval tasks
    python eval_reasoning.py --suite likelihood --model Qwen/Qwen3-4B-Base --arms base=,merged=runs/karcher
Several GPUs: one process per arm (`--arms` one each, `--device cuda:N`), or one server with data
parallelism.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import answers
import cli
import dataio
import errors
import lifecycle
import likelihood
import loading
import lora
import sampling
import serving
import stats
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
NAMES = {
    "gsm8k": "GSM8K",
    "math500": "MATH-500",
    "gpqa": "GPQA-Diamond",
    "olympiadbench": "OlympiadBench",
}
# what the user turn asks for; the toy model was trained on bare questions, so its prompts carry
# none
INSTRUCTION = {
    "gsm8k": "Solve the problem step by step. Give the final answer on the last line as '#### "
    "<number>'.",
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "mc": "Think step by step, then give the letter of the correct choice on the last line as "
    "'Answer: X'.",
}


@dataclass
class Args:
    model: str = "toy"
    """base model: 'toy', a hub id or a local dir (arms build on it)"""
    init_adapter: str = ""
    """adapter dir(s) 'a+b' under every in-process arm"""
    arms: str = "auto"
    """name=spec,...; spec '' = the model itself, an adapter dir (or dirs joined by '+', merged in
    order), a model dir, or an http:// URL of an OpenAI-compatible server; 'auto' = toy: the base,
    the shipped thinking-SFT adapters and the runs/ adapters found; hub: the model alone"""
    compare: str = "auto"
    """a-b,... arm deltas (a minus b); 'auto' = every arm minus the first"""
    benchmarks: str = "auto"
    """comma-separated, of gsm8k, math500, gpqa, olympiadbench, toy_gsm8k, toy_math, toy_gpqa,
    toy_olympiad; 'auto' = the four toy ones (toy) or the four real ones"""
    data: str = ""
    """bench=file,...: local JSONL or Parquet in the hub schema instead of the hub dataset"""
    limit: int | None = None
    """first N problems (or documents) per benchmark (toy reasoning default 64)"""
    num_samples: int = 8
    """k: samples per problem (the card: 8)"""
    max_new_tokens: int | None = None
    """per sample (default 512, the card's; toy 160)"""
    temperature: float = 0.6
    """sampling temperature (the card: 0.6)"""
    top_p: float = 0.95
    """nucleus sampling (the card: 0.95)"""
    batch_size: int = 32
    """in-process: problems sampled together (x k rows)"""
    server_model: str = ""
    """the model name a server arm is asked for (default --model)"""
    chat: bool = False
    """server arms: /v1/chat/completions with the messages instead of /v1/completions with the
    locally rendered prompt"""
    concurrency: int = 16
    """server arms: requests in flight"""
    timeout: float = 600.0
    """server arms: seconds per request before a retry"""
    retries: int = 3
    """server arms: retries per request, with exponential backoff"""
    use_n: str = "auto"
    """server arms: 'auto' (ask for k choices per request, fall back to k requests if the server
    ignores n), 'yes', 'no'"""
    answer_timeout: int = 5
    """seconds Math-Verify may spend on one answer"""
    answer_workers: int = 2
    """worker processes for Math-Verify"""
    suite: str = "reasoning"
    """'reasoning' or 'likelihood' (lambada_openai, arc_easy, piqa scored as lm-evaluation-harness
    scores them)"""
    likelihood_tasks: str = "auto"
    """comma-separated; 'auto' = toy_lambada,toy_arc,toy_piqa (toy) or lambada_openai,arc_easy,piqa
    """
    load_in_4bit: bool = False
    """load in-process arms in 4-bit NF4 (bitsandbytes)"""
    out: str = "runs/eval"
    """run directory (generations.jsonl is the resumable cache)"""
    seed: int = 0
    """seed of the samples, and of GPQA's choice order"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N"""


# ---- benchmarks ----------------------------------------------------------------------------------
def _read_local(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional, only for Parquet files

        return pq.read_table(path).to_pylist()
    return dataio.read_jsonl(path)


def _read_hub(name: str) -> list[dict]:
    hub, config, split, _ = BENCHMARKS[name]
    try:
        import datasets  # noqa: PLC0415 - optional: local files need no `datasets`
    except ImportError:
        raise errors.MissingError(
            f"{name}: loading {hub} needs `pip install datasets` (or --data {name}=file.jsonl)"
        )
    try:
        return [dict(r) for r in datasets.load_dataset(hub, config, split=split)]
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line with the dataset and the cause
        gated = (
            " (a gated dataset: accept its terms on the hub and log in with `hf auth login`)"
            if name == "gpqa"
            else ""
        )
        raise errors.MissingError(
            f"{name}: could not load {hub}{gated}: {' '.join(str(e).split())[:300]}"
        ) from None


def _field(row: dict, key: str, where: str):
    if key not in row or row[key] in (None, ""):
        raise errors.DataError(
            f"{where}: field {key!r}: missing (present: {', '.join(row) or 'none'})"
        )
    return row[key]


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
    rows, problems = rows[:limit] if limit else rows, []
    for i, row in enumerate(rows):
        where = f"{source or hub}:{i + 1}" if source else f"{hub}[{split}] row {i}"
        if name == "gsm8k":
            question, gold = (
                _field(row, "question", where),
                answers.gold_answer(_field(row, "answer", where)),
            )
        elif name == "math500":
            question, gold = _field(row, "problem", where), str(_field(row, "answer", where))
        elif name == "olympiadbench":
            final = _field(row, "final_answer", where)
            question, gold = (
                _field(row, "question", where),
                str(final[0] if isinstance(final, list) else final),
            )
        else:
            options = [
                _field(row, k, where).strip()
                for k in (
                    "Correct Answer",
                    "Incorrect Answer 1",
                    "Incorrect Answer 2",
                    "Incorrect Answer 3",
                )
            ]
            order = list(range(4))
            random.Random(f"{seed}-{row.get('Record ID', i)}").shuffle(order)
            choices = [options[j] for j in order]
            question = (
                _field(row, "Question", where).strip()
                + "\n"
                + "\n".join(f"{'ABCD'[j]}) {c}" for j, c in enumerate(choices))
            )
            gold = "ABCD"[order.index(0)]
            problems.append(
                {
                    "id": str(row.get("Record ID", i)),
                    "prompt": question + "\n\n" + INSTRUCTION[rule],
                    "gold": gold,
                    "rule": rule,
                    "choices": choices,
                }
            )
            continue
        pid = str(row.get("unique_id", row.get("id", i)))
        problems.append(
            {
                "id": pid,
                "prompt": str(question).strip() + "\n\n" + INSTRUCTION[rule],
                "gold": gold,
                "rule": rule,
            }
        )
    return problems


# ---- answers and pass@k --------------------------------------------------------------------------
_RULE = {name: rule for name, (*_, rule) in BENCHMARKS.items()} | {"math": "math", "mc": "mc"}


def extract(rule: str, completion: str) -> str | None:
    """The final answer a completion gives under a benchmark's rule, from the text after any think
    block."""
    return answers.EXTRACTORS[rule](answers.strip_think(completion))


def is_correct(benchmark: str, completion: str, gold: str) -> bool:
    """Is `completion` right on `benchmark` (gsm8k, math500, gpqa, olympiadbench, or a toy name)?
    Math answers go through answers.answers_match (Math-Verify in this process; the evaluation
    itself uses worker processes)."""
    if benchmark not in _RULE:
        raise ValueError(f"unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARKS)})")
    rule, pred = _RULE[benchmark], extract(_RULE[benchmark], completion)
    if rule == "mc":
        return pred is not None and pred == str(gold).strip().strip("()").upper()
    return answers.answers_match(answers.gold_answer(gold) if rule == "gsm8k" else gold, pred)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as the product
    prod_{i=n-c+1}^{n} (1 - k/i) to stay finite (Chen et al. 2021, arXiv 2107.03374, fig. 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def interval(values: list[float]) -> list[float]:
    """95% interval of a mean over questions (each value in [0, 1]): Wilson's when every value is 0
    or 1 and there are <= 300 of them, else the normal one with the standard error of the
    per-question values, clipped to [0, 1]."""
    n, mean = len(values), statistics.fmean(values) if values else float("nan")
    if n < 2:
        return [float("nan"), float("nan")]
    if n <= 300 and all(v in (0.0, 1.0) for v in values):
        z = 1.96
        centre, half = (
            (mean + z * z / (2 * n)) / (1 + z * z / n),
            z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n),
        )
        return [centre - half, centre + half]
    return stats.bounded_interval(mean, 1.96 * statistics.stdev(values) / math.sqrt(n))


def paired(a: list[float], b: list[float]) -> tuple[float, float, list[float]]:
    """mean(a_i - b_i), its standard error and 95% interval (within [-1, 1]) over the shared
    questions."""
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return mean, se, stats.bounded_interval(mean, 1.96 * se, -1.0, 1.0)


def score_benchmark(samples: dict[str, list[dict]], k: int) -> dict:
    """Metrics of one arm on one benchmark from {problem id: its scored samples}; problems with no
    sample (every request failed) are left out and counted."""
    done = {p: s for p, s in samples.items() if s}
    if not done:  # every request failed: nothing to score (the failures are reported)
        return {
            "problems": 0,
            "missing_problems": len(samples),
            "samples": 0,
            "correct": 0,
            "any_pass": 0,
            "mean_at_k_ci": [math.nan] * 2,
            "per_problem": {},
            "per_problem_tokens": {},
            **dict.fromkeys(("mean_at_k", "avg_completion_tokens", "truncation_rate"), math.nan),
        }
    n_i = [len(s) for s in done.values()]
    c_i = [sum(x["correct"] for x in s) for s in done.values()]
    s_i = [c / n for c, n in zip(c_i, n_i)]
    row = {
        "problems": len(done),
        "missing_problems": len(samples) - len(done),
        "samples": sum(n_i),
        "correct": sum(c_i),
        "mean_at_k": statistics.fmean(s_i),
        "mean_at_k_ci": interval(s_i),
        "per_problem": dict(zip(done, s_i)),
    }
    for j in sorted({1, 2, 4, k}):
        if j <= min(n_i):
            p = [pass_at_k(n, c, j) for n, c in zip(n_i, c_i)]
            row[f"pass_at_{j}"], row[f"pass_at_{j}_ci"] = statistics.fmean(p), interval(p)
            row[f"per_problem_pass_at_{j}"] = dict(zip(done, p))
    flat = [x for s in done.values() for x in s]
    row["any_pass"] = sum(c > 0 for c in c_i)
    row["avg_completion_tokens"] = statistics.fmean(x["tokens"] for x in flat)
    row["truncation_rate"] = statistics.fmean(x["finish_reason"] == "length" for x in flat)
    row["per_problem_tokens"] = {
        p: statistics.fmean(x["tokens"] for x in s) for p, s in done.items()
    }
    return row


# ---- the samples: cache, in-process sampler, server ----------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _identity(spec: str, base: str) -> str:
    """What the samples come from: the spec, plus the size and head of each adapter's weights (a
    retrained adapter in the same directory is another model)."""
    parts = []
    for p in spec.split("+"):
        weights = Path(p) / "adapter_model.safetensors"
        if p and weights.is_file():
            with open(weights, "rb") as f:
                parts.append(
                    f"{p}:{weights.stat().st_size}:{hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]}"
                )
        else:
            parts.append(p)
    return f"{base}|{'+'.join(parts)}"


class Cache:
    """generations.jsonl: one sample a line, appended (and flushed) as it is drawn; read back on a
    rerun."""

    def __init__(self, path: Path):
        self.path, self.rows = path, {}
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # the torn last line of a killed run: drawn again
                        continue
                    self.rows[row["key"]] = row
        self.file = open(path, "a", encoding="utf-8")

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def draw_in_process(
    model, tokenizer, problems, keys, cache: Cache, a: Args, bench: str, bar
) -> tuple[int, float]:
    """k samples of every problem with this repo's batched sampler, `batch_size` problems at a time;
    each chunk has its own seeded generator, so a rerun after a kill draws exactly what the first
    run would have drawn."""
    tokens, seconds = 0, 0.0
    for start in range(0, len(problems), a.batch_size):
        chunk = list(range(start, min(start + a.batch_size, len(problems))))
        if all(keys[i][j] in cache.rows for i in chunk for j in range(a.num_samples)):
            continue
        prompts = [
            sampling.render_prompt([{"role": "user", "content": problems[i]["prompt"]}], tokenizer)
            for i in chunk
        ]
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(
            int(_key(a.seed, bench, start)[:8], 16)
        )
        t0 = time.perf_counter()
        roll = sampling.sample(
            model,
            tokenizer,
            prompts,
            n=a.num_samples,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            generator=gen,
        )
        seconds += time.perf_counter() - t0
        texts, lengths = roll.texts(tokenizer), roll.completion_mask.sum(1).tolist()
        for r, (i, j) in enumerate((i, j) for i in chunk for j in range(a.num_samples)):
            tokens += lengths[r]
            if keys[i][j] not in cache.rows:
                cache.add(
                    {
                        "key": keys[i][j],
                        "benchmark": bench,
                        "problem": problems[i]["id"],
                        "sample": j,
                        "text": texts[r],
                        "tokens": int(lengths[r]),
                        "finish_reason": "stop" if roll.finished[r] else "length",
                    }
                )
        bar.update(len(chunk))
    return tokens, seconds


def draw_from_server(
    client: serving.CompletionClient,
    tokenizer,
    problems,
    keys,
    cache: Cache,
    a: Args,
    bench: str,
    bar,
) -> tuple[int, float, list[str]]:
    """The missing samples from an OpenAI-compatible server, `concurrency` requests in flight; each
    finished request is cached at once; a request that fails after its retries is reported
    (returned), not scored."""
    jobs = []
    for i, p in enumerate(problems):
        missing = [j for j in range(a.num_samples) if keys[i][j] not in cache.rows]
        if not missing:
            continue
        prompt = (
            [{"role": "user", "content": p["prompt"]}]
            if a.chat
            else sampling.render_prompt([{"role": "user", "content": p["prompt"]}], tokenizer)
        )
        seed = int(_key(a.seed, bench, p["id"])[:7], 16)
        # all k in one request while none is cached (n > 1 where the server honours it); else the
        # missing ones
        groups = [missing] if len(missing) == a.num_samples else [[j] for j in missing]
        for js in groups:
            jobs.append(
                {
                    "problem": i,
                    "samples": js,
                    "request": dict(
                        prompt=prompt,
                        n=len(js),
                        max_tokens=a.max_new_tokens,
                        temperature=a.temperature,
                        top_p=a.top_p,
                        seed=seed + js[0],
                    ),
                }
            )
    failures, tokens, t0 = [], 0, time.perf_counter()

    def done(job, result):
        nonlocal tokens
        i = job["problem"]
        if isinstance(result, Exception):
            failures.append(f"{bench} problem {problems[i]['id']}: {result}")
            return
        for j, choice in zip(job["samples"], result):
            n_tok = len(tokenizer(choice.text, add_special_tokens=False)["input_ids"])
            tokens += n_tok
            cache.add(
                {
                    "key": keys[i][j],
                    "benchmark": bench,
                    "problem": problems[i]["id"],
                    "sample": j,
                    "text": choice.text,
                    "tokens": n_tok,
                    "finish_reason": choice.finish_reason,
                }
            )
        bar.update(len(job["samples"]) / a.num_samples)

    client.map(jobs, done)
    return tokens, time.perf_counter() - t0, failures


# ---- arms ----------------------------------------------------------------------------------------
def resolve_arms(spec: str, model: str) -> dict[str, str]:
    if spec != "auto":
        arms = {}
        for item in spec.split(","):
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise errors.ConfigError(f"--arms {spec!r}: each arm is name=spec, got {item!r}")
            arms[name.strip()] = value.strip()
        return arms
    if model != "toy":
        return {"base": ""}
    arms = {"base": "", "think": str(toy.sft_adapter_dir())}
    if (
        toy.SFT_FORMATS_DIR / "adapter_model.safetensors"
    ).is_file():  # the same SFT over all three answer formats
        arms["think_formats"] = str(toy.SFT_FORMATS_DIR)
    for name in ("sft_think", "grpo", "rlmt"):
        d, meta = Path("runs") / name, Path("runs") / name / "args.json"
        if (
            (d / lora.WEIGHTS_NAME).is_file()
            and meta.is_file()
            and json.loads(meta.read_text()).get("model") == "toy"
        ):
            arms[f"runs_{name}"] = str(d)
    return arms


def with_lineages(arms: dict[str, str], init_adapter: str) -> dict[str, str]:
    """In-process arms with --init-adapter first and every adapter's lineage written out (tables,
    cache keys)."""
    if init_adapter and any(s.startswith(("http://", "https://")) for s in arms.values()):
        raise errors.ConfigError("--init-adapter applies to in-process arms; --arms has a server")
    try:
        return {
            n: s if s.startswith(("http://", "https://")) else lora.expand_arm(s, init_adapter)
            for n, s in arms.items()
        }
    except FileNotFoundError as e:
        raise errors.MissingError(f"--arms: {e}") from None


def resolve_compare(spec: str, arms: list[str]) -> list[tuple[str, str]]:
    if spec == "auto":
        return [(a, arms[0]) for a in arms[1:]]
    pairs = []
    for item in filter(None, spec.split(",")):
        a, _, b = item.partition("-")
        if a not in arms or b not in arms:
            raise errors.ConfigError(
                f"--compare {item!r}: arms are {', '.join(arms)} (write a-b, a minus b)"
            )
        pairs.append((a, b))
    return pairs


def evaluate_arm(name: str, spec: str, benches: dict, a: Args, cache: Cache, run, verifier) -> dict:
    """Draw what is missing for one arm, score every sample, and write the scored samples to
    samples.jsonl."""
    server = spec.startswith(("http://", "https://"))
    model, tokenizer, client = None, None, None
    if server:
        tokenizer = loading.load_tokenizer(a.model)
        client = serving.CompletionClient(
            spec,
            a.server_model or a.model,
            chat=a.chat,
            concurrency=a.concurrency,
            timeout=a.timeout,
            retries=a.retries,
            use_n=a.use_n,
        )
    identity, result = (
        (
            f"server:{spec}:{a.server_model or a.model}:{'chat' if a.chat else 'text'}"
            if server
            else _identity(spec, a.model)
        ),
        {"benchmarks": {}, "failures": []},
    )
    gen_tokens, gen_seconds = 0, 0.0
    for bench, problems in benches.items():
        params = (a.num_samples, a.max_new_tokens, a.temperature, a.top_p, a.seed)
        keys = [
            [_key(identity, bench, p["id"], p["prompt"], params, j) for j in range(a.num_samples)]
            for p in problems
        ]
        todo = sum(
            keys[i][j] not in cache.rows for i in range(len(problems)) for j in range(a.num_samples)
        )
        if todo and not server and model is None:
            model, tok_dir = lora.load_arm(spec, a.model, run.device, a.load_in_4bit)
            tokenizer, model = loading.load_tokenizer(tok_dir), model.eval()
        bar = tqdm(total=len(problems), desc=f"{name} {bench}", disable=not todo, leave=False)
        if todo and server:
            t, s, failed = draw_from_server(client, tokenizer, problems, keys, cache, a, bench, bar)
            result["failures"] += failed
        elif todo:
            t, s = draw_in_process(model, tokenizer, problems, keys, cache, a, bench, bar)
        gen_tokens, gen_seconds = (
            gen_tokens + (t if todo else 0),
            gen_seconds + (s if todo else 0.0),
        )
        bar.close()
        drawn = [(p, cache.rows[k]) for p, ks in zip(problems, keys) for k in ks if k in cache.rows]
        preds = [extract(p["rule"], row["text"]) for p, row in drawn]
        math_rows = [i for i, (p, _) in enumerate(drawn) if p["rule"] != "mc"]
        verdicts = dict(
            zip(math_rows, verifier.check([(drawn[i][0]["gold"], preds[i]) for i in math_rows]))
        )
        per_problem = {p["id"]: [] for p in problems}
        for i, (p, row) in enumerate(drawn):
            ok = verdicts[i] if i in verdicts else (preds[i] is not None and preds[i] == p["gold"])
            per_problem[p["id"]].append({**row, "correct": bool(ok)})
            dataio.append_jsonl(
                run.out / "samples.jsonl",
                {
                    "arm": name,
                    "benchmark": bench,
                    "problem": p["id"],
                    "sample": row["sample"],
                    "gold": p["gold"],
                    "extracted": preds[i],
                    "correct": bool(ok),
                    "tokens": row["tokens"],
                    "finish_reason": row["finish_reason"],
                    "text": row["text"],
                    **({"choices": p["choices"]} if "choices" in p else {}),
                },
            )
        result["benchmarks"][bench] = score_benchmark(per_problem, a.num_samples)
    result.update(
        generated_tokens=gen_tokens,
        generated_tokens_per_second=gen_tokens / gen_seconds if gen_seconds else None,
    )
    del model
    return result


# ---- reports -------------------------------------------------------------------------------------
_ci = lambda lo_hi: (
    f"[{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]" if all(map(math.isfinite, lo_hi)) else "n/a"
)  # noqa: E731


def report(results: dict, pairs: list[tuple[str, str]], k: int, out: Path) -> dict:
    """The card's three tables (per arm and benchmark; macro averages; deltas between arms), printed
    and in tables.md; the comparisons as numbers for summary.json; a PNG of the arms when matplotlib
    is installed."""
    pk = f"pass_at_{k}"
    t1, t2, t3, comparisons = [], [], [], {}
    for arm, res in results.items():
        rows = res["benchmarks"]
        for bench, r in rows.items():
            t1.append(
                {
                    "Arm": arm,
                    "Benchmark": NAMES.get(bench, bench),
                    f"Mean@{k}": r["mean_at_k"],
                    "95% CI": _ci(r["mean_at_k_ci"]),
                    "Correct / Samples": f"{r['correct']} / {r['samples']}",
                    f"Pass@{k}": r.get(pk),
                    "Any Pass / Problems": f"{r['any_pass']} / {r['problems']}",
                    "Avg Completion Tokens": round(r["avg_completion_tokens"], 1),
                    "Truncated": round(r["truncation_rate"], 3),
                }
            )
        res["macro"] = {
            "mean_at_k": statistics.fmean(r["mean_at_k"] for r in rows.values()),
            pk: statistics.fmean(r.get(pk, float("nan")) for r in rows.values()),
            "avg_completion_tokens": statistics.fmean(
                r["avg_completion_tokens"] for r in rows.values()
            ),
        }
        tps = res["generated_tokens_per_second"]
        t2.append(
            {
                "Arm": arm,
                f"Macro Mean@{k}": res["macro"]["mean_at_k"],
                f"Macro Pass@{k}": res["macro"][pk],
                "Macro Avg Completion Tokens": round(res["macro"]["avg_completion_tokens"], 1),
                "generated tok/s": round(tps, 1) if tps else "cached",
            }
        )
    for a_name, b_name in pairs:
        label, rows, ses = f"{a_name} vs {b_name}", {}, {"m": [], "p": []}
        for bench in results[a_name]["benchmarks"]:
            ra, rb = results[a_name]["benchmarks"][bench], results[b_name]["benchmarks"].get(bench)
            if rb is None:
                continue
            shared = [p for p in ra["per_problem"] if p in rb["per_problem"]]
            if not shared:
                continue
            m, m_se, m_ci = paired(
                [ra["per_problem"][p] for p in shared], [rb["per_problem"][p] for p in shared]
            )
            p_key = f"per_problem_{pk}"
            pm, p_se, p_ci = (
                paired([ra[p_key][p] for p in shared], [rb[p_key][p] for p in shared])
                if p_key in ra and p_key in rb
                else (float("nan"),) * 2 + ([float("nan")] * 2,)
            )
            tok = statistics.fmean(
                ra["per_problem_tokens"][p] - rb["per_problem_tokens"][p] for p in shared
            )
            rows[bench] = {
                "mean_at_k_delta": m,
                "mean_at_k_ci": m_ci,
                f"{pk}_delta": pm,
                f"{pk}_ci": p_ci,
                "token_delta": tok,
                "shared_problems": len(shared),
            }
            ses["m"].append(m_se), ses["p"].append(p_se)
        if rows:  # macro: the mean of independent per-benchmark deltas, SE = sqrt(sum se^2) / B
            B = len(rows)
            macro = {
                key: statistics.fmean(r[key] for r in rows.values())
                for key in ("mean_at_k_delta", f"{pk}_delta", "token_delta")
            }
            half = {s: 1.96 * math.sqrt(sum(x * x for x in ses[s])) / B for s in ses}
            macro["mean_at_k_ci"] = stats.bounded_interval(
                macro["mean_at_k_delta"], half["m"], -1.0, 1.0
            )
            macro[f"{pk}_ci"] = stats.bounded_interval(macro[f"{pk}_delta"], half["p"], -1.0, 1.0)
            rows["macro"] = macro
        comparisons[label] = rows
        for bench, r in rows.items():
            t3.append(
                {
                    "Comparison": label,
                    "Benchmark": "Macro" if bench == "macro" else NAMES.get(bench, bench),
                    f"Mean@{k} Delta": f"{r['mean_at_k_delta']:+.4f}",
                    "95% CI": _ci(r["mean_at_k_ci"]),
                    f"Pass@{k} Delta": f"{r[f'{pk}_delta']:+.4f}",
                    f"Pass@{k} 95% CI": _ci(r[f"{pk}_ci"]),
                    "Avg Token Delta": f"{r['token_delta']:+.1f}",
                }
            )
    text = "\n\n".join(dataio.markdown_table(t) for t in (t1, t2, t3) if t)
    dataio.atomic_write_text(out / "tables.md", text + "\n")
    print("\n" + text, flush=True)
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return comparisons
    benches = list(next(iter(results.values()))["benchmarks"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(benches), 3.2))
    width = 0.8 / len(results)
    for n, (arm, res) in enumerate(results.items()):
        ys = [res["benchmarks"][b]["mean_at_k"] for b in benches]
        err = [
            [y - res["benchmarks"][b]["mean_at_k_ci"][0] for y, b in zip(ys, benches)],
            [res["benchmarks"][b]["mean_at_k_ci"][1] - y for y, b in zip(ys, benches)],
        ]
        ax.bar(
            [i + n * width for i in range(len(benches))], ys, width, yerr=err, capsize=2, label=arm
        )
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(benches))], [NAMES.get(b, b) for b in benches]
    )
    ax.set_ylabel(f"Mean@{k} (95% CI)"), ax.legend(fontsize=7), fig.tight_layout()
    fig.savefig(out / "arms.png", dpi=120)
    plt.close(fig)
    return comparisons


def run_likelihood(a: Args, arms: dict[str, str], run) -> dict:
    tasks = (
        (["toy_lambada", "toy_arc", "toy_piqa"] if a.model == "toy" else list(likelihood.TASKS))
        if a.likelihood_tasks == "auto"
        else a.likelihood_tasks.split(",")
    )
    sources, results, rows = (
        dict(item.split("=", 1) for item in a.data.split(",") if "=" in item),
        {},
        [],
    )
    for name, spec in arms.items():
        if spec.startswith("http"):
            raise errors.ConfigError(
                f"--arms {name}={spec}: the likelihood suite needs the model in process"
            )
        model, tok_dir = lora.load_arm(spec, a.model, run.device, a.load_in_4bit)
        results[name] = likelihood.run_suite(
            model.eval(), loading.load_tokenizer(tok_dir), tasks, sources, a.limit
        )
        rows += [
            {
                "Arm": name,
                "Task": t,
                "n": r["n"],
                "acc": r["acc"],
                "acc_norm": r.get("acc_norm"),
                "perplexity": r.get("perplexity"),
            }
            for t, r in results[name].items()
        ]
        del model
    print("\n" + dataio.markdown_table(rows), flush=True)
    dataio.atomic_write_text(run.out / "tables.md", dataio.markdown_table(rows) + "\n")
    return lifecycle.finish_run(
        run, {"method": "eval_likelihood", "likelihood": results, "args": asdict(a)}
    )


def main(a: Args):
    if a.max_new_tokens is None:
        a.max_new_tokens = 160 if a.model == "toy" else 512
    if a.limit is None and a.model == "toy" and a.suite == "reasoning":
        a.limit = 64
    if a.num_samples < 1 or a.max_new_tokens < 1:
        raise errors.ConfigError("--num-samples and --max-new-tokens must be >= 1")
    run, arms = (
        lifecycle.start_run(a.out, a, a.seed, a.device),
        with_lineages(resolve_arms(a.arms, a.model), a.init_adapter),
    )
    if a.suite == "likelihood":
        return run_likelihood(a, arms, run)
    if a.suite != "reasoning":
        raise errors.ConfigError(f"--suite {a.suite!r}: 'reasoning' or 'likelihood'")
    names = (
        ([n for n in BENCHMARKS if n.startswith("toy_")] if a.model == "toy" else list(NAMES))
        if a.benchmarks == "auto"
        else [b.strip() for b in a.benchmarks.split(",") if b.strip()]
    )
    sources = dict(item.split("=", 1) for item in a.data.split(",") if "=" in item)
    benches = {b: load_benchmark(b, sources.get(b, ""), a.limit, a.seed) for b in names}
    pairs = resolve_compare(a.compare, list(arms))
    print(f"arms: {', '.join(f'{n}={s or a.model}' for n, s in arms.items())}", flush=True)
    cache = Cache(run.out / "generations.jsonl")
    results = {}
    with answers.MathVerifier(a.answer_workers, a.answer_timeout) as verifier:
        for name, spec in arms.items():
            results[name] = evaluate_arm(name, spec, benches, a, cache, run, verifier)
            tps = results[name]["generated_tokens_per_second"]
            print(
                f"{name}: {results[name]['generated_tokens']} tokens generated"
                + (f", {tps:.1f} tok/s" if tps else " (all from the cache)"),
                flush=True,
            )
        answer_stats = {
            "math_verify": verifier.available,
            "timeouts": verifier.timeouts,
            "undecided_without_math_verify": verifier.undecided,
        }
    comparisons = report(results, pairs, a.num_samples, run.out)
    failures = [f for r in results.values() for f in r["failures"]]
    for f in failures[:20]:
        print(f"failed (not scored; rerun to retry): {f}", flush=True)
    for r in results.values():
        for b in r["benchmarks"].values():
            for key in [k for k in b if k.startswith("per_problem")]:
                b.pop(key)
    summary = lifecycle.finish_run(
        run,
        {
            "method": "eval_reasoning",
            "arms": arms,
            "results": results,
            "comparisons": comparisons,
            "answers": answer_stats,
            "failed_requests": failures,
            "args": asdict(a),
        },
    )
    if failures:
        raise errors.UserError(
            f"{len(failures)} request(s) failed after their retries (listed above; the finished "
            f"samples are cached in {run.out / 'generations.jsonl'}: rerun the same command)"
        )
    return summary


if __name__ == "__main__":
    cli.run_cli(main, Args)
