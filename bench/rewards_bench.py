"""chrF++ and ROUGE-L of rewards.py against their reference implementations: speed and agreement.

    pip install -r requirements-dev.txt     # sacrebleu and rouge-score are test-only dependencies
    # 2000 pairs of 100-word texts
    python bench/rewards_bench.py
    # 8 hypotheses per reference, as a GRPO group shares one
    python bench/rewards_bench.py --shared-refs 8

Prints the seconds of each side, the speed-up (theirs / ours) and the largest absolute difference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewards  # noqa: E402  (after the repository root is on sys.path)


def _random_text(rng, n_words: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) + rng.choice(("", "", "", ",", ".")) for _ in range(n_words))


def bench_chrf(
    n_pairs: int = 2000, n_words: int = 100, seed: int = 0, shared_refs: int = 1, repeats: int = 3
) -> dict:
    """chrF++ and ROUGE-L over `n_pairs` random pairs of `n_words`-word texts, ours vs sacrebleu /
    rouge-score.

    chrF++ runs `repeats` times per side, alternating, and each side keeps its fastest time (the run
    least disturbed by other processes); rouge-score is slow and runs once. shared_refs > 1 gives
    each reference to that many hypotheses (a GRPO group), where our per-batch n-gram cache helps;
    sacrebleu recomputes per call. Returns seconds, speed-ups (theirs / ours) and the largest
    absolute differences.
    """
    import random

    from rouge_score import rouge_scorer
    from sacrebleu import sentence_chrf

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(2000)]
    refs = [_random_text(rng, n_words, vocab) for _ in range(max(1, n_pairs // shared_refs))]
    ref_col = [refs[i // shared_refs % len(refs)] for i in range(n_pairs)]
    hyps = [_random_text(rng, n_words, vocab) for _ in range(n_pairs)]
    r: dict = {
        "pairs": n_pairs,
        "words": n_words,
        "shared_refs": shared_refs,
        "repeats": repeats,
        "chrf_sacrebleu_s": math.inf,
        "chrf_ours_s": math.inf,
    }
    for _ in range(repeats):
        t = time.perf_counter()
        theirs = [
            sentence_chrf(h, [ref], word_order=2).score / 100 for h, ref in zip(hyps, ref_col)
        ]
        r["chrf_sacrebleu_s"] = min(r["chrf_sacrebleu_s"], time.perf_counter() - t)
        t = time.perf_counter()
        ours = rewards.chrf_pp(hyps, reference=ref_col)
        r["chrf_ours_s"] = min(r["chrf_ours_s"], time.perf_counter() - t)
    r["chrf_speedup"] = r["chrf_sacrebleu_s"] / r["chrf_ours_s"]
    r["chrf_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs))

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    t = time.perf_counter()
    theirs = [scorer.score(ref, h)["rougeL"].fmeasure for h, ref in zip(hyps, ref_col)]
    r["rouge_l_rouge_score_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = rewards.rouge_l(hyps, reference=ref_col)
    r["rouge_l_ours_s"] = time.perf_counter() - t
    r["rouge_l_speedup"] = r["rouge_l_rouge_score_s"] / r["rouge_l_ours_s"]
    r["rouge_l_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs))
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/rewards_bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--pairs", type=int, default=2000, help="number of (hypothesis, reference) pairs"
    )
    p.add_argument("--words", type=int, default=100, help="words per text")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated texts")
    p.add_argument(
        "--shared-refs",
        type=int,
        default=1,
        help="hypotheses per reference (8 mimics a GRPO group sharing its reference)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts")
    args = p.parse_args(argv)
    r = bench_chrf(args.pairs, args.words, args.seed, args.shared_refs, args.repeats)
    print(
        f"{r['pairs']} pairs of {r['words']}-word texts, {r['shared_refs']} hypothesis/es per "
        "reference, "
        f"fastest of {r['repeats']} runs (ROUGE-L: rouge-score runs once, it is slow)"
    )
    print(
        f"chrF++  sacrebleu {r['chrf_sacrebleu_s']:.3f} s | ours {r['chrf_ours_s']:.3f} s | "
        f"speed-up x{r['chrf_speedup']:.2f} | max |diff| {r['chrf_max_abs_diff']:.2e}"
    )
    print(
        f"ROUGE-L rouge-score {r['rouge_l_rouge_score_s']:.3f} s | ours {r['rouge_l_ours_s']:.3f} "
        "s | "
        f"speed-up x{r['rouge_l_speedup']:.2f} | max |diff| {r['rouge_l_max_abs_diff']:.2e}"
    )


if __name__ == "__main__":
    main()
