"""karcher_merge.py against MergeKit's `karcher` method on the same dense toy models: the largest
difference per tensor.

The inputs are the toy base with each shipped domain adapter (toy/story, toy/news, toy/code) merged
in, saved as three full fp32 models. MergeKit (`mergekit-yaml`, merge_method karcher, max_iter 10,
tol 1e-5, dtype float32) merges them; so do

- ours, dense: `karcher_merge.py --models m1 m2 m3` (the same algorithm on the same dense tensors,
  in float64);
- ours, factor space: `karcher_merge.py --adapters toy/story toy/news toy/code --output model` (the
  Gram-matrix
  iteration on the adapters' factors; no dense copy of the models is ever built).

Per tensor: max |ours - MergeKit| / max |MergeKit|; the report gives the largest over all tensors,
and the tensor. Tensors no adapter touches (embeddings, norms) are the same in every input and must
come back unchanged.

    pip install mergekit                 # a benchmark / test-only oracle
    python bench/karcher_vs_mergekit.py  # writes bench_results/karcher_vs_mergekit.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lora  # noqa: E402
import toy  # noqa: E402


def dense_models(tmp: Path) -> list[Path]:
    """The toy base with each domain adapter merged in, saved as full models."""
    out = []
    for ad in toy.domain_adapter_dirs():
        model = lora.merge(lora.load_adapter(toy.load_model(), str(ad)))
        path = tmp / f"dense_{ad.name}"
        model.save_pretrained(path)
        toy.load_tokenizer().save_pretrained(path)
        out.append(path)
    return out


def mergekit(models: list[Path], out: Path, max_iter: int, tol: float) -> float:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(exe).exists():
        sys.exit(
            "error: mergekit-yaml not found; `pip install mergekit` (a benchmark / test-only "
            "oracle)"
        )
    cfg = out.parent / "mergekit.yml"
    cfg.write_text(
        "models:\n"
        + "".join(f"  - model: {m}\n" for m in models)
        + f"merge_method: karcher\nparameters:\n  max_iter: {max_iter}\n  tol: {tol}\ndtype: "
        "float32\n"
    )
    t0 = time.perf_counter()
    subprocess.run([exe, str(cfg), str(out), "--lazy-unpickle"], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def ours(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "karcher_merge.py", "--no-eval", *argv], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a: dict, ref: dict) -> dict:
    """max |a - ref| / max |ref| per tensor (tied copies such as lm_head.weight may be absent on one
    side)."""
    rel = {}
    for k in sorted(ref.keys() & a.keys()):
        r = ref[k].double()
        rel[k] = float((a[k].double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
    worst = max(rel, key=rel.get)
    return {
        "tensors": len(rel),
        "missing": sorted(ref.keys() ^ a.keys()),
        "max_rel": rel[worst],
        "worst": worst,
        "median_rel": sorted(rel.values())[len(rel) // 2],
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=str(ROOT / "bench_results"), help="where karcher_vs_mergekit.json goes"
    )
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = dense_models(tmp)
        t_mk = mergekit(models, tmp / "mergekit", a.max_iter, a.tol)
        common = ["--max-iter", str(a.max_iter), "--tol", str(a.tol)]
        t_dense = ours(["--models", *map(str, models), "--out", str(tmp / "dense"), *common])
        t_factor = ours(
            [
                "--adapters",
                *map(str, toy.domain_adapter_dirs()),
                "--output",
                "model",
                "--out",
                str(tmp / "factor"),
                *common,
            ]
        )
        ref = tensors(tmp / "mergekit")
        report = {
            "inputs": [d.name for d in toy.domain_adapter_dirs()],
            "max_iter": a.max_iter,
            "tol": a.tol,
            "dense_vs_mergekit": compare(tensors(tmp / "dense" / "model"), ref),
            "factor_vs_mergekit": compare(tensors(tmp / "factor" / "model"), ref),
            "seconds": {"mergekit": t_mk, "ours_dense": t_dense, "ours_factor": t_factor},
            "torch": torch.__version__,
        }
        try:
            from importlib.metadata import version

            report["mergekit"] = version("mergekit")
        except Exception:  # noqa: BLE001
            pass
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "karcher_vs_mergekit.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
