"""Reasoning evaluation: GSM8K, MATH-500, GPQA-Diamond, OlympiadBench with k samples per problem;
Mean@k and Pass@k with intervals clustered by question, paired comparisons between arms; this repo's
sampler or any OpenAI-compatible server (vLLM, SGLang, `transformers serve`); and a likelihood suite
(lambada_openai, arc_easy, piqa).

The protocol of the model card Jarrodbarnes/qwen3-0.6B-interleaved-thinking: k = 8 samples per
problem, 512 new tokens, T = 0.6, top-p 0.95; per arm and benchmark Mean@k, Pass@k and average
completion tokens, macro averages over the benchmarks, and deltas between arms. With s_i = c_i / n_i
(c_i of the n_i samples of question i right):

    Mean@k = (1/N) sum_i s_i                        (average sample accuracy: an unbiased pass@1)
    Pass@k = (1/N) sum_i [1 - C(n_i - c_i, k) / C(n_i, k)]
             (unbiased; Chen et al. 2021, arXiv 2107.03374)
    95% interval: mean +- 1.96 sd(s_i) / sqrt(N) within [0, 1], over questions: k samples of one
             question are not independent (Miller 2024, arXiv 2411.00640); Wilson's when every s_i
             is 0 or 1 and N <= 300 (GPQA-Diamond: 198).
    Arms A and B on the same questions: d_i = s_i^A - s_i^B, mean +- 1.96 sd(d_i) / sqrt(N) within
             [-1, 1]; the macro delta over B benchmarks: SE = sqrt(sum_b SE_b^2) / B.

Answers, after any think block: GSM8K `#### N`, else "The answer is N", else the last number;
MATH-500 and OlympiadBench the last brace-matched \\boxed{}, checked by exact numbers and normal
forms, then Math-Verify (gold first) in worker processes with a per-answer timeout (a timeout is
scored wrong and counted); GPQA `Answer: X`. Model output is never evaluated as code.

Every sample is appended to <out>/generations.jsonl as it finishes, keyed by (model, benchmark,
problem, prompt, sampling parameters, sample index): run the same command again after a kill and
only the missing samples are drawn. A server request that keeps failing is reported and left out of
the scores (never scored wrong); rerun to fill it.

Run:
    python eval_reasoning.py     # toy benchmarks; arms: toy base, toy/sft_think, toy/sft_formats,
                                 # and the toy runs/* found
    python eval_reasoning.py --model Qwen/Qwen3-0.6B-Base \\
        --arms base=,think=runs/sft,rlmt=runs/rlmt --benchmarks gsm8k,math500 \\
        --compare rlmt-think                  # rlmt's lineage: runs/sft, then runs/rlmt
    vllm serve Qwen/Qwen3-0.6B-Base --port 8000 &  # the fast path: one server per arm, same client
    python eval_reasoning.py --model Qwen/Qwen3-0.6B-Base --arms base=http://127.0.0.1:8000 \\
        --benchmarks gsm8k,math500,gpqa,olympiadbench --concurrency 32
    python eval_reasoning.py --suite likelihood      # toy counterparts of the lm-eval tasks
    python eval_reasoning.py --suite likelihood --model Qwen/Qwen3-4B-Base \\
        --arms base=,merged=runs/karcher
Several GPUs: one process per arm (`--arms` one each, `--device cuda:N`), or one server with data
parallelism.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import answers
import benchmarks
import cli
import dataio
import errors
import lifecycle
import likelihood
import loading
import lora
import plots
import samplecache
import sampling
import serving
import stats

# ---- Mean@k and Pass@k, intervals ----------------------------------------------------------------


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
    or 1 and there are 2 to 300 of them (stats.wilson), else the normal one over the per-question
    values (stats.mean_interval)."""
    n = len(values)
    if 2 <= n <= 300 and all(v in (0.0, 1.0) for v in values):
        return stats.wilson(statistics.fmean(values), n)
    return stats.mean_interval(values)[1]


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
    row = {"problems": len(done), "missing_problems": len(samples) - len(done)}
    row.update(samples=sum(n_i), correct=sum(c_i), mean_at_k=statistics.fmean(s_i))
    row.update(mean_at_k_ci=interval(s_i), per_problem=dict(zip(done, s_i)))
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


def macro_average(rows: dict[str, dict], k: int) -> dict:
    """One arm's metrics averaged over its benchmarks, each benchmark weighted alike."""
    pk = f"pass_at_{k}"
    return {
        "mean_at_k": statistics.fmean(r["mean_at_k"] for r in rows.values()),
        pk: statistics.fmean(r.get(pk, math.nan) for r in rows.values()),
        "avg_completion_tokens": statistics.fmean(
            r["avg_completion_tokens"] for r in rows.values()
        ),
    }


