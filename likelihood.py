"""Likelihood diagnostics of a base model, scored the way lm-evaluation-harness (EleutherAI) scores
them.

Model cards of continued-pretraining runs report zero-shot likelihood tasks next to their
benchmarks; this computes the same numbers in plain PyTorch on any causal LM (a LoRA-wrapped one
too):

- `lambada_openai` (Paperno et al. 2016, arXiv 1606.06031; the OpenAI detokenised test set): context
  = the text up to its last space, target = " " + the last word; acc = every target token is the
  greedy argmax; perplexity = exp(-mean over documents of the target's summed log-likelihood);
- `arc_easy` (Clark et al. 2018, arXiv 1803.05457) and `piqa` (Bisk et al. 2020, arXiv 1911.11641):
  context "Question: {question}\\nAnswer:", each choice scored as " " + choice; acc = argmax of the
  summed log-likelihood; acc_norm = argmax of it divided by the choice's length in characters (the
  choice text itself, without the leading space);
- toy counterparts (`toy_lambada`, `toy_arc`, `toy_piqa`), generated offline from the toy world: the
  shipped toy base scores clearly above chance on them, a random-init model does not.
- per domain of held-out documents: NLL per token and perplexity, and the diversity of sampled
  continuations (distinct-1, pairwise embedding diversity): how karcher_merge.py scores its merges.

Standard errors as the harness reports them: sd(x) / sqrt(n) (Bessel-corrected) for acc and
acc_norm, a bootstrap of 100,000 resamples for perplexity (the harness's own seeded resamples, see
perplexity_stderr).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import answers
import dataio
import errors
import loading
import lora
import rewards
import sampling

TASKS = ("lambada_openai", "arc_easy", "piqa")
TOY_TASKS = ("toy_lambada", "toy_arc", "toy_piqa")
KIND = {
    "lambada_openai": "lambada",
    "arc_easy": "arc",
    "piqa": "piqa",
    "toy_lambada": "lambada",
    "toy_arc": "arc",
    "toy_piqa": "piqa",
}
# Hub id, config and the split lm-evaluation-harness evaluates (its task YAMLs; piqa has no labelled
# test split).
HUB = {
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "piqa": ("baber/piqa", None, "validation"),
}
TOY_SIZE = 250
BOOTSTRAP_ITERS = 100_000  # the harness's default for bootstrapped stderrs

# ---- Log-likelihood of continuations -------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the harness makes them for a causal LM.

    Trailing whitespace of the context moves to the continuation; context + continuation is encoded
    as one string and split after the context's own encoding (so a token spanning the boundary
    counts as continuation). Special tokens: the tokenizer's default (`add_bos_token` unset in the
    harness): a Llama-style tokenizer prepends BOS, Qwen's adds nothing; a string that already
    starts with the prefix
    token is encoded without them. An empty context becomes the BOS/EOS token."""
    # the harness's prefix token: BOS, or EOS when the tokenizer has none (Qwen's has none)
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        ctx, cont = ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    else:
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        prefix_text = tokenizer.decode([prefix]) if prefix is not None else None
        special = (
            {"add_special_tokens": False} if prefix_text and context.startswith(prefix_text) else {}
        )
        whole = tokenizer.encode(context + continuation, **special)
        ctx = tokenizer.encode(context, **special)
        cont = whole[len(ctx) :]
    if not ctx or not cont or None in ctx:
        raise ValueError(
            f"nothing to score: context {context[-40:]!r}, continuation {continuation!r}"
        )
    return ctx, cont


