"""torchrun by hand: data parallelism as an all-reduce of the trainable gradients, no DDP wrapper
around the model. Every helper is a no-op in a single process."""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist

from errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the torchrun group (nccl on CUDA, gloo on CPU) when
    launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not is_distributed():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_main() -> bool:
    """True on rank 0, and in a single process: the rank that writes files and prints."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group at the end of a torchrun script."""
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average .grad of trainable params over ranks: g <- (1/W) sum_r g_r, as DDP does.

    The gradients are flattened into one buffer per dtype (one collective instead of one per
    tensor). A missing grad counts as zero, so every rank issues the same collectives.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    groups: dict[tuple, list] = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


def broadcast_parameters(params: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank src's values into every rank (start from identical weights, e.g. freshly
    initialised LoRA)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def max_param_difference_across_ranks(params: Iterable[torch.Tensor]) -> float:
    """max |p - p on rank 0| over the parameters, summed over ranks: 0.0 when every rank holds the
    same weights."""
    if not is_distributed():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    first = flat.clone()
    dist.broadcast(first, src=0)
    return float(all_reduce_sum((flat - first).abs().max().cpu()))


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def global_std(x: torch.Tensor) -> torch.Tensor:
    """The standard deviation (Bessel-corrected) of the values of `x` on every rank together."""
    s = all_reduce_sum(torch.tensor([x.sum(), (x * x).sum(), x.numel()], dtype=torch.float64))
    return torch.sqrt((s[1] - s[0] ** 2 / s[2]) / (s[2] - 1).clamp(min=1)).float()


def all_reduce_sum(x):
    """Sum of a number or tensor over ranks (e.g. token counts for a global normaliser); identity
    alone."""
    if not is_distributed():
        return x
    t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    device = t.device
    t = t.to(_comm_device())  # nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if isinstance(x, torch.Tensor):
        return t.to(device)
    return int(t.item()) if isinstance(x, int) else t.item()


def pick_device(
    device: str | torch.device | None = "auto", local_rank: int | None = None
) -> torch.device:
    """ "auto"/None: this rank's GPU when CUDA is present (local_rank, default $LOCAL_RANK), else
    the CPU.

    A CUDA device with an index also becomes the current device: Triton kernels (vocab_kernels/) and
    any allocation without an explicit device go to the current one, so `--device cuda:1` must make
    it current."""
    if device is None or str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device("cuda", rank)
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this machine has no CUDA device (use cpu)")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s)")
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available():
        torch.cuda.set_device(dev)
    return dev