def paired_delta(a: dict, b: dict, shared: list[str]) -> tuple[float, float, list[float]]:
    """a_i - b_i over the shared questions: (mean, standard error, 95% interval in [-1, 1])."""
    return stats.paired_interval([b[p] for p in shared], [a[p] for p in shared])


def compare_on(ra: dict, rb: dict, pk: str):
    """Arm a minus arm b on one benchmark, over the questions both scored: (deltas, SE of the
    Mean@k delta, SE of the Pass@k delta), or None when they share none."""
    shared = [p for p in ra["per_problem"] if p in rb["per_problem"]]
    if not shared:
        return None
    m, m_se, m_ci = paired_delta(ra["per_problem"], rb["per_problem"], shared)
    p_key = f"per_problem_{pk}"
    if p_key in ra and p_key in rb:
        pm, p_se, p_ci = paired_delta(ra[p_key], rb[p_key], shared)
    else:
        pm, p_se, p_ci = math.nan, math.nan, [math.nan, math.nan]
    tokens_a, tokens_b = ra["per_problem_tokens"], rb["per_problem_tokens"]
    tok = statistics.fmean(tokens_a[p] - tokens_b[p] for p in shared)
    row = {"mean_at_k_delta": m, "mean_at_k_ci": m_ci, f"{pk}_delta": pm, f"{pk}_ci": p_ci}
    row.update(token_delta=tok, shared_problems=len(shared))
    return row, m_se, p_se


def compare_arms(a: dict, b: dict, k: int) -> dict:
    """{benchmark: deltas of arm a minus arm b}, plus "macro": the mean of the per-benchmark deltas
    with SE = sqrt(sum_b SE_b^2) / B (the benchmarks are independent samples)."""
    pk = f"pass_at_{k}"
    rows, ses = {}, {"m": [], "p": []}
    for bench, ra in a["benchmarks"].items():
        rb = b["benchmarks"].get(bench)
        found = None if rb is None else compare_on(ra, rb, pk)
        if found is None:
            continue
        rows[bench], m_se, p_se = found
        ses["m"].append(m_se)
        ses["p"].append(p_se)
    if rows:
        B = len(rows)
        keys = ("mean_at_k_delta", f"{pk}_delta", "token_delta")
        macro = {key: statistics.fmean(r[key] for r in rows.values()) for key in keys}
        half = {s: stats.Z95 * math.sqrt(sum(x * x for x in ses[s])) / B for s in ses}
        macro["mean_at_k_ci"] = stats.bounded_interval(
            macro["mean_at_k_delta"], half["m"], -1.0, 1.0
        )
        macro[f"{pk}_ci"] = stats.bounded_interval(macro[f"{pk}_delta"], half["p"], -1.0, 1.0)
        rows["macro"] = macro
    return rows


# ---- drawing and scoring the samples of one arm --------------------------------------------------


