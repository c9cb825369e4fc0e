"""The life of a training run, shared by every trainer: start (seed, device, run directory),
evaluate before training or resume from a checkpoint, the optimizer step, metrics, atomic
checkpoints, and the finish (summary.json and the results table)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import lora
import plots
import sampling
from cli import check_flags
from dataio import (
    append_jsonl,
    atomic_write_json,
    disk_errors,
    epoch_indices,
    markdown_table,
    write_jsonl,
)
from distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_parameters,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    is_main,
    max_param_difference_across_ranks,
    pick_device,
)
from errors import ConfigError, DataError, NonFiniteError
from stats import paired_interval


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v.item() if isinstance(v, np.generic) else v


class MetricsLogger:
    """metrics.jsonl rows {"step", name: value} on rank 0, mirrored to wandb / trackio when asked
    for. The file is strict JSON: a NaN or infinite metric is written as null (trackers get the
    float itself)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        report_to: str | list[str] | None = None,
        project: str = "post-training",
        run_name: str | None = None,
        config: dict | None = None,
    ):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = is_main()
        targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
        self.backends = []
        for name in [t for t in targets if t not in ("none", "")] if self.enabled else []:
            if name not in ("wandb", "trackio"):
                raise ConfigError(
                    f"--report-to: unknown tracker {name!r} (choose wandb, trackio or none)"
                )
            try:
                module = __import__(name)
            except ImportError:
                raise ConfigError(
                    f"--report-to {name}: needs the {name} package: pip install {name}"
                ) from None
            module.init(project=project, name=run_name, config=config)
            self.backends.append(module)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in metrics.items()}
        append_jsonl(self.path, {"step": step, **row})
        for module in self.backends:
            module.log(row, step=step)

    def close(self) -> None:
        for module in self.backends:
            module.finish()


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        # numpy's key array as a tensor, so the file loads with torch.load(weights_only=True)
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: str | os.PathLike, step: int, model, optimizer, scheduler=None, data_state: Any = None
) -> Path:
    """Save trainable weights, optimiser, scheduler, RNG and position to out_dir/checkpoint; call on
    every rank.

    Crash safety: everything goes to checkpoint.tmp; then checkpoint -> checkpoint.old, tmp ->
    checkpoint, and .old is deleted. At every instant either checkpoint or checkpoint.old is
    complete (load_checkpoint tries both).
    """
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    rank = dist.get_rank() if is_distributed() else 0
    with disk_errors(final):
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
            tmp.mkdir(parents=True)
        barrier()
        torch.save(
            _rng_state(), tmp / f"rng_rank{rank}.pt"
        )  # each rank has its own sampling / dropout streams
        if is_main():
            trainable = {
                n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad
            }
            torch.save(trainable, tmp / "trainable.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        barrier()
        if is_main():
            # state.json last: its presence marks a complete checkpoint
            atomic_write_json(
                tmp / "state.json",
                {
                    "step": step,
                    "data_state": data_state,
                    "world_size": dist.get_world_size() if is_distributed() else 1,
                },
            )
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _load_part(ckpt: Path, name: str):
    """One file of a checkpoint; a truncated or unreadable one is a DataError naming it."""
    try:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a torn zip or pickle
        raise DataError(
            f"{ckpt / name}: truncated or not a checkpoint file ({type(e).__name__}); start again "
            f"without --resume (or remove {ckpt.name} to resume from a checkpoint.old beside it)"
        ) from None


def load_checkpoint(
    out_dir: str | os.PathLike, model, optimizer=None, scheduler=None
) -> dict | None:
    """Restore what save_checkpoint wrote; returns {"step", "data_state"} or None when there is
    none.

    Also trims out_dir/metrics.jsonl and samples.jsonl to rows with "step" up to the restored step,
    so a resumed run logs each step once.
    """
    out_dir = Path(out_dir)
    ckpt = next(
        (
            d
            for d in (out_dir / "checkpoint", out_dir / "checkpoint.old")
            if (d / "state.json").is_file()
        ),
        None,
    )
    if ckpt is None:
        return None
    state = json.loads((ckpt / "state.json").read_text())
    saved = _load_part(ckpt, "trainable.pt")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise ConfigError(
            f"{ckpt}: checkpoint does not match the model: missing {missing[:5]}, unknown "
            f"{unknown[:5]}"
        )
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise ConfigError(
                    f"{ckpt}: {name}: shape {tuple(value.shape)} != model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(_load_part(ckpt, "optimizer.pt"))
    if scheduler is not None and (ckpt / "scheduler.pt").is_file():
        scheduler.load_state_dict(_load_part(ckpt, "scheduler.pt"))
    for log in (out_dir / "metrics.jsonl", out_dir / "samples.jsonl"):
        if is_main() and log.is_file():
            # rows logged after this checkpoint will be logged again; a torn last line (killed
            # mid-write) goes too
            rows = []
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            write_jsonl(
                log,
                [
                    r
                    for r in rows
                    if not isinstance(r, dict)
                    or not isinstance(r.get("step"), int)
                    or r["step"] <= state["step"]
                ],
            )
    rank = dist.get_rank() if is_distributed() else 0
    rng_file = f"rng_rank{rank}.pt" if (ckpt / f"rng_rank{rank}.pt").is_file() else "rng_rank0.pt"
    _set_rng_state(_load_part(ckpt, rng_file))
    return {"step": state["step"], "data_state": state["data_state"]}


def prepare_out_dir(out: str | os.PathLike, args: Any = None, resume: bool = False) -> Path:
    """Create the run directory and record the arguments in args.json (rank 0).

    A fresh run (resume=False) removes the logs and checkpoint an earlier run left there, so
    metrics.jsonl and samples.jsonl never mix two runs; with resume=True they stay for
    load_checkpoint and the appends.
    """
    out = Path(out)
    if is_main():
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: a file is there, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write_test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write there ({e.strerror})") from None
        if not resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            (out / "samples.jsonl").unlink(missing_ok=True)
            for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
                shutil.rmtree(out / name, ignore_errors=True)
        if args is not None:
            atomic_write_json(out / "args.json", args)  # a dataclass is written as its fields
    barrier()
    return out


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warmup to the peak LR, then cosine decay to min_ratio * peak at total_steps
    (Loshchilov & Hutter)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_mb(device: str | torch.device | None = None) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU device, else the peak resident set
    size."""
    device = torch.device(device) if device is not None else None
    on_cuda = (
        device.type == "cuda"
        if device is not None
        else torch.cuda.is_available() and torch.cuda.is_initialized()
    )
    if on_cuda:
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    )  # bytes on macOS, KiB on Linux


@dataclass
class Run:
    """Where a run is: this process's rank, the world size, its device, the run directory, the start
    time."""

    rank: int
    world: int
    device: torch.device
    out: Path
    t_start: float
    logger: MetricsLogger | None = None
    bar: tqdm | None = None  # the progress bar of training_steps

    def log(self, step: int, metrics: dict) -> None:
        """One row of metrics.jsonl (rank 0), mirrored to the trackers of --report-to."""
        self.logger.log(step, metrics)


def start_run(args: Any, resume: bool = False, report_to: str = "") -> Run:
    """The start of every script, before anything loads: check the flags (cli.check_flags) and
    that every --init-adapter is there, join torchrun's group (if launched by it), seed everything
    from --seed, pick this rank's --device, prepare the run directory --out (args.json; a fresh
    run clears the old logs and checkpoint)."""
    t_start = time.perf_counter()
    check_flags(args)
    for adapter in filter(None, args.init_adapter.split("+")):
        lora.require_adapter(adapter, "--init-adapter", "Pass directories a script wrote (--out).")
    rank, world, local_rank = init_distributed()
    set_seed(args.seed)
    dev = pick_device(args.device, local_rank)
    return Run(
        rank=rank,
        world=world,
        device=dev,
        out=prepare_out_dir(args.out, args, resume=resume),
        t_start=t_start,
        logger=MetricsLogger(args.out, report_to=report_to or None),
    )


def log_samples(run: Run, step: int, samples: list[dict], split: str = "train") -> None:
    """Rollouts one can read: each sample as a row of samples.jsonl, tagged with the split and the
    step (rank 0 only)."""
    if is_main():
        for s in samples:
            append_jsonl(run.out / "samples.jsonl", {"split": split, "step": step, **s})


def log_eval(run: Run, logger: "MetricsLogger", step: int, stage: str, metrics: dict) -> dict:
    """Log held-out metrics as eval/<name> at `step`; the `_samples` they carry go to
    samples.jsonl; their `_units` (per prompt: {metric: values}) are returned, not logged."""
    samples = metrics.pop("_samples", [])
    if is_main():
        for s in samples:
            append_jsonl(
                run.out / "samples.jsonl", {"split": "heldout", "stage": stage, "step": step, **s}
            )
        logger.log(step, {f"eval/{k}": v for k, v in metrics.items() if not k.startswith("_")})
    return metrics


def adamw(params, args, weight_decay: float = 0.0) -> "OptimizerStep":
    """AdamW over `params` with the optimizer flags every trainer shares (cli.TrainArgs): peak
    --lr, a linear warmup over --warmup-ratio x --max-steps, then cosine decay to --min-lr-ratio x
    lr, clipping at --max-grad-norm. Every rank starts from rank 0's values of `params` (a fresh
    LoRA is random)."""
    params = list(params)
    broadcast_parameters(params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=weight_decay)
    warmup = int(args.warmup_ratio * args.max_steps)
    scheduler = cosine_schedule(optimizer, warmup, args.max_steps, min_ratio=args.min_lr_ratio)
    return OptimizerStep(params, optimizer, scheduler, args.max_grad_norm)


def begin_training(run: Run, model, opt: "OptimizerStep", evaluate, resume: bool):
    """(first step, state). With --resume the run continues from its checkpoint, whose state keeps
    the held-out metrics measured before training ("before"); a fresh run measures them now, at
    step 0 (rank 0). `state` is what the checkpoints carry; a script adds its own counters."""
    ckpt = load_checkpoint(run.out, model, opt.optimizer, opt.scheduler) if resume else None
    if ckpt is not None:
        state = dict(ckpt["data_state"] or {})
        opt.load_state_dict(state)
        return ckpt["step"], state
    before = log_eval(run, run.logger, 0, "before", evaluate()) if is_main() else None
    return 0, {"before": before}


def step_batch(run: Run, rows: list, args, index: int) -> tuple[list, torch.Generator]:
    """Batch `index` on this rank: its share of the --batch-size x world rows of the seeded epoch
    (dataio.epoch_indices; the ranks' rows disjoint), and the generator that samples it, seeded by
    (--seed, index, rank) so that a resumed run draws the same."""
    world_batch = args.batch_size * run.world
    indices = epoch_indices(len(rows), world_batch, index, args.seed, run.rank, run.world)
    generator = sampling.step_generator(args.seed, index, run.rank, run.world, run.device)
    return [rows[i] for i in indices], generator


def training_steps(run: Run, start: int, args, desc: str) -> tqdm:
    """The steps still to run, from `start` (a resumed run's first step) to --max-steps, as a
    progress bar shown on rank 0 only; end_step writes each step's metrics into it."""
    run.bar = tqdm(
        range(start, args.max_steps),
        initial=start,
        total=args.max_steps,
        desc=desc,
        disable=not is_main(),
    )
    return run.bar


def end_step(
    run: Run,
    step: int,
    metrics: dict,
    model,
    opt: "OptimizerStep",
    state: dict,
    args,
    *,
    show: dict[str, str] | None = None,
    evaluate=None,
    can_save: bool = True,
) -> None:
    """The tail of every training step (`step` counts from 1):

    - every --eval-every steps but the last (which the finish evaluates), `evaluate()`'s held-out
      metrics join `metrics` as eval/<name> (rank 0);
    - the metrics named in `show` ({name: format spec}) go to the progress bar;
    - `metrics` become a row of metrics.jsonl;
    - every --save-every steps but the last (which saves the adapter instead), an atomic checkpoint
      carrying `state`. Never inside a run of non-finite steps, so the last checkpoint is a good
      one; `can_save` False defers it (e.g. in the middle of a generation batch)."""
    if evaluate is not None and is_main() and evaluation_due(step, args.eval_every, args.max_steps):
        metrics.update({f"eval/{k}": v for k, v in evaluate().items() if not k.startswith("_")})
    if show and run.bar is not None:
        shown = {
            k.rsplit("/", 1)[-1]: format(metrics[k], f) for k, f in show.items() if k in metrics
        }
        run.bar.set_postfix(shown)
    run.log(step, metrics)
    due = args.save_every and step % args.save_every == 0 and step < args.max_steps
    if due and can_save and opt.streak == 0:
        save_checkpoint(
            run.out, step, model, opt.optimizer, opt.scheduler, {**state, **opt.state_dict()}
        )


def evaluation_due(step: int, every: int, max_steps: int) -> bool:
    """Whether step `step` (1-based) ends with a held-out evaluation: every `every` steps (0 =
    never), except the last, which the finish evaluates anyway."""
    return bool(every) and step % every == 0 and step < max_steps


def finish_training(
    run: Run,
    args,
    model,
    tokenizer,
    opt: "OptimizerStep",
    state: dict,
    last: dict,
    train_seconds: float,
    *,
    evaluate,
    report,
    full: bool = False,
    merged: bool = False,
) -> dict:
    """The end of a trainer, on every rank:

    1. rank 0 saves the trained weights (lora.save_trained's `full` and `merged`), first, so a
       final evaluation that fails (a judge that went away) loses no training;
    2. the ranks' trained parameters are compared (they must match: the same start, the same
       averaged gradients);
    3. on rank 0, `evaluate()` (None: none) is logged as the held-out metrics after training, and
       `report(after)` gives the method's fields of summary.json and its results table; every
       run's fields are added (the held-out metrics before and after, the last step's metrics, the
       train time, tokens, skipped steps, the flags) and summary.json written; when the
       evaluation gives each prompt's value of the held-out metric ("_units"), "heldout" gets
       after - before ("diff") with its paired 95% interval ("diff_interval");
    4. on rank 0, the run's curves are drawn to curves.png (plots.training_curves).

    Returns the summary on rank 0, {} elsewhere; the last call of a trainer."""
    if is_main():
        lora.save_trained(model, tokenizer, run.out, args.model, merged=merged, full=full)
    rank_diff = max_param_difference_across_ranks(opt.params)
    summary = {}
    if is_main():
        after = None if evaluate is None else evaluate()
        if after is not None:
            after = log_eval(run, run.logger, args.max_steps, "after", after)
        fields, table = report(after)
        before = dict(state.get("before") or {})
        units = (before.pop("_units", None), (after or {}).pop("_units", None))
        heldout = fields.get("heldout") or {}
        paired = [u.get(heldout.get("metric")) if u else None for u in units]
        if paired[0] and paired[1] and len(paired[0]) == len(paired[1]):
            diff, _, interval = paired_interval(*paired, span=math.inf)
            heldout.update(diff=diff, diff_interval=interval, units=len(paired[0]))
        summary = {
            **fields,
            "init_adapter": args.init_adapter or None,
            "before": before,
            "after": after,
            "final": last,
            "train_seconds": train_seconds,
            "num_tokens": state.get("tokens_seen"),
            "skipped_steps": opt.skipped,
            "rank_param_max_diff": rank_diff,
            "args": dataclasses.asdict(args),
        }
        summary = finish_run(run, summary, table)
        plots.training_curves(run.out, summary)
    end_run(run)
    return summary


def end_run(run: Run) -> None:
    """Close the trackers and leave torchrun's group: the last call of every rank."""
    run.logger.close()
    cleanup_distributed()


class OptimizerStep:
    """The end of every training step: average gradients over ranks, clip, check they are finite,
    step.

    A non-finite loss or gradient norm skips the update (gradients dropped, optimizer untouched, LR
    schedule advanced so it stays a function of the step) and is counted in `skipped`;
    `max_bad_steps` of them in a row raise NonFiniteError. A caller that checkpoints only after good
    steps keeps its last good checkpoint."""

    def __init__(
        self, params, optimizer, scheduler=None, max_grad_norm: float = 1.0, max_bad_steps: int = 3
    ):
        self.params, self.optimizer, self.scheduler = list(params), optimizer, scheduler
        self.max_grad_norm, self.max_bad_steps = max_grad_norm, max_bad_steps
        self.skipped, self.streak = 0, 0

    def __call__(self, loss: float, step: int | None = None) -> dict:
        for p in (
            self.params
        ):  # a parameter no row reached: a zero gradient, so Adam's moments step as they would
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_gradients(self.params)
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        bad = float(not (math.isfinite(loss) and math.isfinite(grad_norm)))
        ok = all_reduce_sum(bad) == 0  # every rank takes the same decision
        if ok:
            self.optimizer.step()
            self.streak = 0
        else:
            self.skipped += 1
            self.streak += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.streak >= self.max_bad_steps:
            where = f" (up to step {step})" if step is not None else ""
            raise NonFiniteError(
                f"loss or gradient not finite on {self.streak} steps in a row{where}: the run "
                "stops; "
                f"the last checkpoint is intact. Lower --lr or check the data, then --resume."
            )
        return {"grad_norm": grad_norm, "skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))


def finish_run(run: Run, summary: dict, table: dict | None = None) -> dict:
    """Write summary.json atomically (with wall time and peak memory) and print the run's results
    table."""

    summary = {
        **summary,
        "wall_seconds": time.perf_counter() - run.t_start,
        "peak_memory_mb": peak_memory_mb(run.device),
        "world_size": run.world,
    }
    atomic_write_json(run.out / "summary.json", summary)
    if table:
        print("\n" + markdown_table([table]), flush=True)
    return summary
