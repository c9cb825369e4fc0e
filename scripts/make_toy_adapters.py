"""Rebuild the adapters shipped with the toy world, from which default runs start.

    python scripts/make_toy_adapters.py            # all of them (a few minutes each on 2 CPU cores)
    python scripts/make_toy_adapters.py sft_think  # one

Each is the output of one documented command of this repo, run with its defaults: the adapter files
are copied into toy/<name>/ with `made_by.json` (the command and the held-out metric it reached).
The test `test_shipped_sft_adapter_is_what_the_default_command_makes` checks that the command still
makes it: the same weights on the same kind of CPU (`cpu_capability`), the same held-out accuracy on
any.

- toy/sft_think: `python sft_think.py` (thinking SFT on toy arithmetic levels 1-3); `grpo.py` starts
  from it.
- toy/sft_instruct: `python sft_think.py --data toy-instructions --max-steps 300` (thinking SFT on
  toy
  instructions); `rlmt.py` starts from it.
- toy/sft_formats: `python sft_think.py --toy-styles gsm8k,math,mc` (the same, over the three answer
  formats);
  an arm of `eval_reasoning.py`'s toy benchmarks.
- toy/story, toy/news, toy/code: `python sft_think.py --data toy-documents --toy-domains <domain>
  --max-steps 200 --batch-size 8 --micro-batch-size 8 --max-length 1024` (language-model SFT on one
  domain's documents, every token in the loss); `karcher_merge.py` merges them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dataio  # noqa: E402

ADAPTERS = {
    "sft_think": ["sft_think.py"],
    "sft_instruct": ["sft_think.py", "--data", "toy-instructions", "--max-steps", "300"],
    "sft_formats": ["sft_think.py", "--toy-styles", "gsm8k,math,mc"],
    **{
        d: [
            "sft_think.py",
            "--data",
            "toy-documents",
            "--toy-domains",
            d,
            "--max-steps",
            "200",
            "--batch-size",
            "8",
            "--micro-batch-size",
            "8",
            "--max-length",
            "1024",
        ]
        for d in ("story", "news", "code")
    },
}
FILES = ("adapter_model.safetensors", "adapter_config.json")


def make(name: str) -> dict:
    command = ADAPTERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, *command, "--out", tmp], cwd=ROOT, check=True)
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        dest = ROOT / "toy" / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copyfile(Path(tmp) / f, dest / f)
    info = {
        "command": "python " + " ".join(command),
        "heldout": summary["heldout"],
        "train_seconds": round(summary["train_seconds"], 1),
        "torch": torch.__version__,
        # the CPU kernels the run used (AVX2, AVX512, ...): 500 steps amplify their different
        # roundings, so the weights reproduce to the last digits only on the same kind of CPU
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    dataio.atomic_write_json(dest / "made_by.json", info)
    return info


if __name__ == "__main__":
    names = sys.argv[1:] or list(ADAPTERS)
    unknown = [n for n in names if n not in ADAPTERS]
    if unknown:
        sys.exit(f"error: unknown adapter(s) {unknown}; known: {', '.join(ADAPTERS)}")
    for n in names:
        print(n, make(n), flush=True)