def draw_in_process(
    model, tokenizer, problems, keys, cache: samplecache.Cache, a: Args, bench: str, bar
) -> tuple[int, float]:
    """k samples of every problem with this repo's batched sampler, `batch_size` problems at a time;
    each chunk has its own seeded generator, so a rerun after a kill draws exactly what the first
    run would have drawn."""
    tokens, seconds = 0, 0.0
    for start in range(0, len(problems), a.batch_size):
        chunk = list(range(start, min(start + a.batch_size, len(problems))))
        if all(keys[i][j] in cache.rows for i in chunk for j in range(a.num_samples)):
            continue
        prompts = [user_prompt(problems[i]["prompt"], tokenizer) for i in chunk]
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(
            int(samplecache.key(a.seed, bench, start)[:8], 16)
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
                finish = "stop" if roll.finished[r] else "length"
                cache.add(
                    samplecache.sample_row(
                        keys[i][j], bench, problems[i], j, texts[r], lengths[r], finish
                    )
                )
        bar.update(len(chunk))
    return tokens, seconds


def draw_from_server(
    client: serving.CompletionClient,
    tokenizer,
    problems,
    keys,
    cache: samplecache.Cache,
    a: Args,
    bench,
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
        if a.chat:
            prompt = [{"role": "user", "content": p["prompt"]}]
        else:
            prompt = user_prompt(p["prompt"], tokenizer)
        seed = int(samplecache.key(a.seed, bench, p["id"])[:7], 16)
        # all k in one request while none is cached (n > 1 where the server honours it); else the
        # missing ones
        groups = [missing] if len(missing) == a.num_samples else [[j] for j in missing]
        for js in groups:
            request = dict(prompt=prompt, n=len(js), max_tokens=a.max_new_tokens)
            request.update(temperature=a.temperature, top_p=a.top_p, seed=seed + js[0])
            jobs.append({"problem": i, "samples": js, "request": request})
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
            finish = choice.finish_reason
            cache.add(
                samplecache.sample_row(
                    keys[i][j], bench, problems[i], j, choice.text, n_tok, finish
                )
            )
        bar.update(len(job["samples"]) / a.num_samples)

    client.map(jobs, done)
    return tokens, time.perf_counter() - t0, failures


def check_samples(
    arm: str, bench: str, problems, keys, cache: samplecache.Cache, verifier, out: Path
):
    """{problem id: its drawn samples, each with "correct"}: multiple choice by the letter, math by
    answers.MathVerifier in its worker processes; every scored sample is appended to
    samples.jsonl."""
    drawn = [(p, cache.rows[k]) for p, ks in zip(problems, keys) for k in ks if k in cache.rows]
    preds = [answers.extract(p["rule"], row["text"]) for p, row in drawn]
    math_rows = [i for i, (p, _) in enumerate(drawn) if p["rule"] != "mc"]
    checked = verifier.check([(drawn[i][0]["gold"], preds[i]) for i in math_rows])
    verdicts = dict(zip(math_rows, checked))
    per_problem = {p["id"]: [] for p in problems}
    for i, (p, row) in enumerate(drawn):
        ok = verdicts[i] if i in verdicts else (preds[i] is not None and preds[i] == p["gold"])
        per_problem[p["id"]].append({**row, "correct": bool(ok)})
        scored = {"arm": arm, "benchmark": bench, "problem": p["id"], "sample": row["sample"]}
        scored.update(gold=p["gold"], extracted=preds[i], correct=bool(ok), tokens=row["tokens"])
        scored.update(finish_reason=row["finish_reason"], text=row["text"])
        if "choices" in p:
            scored["choices"] = p["choices"]
        dataio.append_jsonl(out / "samples.jsonl", scored)
    return per_problem


def evaluate_arm(
    name: str, spec: str, benches: dict, a: Args, cache: samplecache.Cache, run, verifier
) -> dict:
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
        identity = f"server:{spec}:{a.server_model or a.model}:{'chat' if a.chat else 'text'}"
    else:
        identity = samplecache.identity(spec, a.model)
    result = {"benchmarks": {}, "failures": []}
    gen_tokens, gen_seconds = 0, 0.0
    params = (a.num_samples, a.max_new_tokens, a.temperature, a.top_p, a.seed)
    for bench, problems in benches.items():
        keys = [
            [
                samplecache.key(identity, bench, p["id"], p["prompt"], params, j)
                for j in range(a.num_samples)
            ]
            for p in problems
        ]
        todo = sum(k not in cache.rows for ks in keys for k in ks)
        if todo and not server and model is None:
            model, tok_dir = lora.load_arm(spec, a.model, run.device, a.load_in_4bit)
            tokenizer, model = loading.load_tokenizer(tok_dir), model.eval()
        bar = tqdm(total=len(problems), desc=f"{name} {bench}", disable=not todo, leave=False)
        if todo and server:
            t, s, failed = draw_from_server(client, tokenizer, problems, keys, cache, a, bench, bar)
            result["failures"] += failed
        elif todo:
            t, s = draw_in_process(model, tokenizer, problems, keys, cache, a, bench, bar)
        if todo:
            gen_tokens, gen_seconds = gen_tokens + t, gen_seconds + s
        bar.close()
        per_problem = check_samples(name, bench, problems, keys, cache, verifier, run.out)
        result["benchmarks"][bench] = score_benchmark(per_problem, a.num_samples)
    result["generated_tokens"] = gen_tokens
    result["generated_tokens_per_second"] = gen_tokens / gen_seconds if gen_seconds else None
    del model
    return result


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


def main(a: Args):
    if a.max_new_tokens is None:
        a.max_new_tokens = 160 if a.model == "toy" else 512
    if a.limit is None and a.model == "toy" and a.suite == "reasoning":
        a.limit = 64
    run = lifecycle.start_run(a)
    arms = lora.with_lineages(lora.resolve_arms(a.arms, a.model), a.init_adapter)
    if a.suite == "likelihood":
        return run_likelihood(a, arms, run)
    if a.suite != "reasoning":
        raise errors.ConfigError(f"--suite {a.suite!r}: 'reasoning' or 'likelihood'")
    sources = benchmarks.data_sources(a.data)
    benches = {
        b: benchmarks.load_benchmark(b, sources.get(b, ""), a.limit, a.seed)
        for b in benchmarks.chosen(a.benchmarks, a.model)
    }
    pairs = lora.resolve_compare(a.compare, list(arms))
    print(f"arms: {', '.join(f'{n}={s or a.model}' for n, s in arms.items())}", flush=True)
    cache = samplecache.Cache(run.out / "generations.jsonl")
    results = {}
    with answers.MathVerifier(a.answer_workers, a.answer_timeout) as verifier:
        for name, spec in arms.items():
            results[name] = evaluate_arm(name, spec, benches, a, cache, run, verifier)
            print_throughput(name, results[name])
        answer_stats = {
            "math_verify": verifier.available,
            "timeouts": verifier.timeouts,
            "undecided_without_math_verify": verifier.undecided,
        }
    comparisons = report(results, pairs, a.num_samples, run.out)
    failures = [f for r in results.values() for f in r["failures"]]
    for f in failures[:20]:
        print(f"failed (not scored; rerun to retry): {f}", flush=True)
    drop_per_problem(results)
    summary = {"method": "eval_reasoning", "arms": arms, "results": results}
    summary.update(comparisons=comparisons, answers=answer_stats, failed_requests=failures)
    summary = lifecycle.finish_run(run, {**summary, "args": asdict(a)})
    if failures:
        raise errors.UserError(
            f"{len(failures)} request(s) failed after their retries, the first: {failures[0]} "
            f"(all listed above; the finished samples are cached in "
            f"{run.out / 'generations.jsonl'}: rerun the same command)"
        )
    return summary


# ---- plumbing: the prompt -----------------------------------------------------------------------


def user_prompt(prompt: str, tokenizer) -> str:
    """One user turn rendered with the model's chat template."""
    return sampling.render_prompt([{"role": "user", "content": prompt}], tokenizer)


# ---- plumbing: reports ---------------------------------------------------------------------------


def report(results: dict, pairs: list[tuple[str, str]], k: int, out: Path) -> dict:
    """The card's three tables (per arm and benchmark; macro averages; deltas between arms), printed
    and in tables.md; the comparisons as numbers for summary.json; arms.png (plots.arm_chart)."""
    for res in results.values():
        res["macro"] = macro_average(res["benchmarks"], k)
    compared = [(f"{a} vs {b}", compare_arms(results[a], results[b], k)) for a, b in pairs]
    tables = (
        benchmarks.arm_table(results, k),
        benchmarks.macro_table(results, k),
        benchmarks.delta_table(compared, k),
    )
    text = "\n\n".join(dataio.markdown_table(t) for t in tables if t)
    dataio.atomic_write_text(out / "tables.md", text + "\n")
    print("\n" + text, flush=True)
    plots.arm_chart(results, k, out, benchmarks.NAMES)
    return dict(compared)


def print_throughput(name: str, result: dict) -> None:
    tps = result["generated_tokens_per_second"]
    speed = f", {tps:.1f} tok/s" if tps else " (all from the cache)"
    print(f"{name}: {result['generated_tokens']} tokens generated{speed}", flush=True)


def drop_per_problem(results: dict) -> None:
    """The per-question values feed the comparisons only; summary.json keeps the aggregates."""
    for r in results.values():
        for b in r["benchmarks"].values():
            for key in [k for k in b if k.startswith("per_problem")]:
                b.pop(key)


# ---- the likelihood suite ------------------------------------------------------------------------


def run_likelihood(a: Args, arms: dict[str, str], run) -> dict:
    """lambada_openai, arc_easy, piqa (or their toy counterparts) per arm, as
    lm-evaluation-harness scores them (likelihood.run_suite)."""
    tasks = likelihood.suite_tasks(a.likelihood_tasks, a.model)
    sources = benchmarks.data_sources(a.data)
    where = (run.device, a.load_in_4bit)
    results, rows = likelihood.run_suite_arms(arms, a.model, tasks, sources, a.limit, *where)
    print("\n" + dataio.markdown_table(rows), flush=True)
    dataio.atomic_write_text(run.out / "tables.md", dataio.markdown_table(rows) + "\n")
    summary = {"method": "eval_likelihood", "likelihood": results, "args": asdict(a)}
    return lifecycle.finish_run(run, summary)


if __name__ == "__main__":
    cli.run_cli(main, Args)