def cut_to_tokens(tokenizer, text: str, limit: int) -> str:
    """`text`, or its first `limit` tokens when it is longer (a document longer than the model's
    context is scored on what fits)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= limit else tokenizer.decode(ids[:limit])


def _max_length(model, tokenizer) -> int:
    # The harness's order: the (text) config's context length, then the tokenizer's, then 2048.
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    n = getattr(tokenizer, "model_max_length", None)
    return (
        int(n) if n is not None and n < 10**29 else 2048
    )  # transformers' "no limit" is about 1e30


def _row_logits(model, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at (rows, cols) only: the decoder's hidden states go through the LM head for the
    scored positions, so [B, T, V] logits are never made (151,936 x 4 bytes per position for
    Qwen3)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if (
        decoder is None
        or decoder is model
        or head is None
        or getattr(cfg, "final_logit_softcapping", None)
        or getattr(cfg, "logit_scale", None)
    ):  # heads that rescale logits in forward: take the model's logits
        return model(input_ids=ids, use_cache=False).logits[rows, cols]
    return head(decoder(input_ids=ids, use_cache=False).last_hidden_state[rows, cols])


@torch.no_grad()
def loglikelihood(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    desc: str | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | everything before), every continuation token is the greedy
    argmax) per (context, continuation) request, as the harness's HF loglikelihood: see
    `encode_pair`; a sequence longer than max_length + 1 loses tokens on the left (max_length
    defaults to the model's context length). Sequences are right-padded without an attention mask
    (causal attention never looks right), sorted longest first so a batch holds similar lengths.
    Log-softmax in fp32 (the harness keeps the model's dtype unless softmax_dtype=float32: the same
    numbers on an fp32 model)."""
    limit = max_length or _max_length(model, tokenizer)
    seqs = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if len(cont) > limit:
            raise ValueError(
                f"continuation of {len(cont)} tokens exceeds max_length {limit}: "
                f"{continuation[:40]!r}"
            )
        toks = (ctx + cont)[-(limit + 1) :]
        seqs.append((toks[:-1], cont))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    device = model.get_input_embeddings().weight.device
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    training = model.training
    model.eval()  # dropout (LoRA's too) off: a score must not be random
    try:
        bar = tqdm(total=len(seqs), desc=desc, disable=desc is None)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(seqs[batch[0]][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, i in enumerate(batch):
                inp, cont = seqs[i]
                ids[r, : len(inp)] = torch.tensor(inp)
                # the hidden state at position t predicts token t + 1: the last len(cont) inputs
                # predict cont
                rows += [r] * len(cont)
                cols += range(len(inp) - len(cont), len(inp))
                targets += cont
            logits = _row_logits(
                model,
                ids.to(device),
                torch.tensor(rows, device=device),
                torch.tensor(cols, device=device),
            ).float()
            targets = torch.tensor(targets, device=device)
            token_lp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
            greedy = logits.argmax(-1) == targets
            sizes = [len(seqs[i][1]) for i in batch]
            for i, lp, g in zip(batch, token_lp.split(sizes), greedy.split(sizes)):
                out[i] = (float(lp.sum()), bool(g.all()))
            bar.update(len(batch))
        bar.close()
    finally:
        model.train(training)
    return out  # type: ignore[return-value]


# ---- Documents -----------------------------------------------------------------------------------


def _check_doc(kind: str, row, where: str) -> dict:
    """A row of the hub schema, or a DataError naming where and the field."""
    fields = {
        "lambada": {"text": str},
        "arc": {"question": str, "choices": dict, "answerKey": str},
        "piqa": {"goal": str, "sol1": str, "sol2": str, "label": int},
    }[kind]
    if not isinstance(row, dict):
        raise errors.DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field, tp in fields.items():
        if field not in row:
            raise errors.DataError(
                f"{where}: field {field!r}: missing (present: {', '.join(row) or 'none'})"
            )
        if not isinstance(row[field], tp) or isinstance(row[field], bool):
            raise errors.DataError(
                f"{where}: field {field!r}: expected {tp.__name__}, got {type(row[field]).__name__}"
            )
    if kind == "lambada" and not row["text"].strip():
        raise errors.DataError(f"{where}: field 'text': empty")
    if kind == "arc":
        text, label = row["choices"].get("text"), row["choices"].get("label")
        if not (
            isinstance(text, list)
            and isinstance(label, list)
            and len(text) == len(label) >= 2
            and all(isinstance(t, str) and t for t in text + label)
        ):
            raise errors.DataError(
                f"{where}: field 'choices': expected {{'text': [str, ...], 'label': [str, ...]}} "
                f"with two or more non-empty strings each"
            )
        if row["answerKey"] not in label:
            raise errors.DataError(
                f"{where}: field 'answerKey': {row['answerKey']!r} is not one of {label}"
            )
    if kind == "piqa" and row["label"] not in (0, 1):
        raise errors.DataError(f"{where}: field 'label': expected 0 or 1, got {row['label']}")
    return row


def _read_local(kind: str, path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise errors.UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)")
        import pyarrow.parquet as pq

        return [
            _check_doc(kind, r, f"{path}: row {i}")
            for i, r in enumerate(pq.read_table(path).to_pylist(), 1)
        ]
    if path.suffix not in (".jsonl", ".json"):
        raise errors.UserError(f"{path}: expected a .jsonl or .parquet file in the hub schema")
    rows = list(dataio.iter_jsonl(path))  # malformed lines fail here with their line number
    with open(
        path, encoding="utf-8"
    ) as f:  # the same line iteration as iter_jsonl, for the numbers
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise errors.DataError(f"{path}: empty file (no JSON lines)")
    return [_check_doc(kind, r, f"{path}:{n}") for r, n in zip(rows, lines)]


def _read_hub(name: str) -> list[dict]:
    hub_id, config, split = HUB[name]
    if importlib.util.find_spec("datasets") is None:
        raise errors.UserError(
            f"{name}: loading {hub_id} needs `datasets` (pip install datasets); or pass a local "
            f".jsonl / .parquet file in its schema"
        )
    import datasets

    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # offline, missing, renamed: datasets raises many types
        raise errors.UserError(
            f"{name}: cannot load {hub_id} ({config or 'default'}, {split} split) from the hub: "
            f"{type(e).__name__}: {e}"
        ) from e
    return [
        _check_doc(KIND[name], dict(r), f"{hub_id} {split} row {i}") for i, r in enumerate(rows)
    ]


def _toy_lambada(n: int, seed: int) -> list[dict]:
    """Toy documents cut after a word that earlier text determines: a story's "..., so <name>" (the
    name of the line's subject) or a council report's "would cost <N>" (the cost stated in the
    opening line)."""
    import toy

    out = []
    for d in toy.documents("test", n, seed, domains=("story", "news")):
        cut = list(re.finditer(r", so [A-Z][a-z]+|would cost \d+", d["text"]))[-1]
        out.append({"text": d["text"][: cut.end()]})
    return out


def _toy_arc(n: int, seed: int) -> list[dict]:
    """Single-digit column facts of the toy scratchpad ("7+5+1=13", "12-5-1=6"; the base read tables
    of them), 4 choices written as the equation. Distractors have the answer's number of digits
    (every choice has the same length) and, like the answer, a last digit absent from the question:
    a random-init model with tied embeddings favours tokens it has seen in the context, which would
    otherwise give answers away. 289 such facts exist."""
    facts = []
    for x, y, c in itertools.product(range(10), range(10), range(2)):
        borrow = x - y - c < 0  # shows as a leading 1, as in the scratchpad
        facts += [
            (f"{x}+{y}+{c}", x + y + c),
            (f"1{x}-{y}-{c}" if borrow else f"{x}-{y}-{c}", 10 * borrow + x - y - c),
        ]
    rng, out = random.Random(f"toy_arc/{seed}"), []
    rng.shuffle(facts)
    for lhs, v in facts:
        wrong = [
            w for w in range(20) if w != v and len(str(w)) == len(str(v)) and str(w)[-1] not in lhs
        ]
        if str(v)[-1] in lhs or len(wrong) < 3:
            continue
        values = rng.sample(wrong, 3) + [v]
        rng.shuffle(values)
        out.append(
            {
                "id": f"toy_arc/{len(out)}",
                "question": f"What is {lhs}?",
                "answerKey": "ABCD"[values.index(v)],
                "choices": {"text": [f"{lhs}={w}" for w in values], "label": list("ABCD")},
            }
        )
    return out[:n]


def _toy_piqa(n: int, seed: int) -> list[dict]:
    """A toy story's opening lines, then its true next line vs the same line with a cast member's
    name swapped for a same-length name from outside the cast (the same length, so only the facts
    tell them apart)."""
    import toy
    from toy.tasks import _S_NAMES as names  # the story grammar's name pool

    rng, out = random.Random(f"toy_piqa/{seed}"), []
    for d in toy.documents("test", 2 * n, seed, domains=("story",)):
        lines = d["text"].split("\n")
        cast = re.findall(r"([A-Z][a-z]+) the [a-z]+", lines[0])
        spots = [
            (k, x, y)
            for k in range(2, len(lines))
            for x in cast
            if re.search(rf"\b{x}\b", lines[k])
            for y in names
            if len(y) == len(x) and y not in cast
        ]
        if not spots:  # a cast of the only two 3-letter names has no same-length stranger
            continue
        k, x, y = rng.choice(spots)
        sols = [lines[k], re.sub(rf"\b{x}\b", y, lines[k])]
        label = rng.randrange(2)
        out.append(
            {
                "goal": "\n".join(lines[:k]),
                "sol1": sols[label],
                "sol2": sols[1 - label],
                "label": label,
            }
        )
    return out[:n]


def load_task(name: str, source: str | None = None, limit: int | None = None) -> list[dict]:
    """Documents of a task in its hub schema: lambada {"text"}; arc {"id", "question", "choices":
    {"text", "label"}, "answerKey"}; piqa {"goal", "sol1", "sol2", "label"}. source: a local .jsonl
    / .parquet file in that schema, or None for the hub dataset (`HUB`; toy tasks are generated,
    seeded). limit: the first `limit`."""
    if name not in KIND:
        raise errors.UserError(
            f"unknown likelihood task {name!r} (choose from {', '.join(TASKS + TOY_TASKS)})"
        )
    if source is not None:
        docs = _read_local(KIND[name], Path(source))
    elif name in TOY_TASKS:
        docs = {"toy_lambada": _toy_lambada, "toy_arc": _toy_arc, "toy_piqa": _toy_piqa}[name](
            limit or TOY_SIZE, 0
        )
    else:
        docs = _read_hub(name)
    return docs[:limit] if limit else docs


# ---- Scores --------------------------------------------------------------------------------------


def _requests(kind: str, doc: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """The harness's zero-shot prompts (its task YAMLs), and the choice strings acc_norm
    measures."""
    if kind == "lambada":
        words = doc["text"].split(" ")
        return [(" ".join(words[:-1]), " " + words[-1])], []
    if kind == "arc":
        context, choices = f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"]
    else:
        context, choices = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]]
    return [(context, " " + c) for c in choices], choices


def _mean_stderr(xs) -> float | None:
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None


def perplexity_stderr(lls, iters: int = BOOTSTRAP_ITERS) -> float | None:
    """Bootstrap stderr of exp(-mean(lls)), the harness's: resamples in chunks of min(1000, iters),
    chunk i drawn with Python's random.Random(i).choices; numpy's legacy MT19937 seeded with [i]
    yields the same doubles (same init_by_array, same 53-bit random()), and choices picks floor(u *
    n)."""
    if len(lls) < 2 or iters <= 0:
        return None
    xs, chunk = np.asarray(lls, dtype=np.float64), min(1000, iters)
    reps = []
    for i in range(iters // chunk):
        u = np.random.RandomState([i]).random_sample((chunk, len(xs)))
        reps.append(np.exp(-xs[(u * len(xs)).astype(np.int64)].mean(1)))
    return float(np.concatenate(reps).std(ddof=1))


def score_task(
    name: str,
    docs: list[dict],
    model,
    tokenizer,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
) -> dict:
    """lambada: {"acc", "acc_stderr", "perplexity", "perplexity_stderr", "n"}; arc / piqa: {"acc",
    "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}. A stderr is None for fewer than two
    documents."""
    kind = KIND[name]
    if not docs:
        raise errors.UserError(f"{name}: no documents to score")
    built = [_requests(kind, d) for d in docs]
    flat = [r for reqs, _ in built for r in reqs]
    results = iter(
        loglikelihood(
            model, tokenizer, flat, batch_size=batch_size, max_length=max_length, desc=name
        )
    )
    if kind == "lambada":
        lls, greedy = zip(*[next(results) for _ in docs])
        acc = [float(g) for g in greedy]
        return {
            "acc": float(np.mean(acc)),
            "acc_stderr": _mean_stderr(acc),
            "perplexity": math.exp(-float(np.mean(lls))),
            "perplexity_stderr": perplexity_stderr(lls, bootstrap_iters),
            "n": len(docs),
        }
    acc, acc_norm = [], []
    for doc, (reqs, choices) in zip(docs, built):
        lls = np.array([next(results)[0] for _ in reqs])
        gold = doc["choices"]["label"].index(doc["answerKey"]) if kind == "arc" else doc["label"]
        acc.append(
            float(np.argmax(lls) == gold)
        )  # argmax: the first of equal scores, as in the harness
        acc_norm.append(
            float(np.argmax(lls / np.array([len(c) for c in choices], dtype=float)) == gold)
        )
    return {
        "acc": float(np.mean(acc)),
        "acc_stderr": _mean_stderr(acc),
        "acc_norm": float(np.mean(acc_norm)),
        "acc_norm_stderr": _mean_stderr(acc_norm),
        "n": len(docs),
    }


def run_suite(
    model,
    tokenizer,
    tasks: list[str],
    sources: dict[str, str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict]:
    """score_task for each task (documents from sources[task], else the hub / the toy generator); a
    progress bar per task."""
    sources = sources or {}
    return {
        t: score_task(
            t, load_task(t, sources.get(t), limit), model, tokenizer, batch_size=batch_size
        )
        for t in tasks
    }


def suite_tasks(choice: str, model: str) -> list[str]:
    """--likelihood-tasks as a list; 'auto' = the toy tasks for the toy model, else TASKS."""
    if choice != "auto":
        return choice.split(",")
    return list(TOY_TASKS) if model == "toy" else list(TASKS)


def run_suite_arms(
    arms: dict[str, str], base: str, tasks, sources, limit, device, load_in_4bit: bool = False
) -> tuple[dict, list[dict]]:
    """run_suite for every arm {name: lora.load_arm spec on `base`}, one model in memory at a time:
    ({arm: {task: scores}}, the table's rows)."""
    results, rows = {}, []
    for name, spec in arms.items():
        if spec.startswith("http"):
            raise errors.ConfigError(
                f"--arms {name}={spec}: the likelihood suite needs the model in process"
            )
        model, tok_dir = lora.load_arm(spec, base, device, load_in_4bit)
        tokenizer = loading.load_tokenizer(tok_dir)
        results[name] = run_suite(model.eval(), tokenizer, tasks, sources, limit)
        for t, r in results[name].items():
            row = {"Arm": name, "Task": t, "n": r["n"], "acc": r["acc"]}
            row.update(acc_norm=r.get("acc_norm"), perplexity=r.get("perplexity"))
            rows.append(row)
        del model
    return results, rows


# ---- Held-out NLL per domain and the diversity of sampled continuations --------------------------


def prompt_head(text: str) -> str:
    """The first third of a text, cut after a space: a prompt to continue."""
    return text[: max(1, text.rfind(" ", 0, len(text) // 3) + 1 or len(text) // 3)]


def domain_sets(eval_data: str, base: str, eval_size: int, prompts: int, seed: int):
    """{domain: (held-out texts, prompts for sampling)}: the toy documents, or `eval_data` (JSONL
    {'text', 'domain'?}) grouped by 'domain' (its prompts: the first third of each text, cut at a
    space); None without `eval_data` for a model other than the toy base."""
    if not eval_data:
        if base != "toy":
            return None
        import toy

        sets = {}
        for d in toy.DOMAINS:
            docs = toy.documents("test", eval_size, seed=seed, domains=[d])
            starts = toy.continuations("test", prompts, seed=seed, domains=[d])
            sets[d] = ([r["text"] for r in docs], [r["prompt"] for r in starts])
        return sets
    sets: dict[str, list[str]] = {}
    for r in dataio.load_rows(eval_data, split="test", required=("text",), types={"text": str}):
        sets.setdefault(str(r.get("domain", "all")), []).append(r["text"])
    return {
        d: (texts, [prompt_head(t) for t in texts[:prompts]]) for d, texts in sorted(sets.items())
    }


@torch.no_grad()
def score_domains(
    model, tokenizer, sets, samples: int, max_new_tokens: int, temperature: float, seed: int
) -> dict:
    """Per domain of `sets` (domain_sets): held-out NLL per token and perplexity (a document longer
    than the model's context cut to it: cut_to_tokens); with `samples` >
    1, distinct-1 (whitespace words) within each prompt's k samples and their pairwise embedding
    diversity, both averaged over prompts ("_samples": the first two prompts' samples; "_units":
    per domain, each document's NLL per token and each prompt's distinct-1 and pairwise diversity,
    for intervals)."""
    row = {}
    limit = _max_length(model, tokenizer) - 8  # room for a BOS and for re-encoding
    for d, (texts, prompts) in sets.items():
        reqs = [("", cut_to_tokens(tokenizer, t, limit)) for t in texts]
        lls = loglikelihood(model, tokenizer, reqs, batch_size=16)
        n_toks = [len(encode_pair(tokenizer, c, t)[1]) for c, t in reqs]
        nll = -sum(ll for ll, _ in lls) / sum(n_toks)
        row[f"{d}/nll"], row[f"{d}/ppl"] = nll, math.exp(nll)
        units = row.setdefault("_units", {}).setdefault(d, {})
        units["nll"] = [-ll / n for (ll, _), n in zip(lls, n_toks)]
        if prompts and samples > 1:
            gen = torch.Generator(device=model.device).manual_seed(seed)
            roll = sampling.sample(
                model,
                tokenizer,
                prompts,
                n=samples,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                generator=gen,
            )
            texts_out = roll.texts(tokenizer)
            groups = [texts_out[i : i + samples] for i in range(0, len(texts_out), samples)]
            units["distinct1"] = [rewards.distinct_n(g, 1) for g in groups]
            units["pairwise"] = [rewards.pairwise_diversity(g) for g in groups]
            row[f"{d}/distinct1"] = sum(units["distinct1"]) / len(groups)
            row[f"{d}/pairwise"] = sum(units["pairwise"]) / len(groups)
            row.setdefault("_samples", {})[d] = groups[:2]
    return row


@torch.no_grad()
def score_arms(
    base: str,
    device,
    init_adapter: str,
    keys: list[str],
    arms: dict,
    sets,
    samples,
    max_new_tokens,
    temperature,
    seed,
) -> list[dict]:
    """Every arm {name: weight_of(key) -> tensor} put into one copy of `base` (with `init_adapter`
    merged first, '' = none) in turn (tensor by tensor, built when needed: a large model never holds
    two arms at once), then scored (score_domains): [{"arm", **scores}]."""
    model = loading.load_model(base, device=str(device)).eval()
    if init_adapter:
        lora.merge_adapters(model, init_adapter)
    tokenizer = loading.load_tokenizer(base)
    params = dict(model.named_parameters())
    keys = [k for k in keys if k in params]  # a tied head is one parameter
    rows = []
    for name, weight_of in arms.items():
        for k in keys:
            params[k].copy_(weight_of(k).to(params[k].dtype))
        scores = score_domains(model, tokenizer, sets, samples, max_new_tokens, temperature, seed)
        rows.append({"arm": name, **scores})
    return rows


def report_domains(rows: list[dict], domains: list[str], out: Path) -> list[dict]:
    """Rows {"arm", **score_domains} reported: their samples to out/samples.jsonl, the table
    printed; returns the rows without their samples."""
    samples = [
        {"arm": r["arm"], "domain": d, "samples": g}
        for r in rows
        for d, g in r.get("_samples", {}).items()
    ]
    dataio.write_jsonl(out / "samples.jsonl", samples)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print("\n" + dataio.markdown_table(domain_table(rows, domains)), flush=True)
    return rows


def domain_table(rows: list[dict], domains) -> list[dict]:
    """The printed table: NLL and perplexity per domain, diversity averaged over domains."""
    out = []
    for r in rows:
        t = {"arm": r["arm"]}
        for d in domains:
            t[f"{d} NLL"], t[f"{d} ppl"] = round(r[f"{d}/nll"], 4), round(r[f"{d}/ppl"], 3)
        for col, label in (("distinct1", "distinct-1"), ("pairwise", "pairwise div")):
            vals = [r[f"{d}/{col}"] for d in domains if f"{d}/{col}" in r]
            if vals:
                t[label] = round(sum(vals) / len(vals), 3)
        out.append(t)
    return out


# ---- A style reward for GRPO: the likelihood of a completion under a proxy model -----------------


class ProxyNLLReward:
    """Style reward: the mean per-token log-likelihood (= -mean NLL, <= 0) of each completion under
    a small causal LM fitted to the domain, batched, under no_grad on the proxy's device. The model
    card Lambent/Qwen3-4B-Base-Continued-GRPO-Style-Karcher fitted style with SmolLM2-360M as the
    proxy.

    The proxy reads [start] + prompt + completion (start = BOS, or EOS for a tokenizer without a
    BOS, as Qwen's: a document boundary) with its own tokenizer, and the completion's tokens are
    scored: log p(completion | prompt), so a continuation is judged in its document. The prompt is
    context only when it is text (a document prefix); a chat prompt is left out. The closing EOS is
    scored too unless `finished` says the completion was cut at the token limit: the proxy then
    judges where a completion ends, and an empty completion scores its EOS (never a free 0). At
    most max_length completion tokens are scored; the prompt keeps its last tokens to fit the
    proxy's context.
    """

    def __init__(
        self,
        model_name_or_path: str = "toy",
        device: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        model=None,
        tokenizer=None,
        base: str = "toy",
    ):
        """The proxy: `model` and `tokenizer`, or loaded from `model_name_or_path` (a hub id or
        model dir, or adapter dir(s) joined by '+' onto `base`: lora.load_arm), frozen."""
        tokenizer_dir = model_name_or_path
        if model is None:
            model, tokenizer_dir = lora.load_arm(
                model_name_or_path, base, device, flag="--proxy-model"
            )
        self.tokenizer = (
            tokenizer if tokenizer is not None else loading.load_tokenizer(tokenizer_dir)
        )
        self.model = model.eval().requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length
        self.__name__ = "proxy_nll"

    def encode(self, completion: str, prompt=None, finished=None) -> tuple[list[int], int]:
        """(the proxy's input ids, how many of the last are scored)."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        if eos is None:
            raise ValueError("ProxyNLLReward needs a tokenizer with an EOS token")
        start = tok.bos_token_id if tok.bos_token_id is not None else eos
        cont = tok(answers.strip_think(completion), add_special_tokens=False)["input_ids"]
        cont = list(cont[: self.max_length])
        if finished is not False or not cont:
            cont.append(eos)
        context = [start]
        if isinstance(prompt, str) and prompt:
            room = _max_length(self.model, tok) - len(cont) - 1
            context += tok(prompt, add_special_tokens=False)["input_ids"][-max(room, 0) :]
        return context + cont, len(cont)

    def __call__(self, completions: list, prompt=None, finished=None, **_) -> list[float | None]:
        n = len(completions)
        prompts, ends = prompt or [None] * n, finished or [None] * n
        seqs = [self.encode(c, p, f) for c, p, f in zip(completions, prompts, ends)]
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        device = next(self.model.parameters()).device
        out: list[float | None] = [None] * n
        # similar lengths together: less padding
        order = sorted(range(n), key=lambda i: len(seqs[i][0]))
        with torch.inference_mode():
            for s in range(0, n, self.batch_size):
                rows = order[s : s + self.batch_size]
                width = max(len(seqs[i][0]) for i in rows)
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                scored = torch.zeros((len(rows), width - 1))
                # right padding: real positions are 0..L-1 as without padding
                for r, i in enumerate(rows):
                    ids, k = seqs[i]
                    input_ids[r, : len(ids)] = torch.tensor(ids)
                    mask[r, : len(ids)] = 1
                    scored[r, len(ids) - 1 - k : len(ids) - 1] = 1.0
                logp = sampling.sequence_logprobs(
                    self.model, input_ids.to(device), mask.to(device), logits_to_keep=width - 1
                ).cpu()
                mean = (logp * scored).sum(-1) / scored.sum(-1)
                for r, i in enumerate(rows):
                    out[i] = float(mean[r])
        return out
