"""The style-Karcher pipeline of the model card Lambent/Qwen3-4B-Base-Continued-GRPO-Style-Karcher:
one adapter per domain, trained from the base by continuation GRPO against a proxy model's
likelihood (grpo.py --reward proxy_nll), then a Karcher-mean merge of the adapters
(karcher_merge.py), run twice side by side: without MARA and with it (arXiv 2510.20817, the card's
"attempted implementation" to preserve entropy), the same seed and budget.

    python scripts/style_karcher.py              # the toy: story, news, code (about 11 min)
    python scripts/style_karcher.py --dry-run    # print the commands only
    python scripts/style_karcher.py --model Qwen/Qwen3-4B-Base --data docs.jsonl \\
        --proxy HuggingFaceTB/SmolLM2-360M --max-steps 200 --out runs/style_karcher

Stages, each an algorithm file in its own process (printed before it runs):

  <arm>/<domain>   grpo.py --task continuation on the domain's documents, reward = the mean
                   log-likelihood of the continuation under the domain's proxy (the toy: the toy
                   base with the domain's shipped adapter, toy/<domain>), --beta KL to the base;
                   arm "mara" adds --mara-tau = the base's mean held-out proxy reward in that
                   domain (read from the no-MARA run: about half of each group is anchored)
  <arm>/merge      karcher_merge.py over the arm's adapters: base, each specialist, Karcher and
                   linear scored per domain (held-out NLL and perplexity, distinct-1 and pairwise
                   all-MiniLM-L6-v2 diversity of sampled continuations, each arm minus the base
                   with a 95% interval over documents or prefixes)
  lambada          eval_reasoning.py --suite likelihood: lambada (toy: toy_lambada) for the base
                   and both merged adapters

--data is a JSONL of documents {'text', 'domain'}: each domain's last --eval-size documents are
held out (or --eval-data, the same format). The tables go to <out>/style_karcher.md, the figures to
<out>/summary.json ("heldout": the mean held-out NLL over domains, base -> MARA merge).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from study import load, run_stages

import dataio  # noqa: E402  (study put the repo root on the path)
import errors  # noqa: E402

ARMS = ("no_mara", "mara")
METRICS = (("nll", "NLL"), ("distinct1", "distinct-1"), ("pairwise", "pairwise div"))


def domain_files(a, r: Path) -> dict[str, tuple[Path, Path]]:
    """{domain: (training JSONL, held-out JSONL)} written under r/data, and every domain's held-out
    documents together in r/data/heldout.jsonl (what the merges are scored on)."""
    if a.data == "toy":
        import toy

        rows = {
            d: (
                toy.documents("train", a.train_size, seed=a.seed, domains=[d]),
                toy.documents("test", a.eval_size, seed=a.seed, domains=[d]),
            )
            for d in toy.DOMAINS
        }
    else:
        train = _by_domain(dataio.load_rows(a.data, required=("text", "domain")))
        held = (
            _by_domain(dataio.load_rows(a.eval_data, required=("text", "domain")))
            if a.eval_data
            else {d: docs[-a.eval_size :] for d, docs in train.items()}
        )
        if not a.eval_data:
            train = {d: docs[: -a.eval_size] for d, docs in train.items()}
        rows = {d: (train[d], held.get(d, [])) for d in train}
        for d, (tr, he) in rows.items():
            if not tr or not he:
                raise errors.DataError(
                    f"{a.data}: domain {d!r} has {len(tr)} training and {len(he)} held-out "
                    f"documents (--eval-size {a.eval_size}); each domain needs both"
                )
    files = {}
    for d, (tr, he) in rows.items():
        paths = (r / "data" / f"{d}.train.jsonl", r / "data" / f"{d}.heldout.jsonl")
        for path, docs in zip(paths, (tr, he)):
            dataio.write_jsonl(path, [{"text": x["text"], "domain": d} for x in docs])
        files[d] = paths
    held = [{"text": x["text"], "domain": d} for d, (_, he) in rows.items() for x in he]
    dataio.write_jsonl(r / "data" / "heldout.jsonl", held)
    return files


def _by_domain(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(str(row["domain"]), []).append(row)
    return out


def proxies(a, domains) -> dict[str, str]:
    """--proxy per domain: 'auto' = toy/<domain> on the toy; 'domain=spec,...'; or one spec."""
    if a.proxy == "auto":
        if a.model != "toy":
            raise errors.ConfigError(
                "--proxy: give the proxy model (a hub id, a model dir, or 'domain=spec,...') "
                "for a model other than the toy"
            )
        return {d: f"toy/{d}" for d in domains}
    if "=" not in a.proxy:
        return dict.fromkeys(domains, a.proxy)
    parts = [part.partition("=") for part in a.proxy.split(",")]
    if not all(eq and name for name, eq, _ in parts):
        raise errors.ConfigError(f"--proxy {a.proxy}: expected one spec, or 'domain=spec,...'")
    given = {name: spec for name, _, spec in parts}
    missing = [d for d in domains if d not in given]
    if missing:
        raise errors.ConfigError(f"--proxy {a.proxy}: no proxy for domain(s) {missing}")
    return {d: given[d] for d in domains}


def grpo_stage(a, d: str, files, proxy: str, extra: list[str]) -> list[str]:
    train, held = files[d]
    return [
        "grpo.py",
        *("--model", a.model, "--task", "continuation", "--data", str(train)),
        *("--eval-data", str(held), "--eval-size", str(a.grpo_eval_size)),
        *("--reward", "proxy_nll", "--proxy-model", proxy),
        *("--max-steps", str(a.max_steps), "--beta", str(a.beta), "--lr", str(a.lr)),
        *("--temperature", str(a.temperature), "--seed", str(a.seed), *a.grpo_flags.split()),
        *extra,
    ]


def merge_stage(a, r: Path, arm: str, files) -> list[str]:
    heldout = str(r / "data" / "heldout.jsonl")
    return [
        "karcher_merge.py",
        *("--base", a.model, "--adapters", *(str(r / arm / d) for d in files)),
        *("--eval-data", heldout, "--prompts", str(a.prompts), "--samples", str(a.samples)),
        *("--max-new-tokens", str(a.max_new_tokens), "--seed", str(a.seed)),
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="toy", help="the base: hub id, model dir, or toy")
    p.add_argument("--data", default="toy", help="JSONL documents {'text', 'domain'}, or toy")
    p.add_argument("--eval-data", default="", help="held-out JSONL {'text', 'domain'}")
    p.add_argument("--proxy", default="auto", help="proxy model: one spec or 'domain=spec,...'")
    p.add_argument("--max-steps", type=int, default=40, help="GRPO steps per domain")
    p.add_argument("--beta", type=float, default=0.04, help="KL to the base (MARA needs > 0)")
    p.add_argument("--lr", type=float, default=3e-4, help="GRPO's learning rate (toy: grpo.py's)")
    p.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature")
    p.add_argument(
        "--grpo-flags", default="", help="more grpo.py flags: --grpo-flags='--batch-size 4'"
    )
    p.add_argument("--train-size", type=int, default=1000, help="toy training documents/domain")
    p.add_argument("--eval-size", type=int, default=100, help="held-out documents per domain")
    p.add_argument("--grpo-eval-size", type=int, default=32, help="grpo.py's held-out prefixes")
    p.add_argument("--prompts", type=int, default=16, help="prefixes per domain for diversity")
    p.add_argument("--samples", type=int, default=4, help="samples per prefix")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of those samples")
    p.add_argument(
        "--likelihood-tasks", default="auto", help="auto (lambada), none, or eval_reasoning's"
    )
    p.add_argument("--likelihood-data", default="", help="eval_reasoning.py --data for them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/style_karcher")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    r = Path(a.out)
    files = domain_files(a, r)
    proxy = proxies(a, list(files))
    total = 2 * len(files) + len(ARMS) + (a.likelihood_tasks != "none")
    first = [(f"no_mara/{d}", grpo_stage(a, d, files, proxy[d], [])) for d in files]
    # each stage's wall time on the toy, 2-core CPU: the estimate printed as it starts
    usual = {f"{arm}/{d}": 70 for arm in ARMS for d in files} | {"lambada": 12}
    usual |= {f"{arm}/merge": 72 for arm in ARMS}
    walls = run_stages(first, r, a.dry_run, "style_karcher", total=total, seconds=usual)
    # MARA's threshold: the base's mean held-out proxy reward in the domain
    tau = {d: load(r / "no_mara" / d)["heldout"]["before"] if not a.dry_run else 0.0 for d in files}
    mara = [
        (f"mara/{d}", grpo_stage(a, d, files, proxy[d], ["--mara-tau", f"{tau[d]:.4f}"]))
        for d in files
    ]
    merges = [(f"{arm}/merge", merge_stage(a, r, arm, files)) for arm in ARMS]
    tasks = a.likelihood_tasks
    if tasks == "auto":
        tasks = "toy_lambada" if a.model == "toy" else "lambada_openai"
    lam = []
    if tasks != "none":
        arms = ",".join(["base=", *(f"{arm}={r / arm / 'merge'}" for arm in ARMS)])
        flags = ["--model", a.model, "--arms", arms, "--likelihood-tasks", tasks]
        if a.likelihood_data:
            flags += ["--data", a.likelihood_data]
        lam = [("lambada", ["eval_reasoning.py", "--suite", "likelihood", *flags])]
    rest = mara + merges + lam
    walls.update(run_stages(rest, r, a.dry_run, "style_karcher", len(first), total, usual))
    if a.dry_run:
        return {}
    summary = results(r, list(files), tau, tasks, walls)
    dataio.atomic_write_json(r / "summary.json", summary)
    text = tables(summary)
    dataio.atomic_write_text(r / "style_karcher.md", text + "\n")
    print("\n" + text, flush=True)
    return summary


def results(r: Path, domains: list[str], tau: dict, tasks: str, walls: dict) -> dict:
    """summary.json: per arm and domain the scored rows and their differences to the base."""
    table, step_share = {}, {}
    for arm in ARMS:
        s = load(r / arm / "merge")
        table[arm] = {"eval": s["eval"], "vs_base": s["vs_base"]}
        for d in domains:
            rows = dataio.read_jsonl(r / arm / d / "metrics.jsonl")
            steps = [x for x in rows if "timing/reward" in x]
            step_share[f"{arm}/{d}"] = {
                "reward_s": statistics.median(x["timing/reward"] for x in steps),
                "step_s": statistics.median(x["step_time"] for x in steps),
            }
    rows = {x["arm"]: x for x in table["mara"]["eval"]}
    nll = {arm: statistics.fmean(rows[arm][f"{d}/nll"] for d in domains) for arm in rows}
    rows_no = {x["arm"]: x for x in table["no_mara"]["eval"]}
    out = {
        "method": "style_karcher",
        "domains": domains,
        "heldout": {"metric": "nll", "before": nll["base"], "after": nll["karcher"]},
        "heldout_no_mara": statistics.fmean(rows_no["karcher"][f"{d}/nll"] for d in domains),
        "mara_tau": tau,
        "table": table,
        "proxy_cost": step_share,
        "wall_seconds": walls,
    }
    if tasks != "none":
        out["likelihood"] = load(r / "lambada")["likelihood"]
    return out


def fmt_diff(v: dict) -> str:
    """'+0.0012 [+0.0007, +0.0017]'; a single unit has no interval (null in JSON)."""
    lo, hi = v["interval"]
    spread = "no interval: one unit" if lo is None else f"{lo:+.4f}, {hi:+.4f}"
    return f"{v['diff']:+.4f} [{spread}]"


def tables(s: dict) -> str:
    """The card's table per domain: base, the specialists, Karcher and linear, without and with
    MARA; each figure with the arm minus base and its 95% interval."""
    out = []
    for d in s["domains"]:
        rows = []
        for arm in ARMS:
            t = s["table"][arm]
            for row in t["eval"]:
                name = row["arm"]
                if (name == "base" and arm == "mara") or name == "karcher adapter":
                    continue  # the same model scored again; Karcher without its (c0 - 1) W0
                diff = t["vs_base"].get(name, {}).get(d, {})
                line = {"arm": name if name == "base" else f"{name} ({arm})"}
                line["NLL"], line["ppl"] = round(row[f"{d}/nll"], 4), round(row[f"{d}/ppl"], 3)
                for key, label in METRICS:
                    if key != "nll" and f"{d}/{key}" in row:
                        line[label] = round(row[f"{d}/{key}"], 3)
                    if key in diff:
                        line[f"{label} - base"] = fmt_diff(diff[key])
                rows.append(line)
        out.append(f"### {d}\n\n{dataio.markdown_table(rows)}\n")
    h = s["heldout"]
    out.append(
        f"Mean held-out NLL over domains: base {h['before']:.4f}, Karcher merge without MARA "
        f"{s['heldout_no_mara']:.4f}, with MARA {h['after']:.4f}."
    )
    cost = s["proxy_cost"]
    share = statistics.fmean(c["reward_s"] / c["step_s"] for c in cost.values())
    out.append(
        f"The proxy reward's share of a GRPO step (median per run, mean of runs): {share:.0%}."
    )
    if "likelihood" in s:
        lines = [
            f"{arm}: {task} acc {v['acc']:.3f}, perplexity {v['perplexity']:.3f}"
            for arm, by_task in s["likelihood"].items()
            for task, v in by_task.items()
        ]
        out.append("Likelihood diagnostic:\n\n" + "\n".join(f"- {x}" for x in lines))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
