"""Worker of tests/test_distributed.py: data-parallel optimiser steps with distributed.py's helpers.

torchrun --nproc_per_node 2 tests/_dist_worker.py OUT_DIR  writes OUT_DIR/rank{r}.pt; train() also
runs alone.
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import tiny_qwen3  # noqa: E402

import distributed  # noqa: E402
import lifecycle  # noqa: E402

GLOBAL_BATCH, STEPS, SEQ = 4, 3, 12
HAVE_LORA = importlib.util.find_spec("lora") is not None


def build(use_lora: bool):
    model = tiny_qwen3(vocab_size=64, seed=0)  # train() switches it to training mode
    if not use_lora:
        return model, list(model.parameters())
    import lora

    lora.add_lora(model, r=4, alpha=8)
    return model, lora.lora_parameters(model)


def train(rank: int, world: int, use_lora: bool):
    """STEPS AdamW steps on a fixed global batch; each rank takes rows rank::world of it."""
    model, params = build(use_lora)
    if rank != 0:  # start the other ranks from different values: broadcast_parameters must fix that
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
    distributed.broadcast_parameters(params)
    data = torch.randint(
        0, 64, (STEPS * GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1)
    )
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(STEPS):
        batch = data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH][rank::world]
        # equal-length rows: the mean of the per-rank means is the global-batch mean
        model(batch, labels=batch).loss.backward()
        distributed.all_reduce_gradients(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    names = {id(p): n for n, p in model.named_parameters()}
    return model, opt, {names[id(p)]: p.detach().clone() for p in params}


def main(out: Path):
    rank, world, _ = distributed.init_distributed()
    results = {"world": world, "plain": train(rank, world, False)[2]}
    if HAVE_LORA:
        model, opt, results["lora"] = train(rank, world, True)
    else:
        model, opt, _ = train(rank, world, False)
    results["sum_of_ranks"] = distributed.all_reduce_sum(rank)
    results["sum_tensor"] = distributed.all_reduce_sum(torch.tensor([float(rank)]))
    lifecycle.MetricsLogger(out).log(1, {"rank": rank})  # rank 0 only
    lifecycle.save_checkpoint(out, STEPS, model, opt, data_state={"rank": rank})
    results["loaded"] = lifecycle.load_checkpoint(out, model, opt)
    torch.save(results, out / f"rank{rank}.pt")
    distributed.barrier()
    distributed.cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
