"""Peak memory of this process for the benchmarks: CUDA max allocated on a GPU, else the peak
resident set size."""

from pathlib import Path


def vm(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS now, VmHWM peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return vm("VmHWM")
