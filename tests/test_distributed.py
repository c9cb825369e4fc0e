"""torchrun --nproc_per_node 2 (gloo, CPU): distributed.py's hand-written data parallelism equals
one process."""

import importlib.util

import torch
from conftest import ROOT, free_port, run_script

WORKER = ROOT / "tests" / "_dist_worker.py"


def _worker_module():
    spec = importlib.util.spec_from_file_location("_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ranks_match_one_process(tmp_path):
    run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
        WORKER,
        tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["sum_of_ranks"] == r1["sum_of_ranks"] == 1
    assert r0["sum_tensor"].item() == r1["sum_tensor"].item() == 1.0

    worker = _worker_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the single-threaded workers
    worst = 0.0
    try:
        kinds = ["plain"] + (["lora"] if worker.HAVE_LORA else [])
        for kind in kinds:
            single = worker.train(0, 1, kind == "lora")[2]
            initial = worker.build(kind == "lora")[0].state_dict()
            assert r0[kind].keys() == r1[kind].keys() == single.keys()
            for name, p in single.items():
                assert torch.equal(r0[kind][name], r1[kind][name]), f"{kind} {name}: ranks differ"
                diff = (r0[kind][name] - p).abs().max().item()
                assert diff <= 1e-6, f"{kind} {name}: 2 ranks vs 1 process differ by {diff}"
                worst = max(worst, diff)
                assert not torch.equal(p, initial[name]), f"{kind} {name} did not train"
    finally:
        torch.set_num_threads(threads)
    print(f"max |2 ranks - 1 process| over {kinds}: {worst:.3g}")

    # rank-0-only logging; per-rank RNG streams in the checkpoint; every rank loads it
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} >= {
        "rng_rank0.pt",
        "rng_rank1.pt",
        "state.json",
    }
    assert r0["loaded"] == r1["loaded"] == {"step": worker.STEPS, "data_state": {"rank": 0}}
