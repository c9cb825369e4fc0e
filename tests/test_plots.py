"""plots.py: a run's curves.png has one panel per quantity the run logged, eval_reasoning's arms.png
one bar per arm and benchmark, and a picture that cannot be drawn never fails the run."""

import json
import struct

import plots


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def write_metrics(out, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_panel_per_logged_quantity(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.2}]
    rows += [{"step": s, "loss": 1 / s, "reward": s / 30, "kl": 0.01 * s} for s in range(1, 31)]
    rows += [{"step": 30, "eval/accuracy": 0.6}]
    write_metrics(tmp_path, rows)
    summary = {"method": "grpo", "heldout": {"metric": "accuracy", "before": 0.2, "after": 0.6}}
    panels = plots.curve_panels(rows, summary["heldout"])
    assert [key for _, key in panels] == ["loss", "reward", "kl", "eval/accuracy"]
    path = plots.training_curves(tmp_path, summary)
    assert path == tmp_path / "curves.png"
    assert png_size(path) == (400 * 4, 320)  # 4 inches a panel at 100 dpi


def test_what_a_run_did_not_log_has_no_panel(tmp_path):
    # DPO's margin stands for the reward; a KL of 0 throughout (no --beta) is left out; held-out
    # figures only in summary.json still get their panel (before and after)
    rows = [{"step": s, "loss": 0.7, "rewards/margins": 0.1 * s, "kl": 0.0} for s in range(1, 5)]
    write_metrics(tmp_path, rows)
    heldout = {"metric": "win_rate", "before": 0.5, "after": 0.64}
    panels = plots.curve_panels(rows, heldout)
    assert [key for _, key in panels] == ["loss", "rewards/margins", "eval/win_rate"]
    assert png_size(plots.training_curves(tmp_path, {"heldout": heldout})) == (1200, 320)


def test_a_picture_that_cannot_be_drawn_never_fails_the_run(tmp_path, capsys):
    assert plots.training_curves(tmp_path, {}) is None  # no metrics.jsonl
    assert "could not draw" in capsys.readouterr().out
    write_metrics(tmp_path, [{"step": 1, "grad_norm": 1.0}])
    assert plots.training_curves(tmp_path, {}) is None  # nothing to draw: no file, no message
    assert not (tmp_path / "curves.png").exists()


def test_arm_chart(tmp_path):
    def bench(mean):
        return {"mean_at_k": mean, "mean_at_k_ci": [mean - 0.1, mean + 0.1]}

    results = {
        "base": {"benchmarks": {"toy_gsm8k": bench(0.1), "toy_math": bench(0.2)}},
        "think": {"benchmarks": {"toy_gsm8k": bench(0.6), "toy_math": bench(0.5)}},
    }
    path = plots.arm_chart(results, 4, tmp_path, {"toy_gsm8k": "GSM8K (toy)"})
    assert path == tmp_path / "arms.png"
    assert png_size(path)[0] == round(100 * (1.6 + 1.4 * 2))  # sized by the benchmarks drawn
