"""grpo.py: the loss aggregations by hand, advantages, MARA, a rollout in process; short training
runs as subprocesses (slow)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_script, save_tiny_qwen3
from test_plots import png_size

import grpo
import loading
import lora
import plots
import tasks

ENV = {"OMP_NUM_THREADS": "1"}
# The learning test: the script's defaults (from the shipped SFT adapter) with fewer steps and
# held-out prompts.
LEARN = ["--max-steps", "80", "--eval-size", "100", "--init-adapter", "auto", "--save-every", "0"]
LEARN_MARGIN = 0.05
TINY = [
    "--max-steps",
    "2",
    "--batch-size",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "24",
    "--eval-size",
    "4",
    "--micro-batch-size",
    "4",
    "--log-completions",
    "1",
    "--init-adapter",
    "",
    "--save-every",
    "0",
]


def run_grpo(out: Path, *flags: str, timeout: int = 600) -> dict:
    """grpo.py at test size (TINY) into `out`; its summary."""
    run_script("grpo.py", "--out", out, *TINY, *flags, env=ENV, timeout=timeout)
    return json.loads((out / "summary.json").read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The four loss aggregations on a fixed batch, by hand
# ---------------------------------------------------------------------------------------------

L = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
# row 3: a completion masked out entirely
M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # mean over sequences of the per-sequence token mean
        ("grpo", ((1 + 2 + 3) / 3 + 5 / 1 + 0) / 3),
        ("bnpo", (1 + 2 + 3 + 5) / 4),  # token mean over the (micro-)batch
        ("dr_grpo", (1 + 2 + 3 + 5) / (3 * 4)),  # / (rows x max_completion_length = 4)
        ("dapo", (1 + 2 + 3 + 5) / 4),  # / tokens of the generation batch (here the same 4)
    ],
)
def test_loss_types_by_hand(loss_type, expected):
    got = grpo.aggregate_loss(L, M, loss_type, max_completion_length=4)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dapo_normalises_by_global_tokens():
    # another rank holds 6 more tokens: normaliser 10 tokens; x world 2 undoes the gradient
    # averaging over ranks
    got = grpo.aggregate_loss(L, M, "dapo", 4, global_tokens=10, world_size=2)
    assert got.item() == pytest.approx(11 * 2 / 10)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_whole_batch(loss_type):
    whole = grpo.aggregate_loss(L, M, loss_type, 4)
    parts = sum(
        grpo.aggregate_loss(
            L[s], M[s], loss_type, 4, batch_rows=3, num_micro_batches=2, global_tokens=4
        )
        for s in (slice(0, 2), slice(2, 3))
    )
    assert parts.item() == pytest.approx(whole.item())


def test_bnpo_averages_micro_batch_token_means():
    parts = sum(
        grpo.aggregate_loss(L[s], M[s], "bnpo", 4, num_micro_batches=2)
        for s in (slice(0, 1), slice(1, 3))
    )
    assert parts.item() == pytest.approx(((1 + 2 + 3) / 3 + 5 / 1) / 2)


def test_clipped_surrogate_by_hand():
    # ratio 1.5 with A = +1 is clipped at 1 + eps = 1.2; ratio 0.5 with A = -1 at 1 - eps = 0.8;
    # ratio 1 passes.
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, kl, low, high = grpo.clipped_surrogate(
        logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0
    )
    assert loss.tolist()[0] == pytest.approx([-1.2, 0.8, -2.0], rel=1e-5)
    assert low.tolist() == [[0.0, 1.0, 0.0]] and high.tolist() == [[1.0, 0.0, 0.0]]
    assert grpo.aggregate_loss(loss, mask, "bnpo", 3).item() == pytest.approx(
        (-1.2 + 0.8 - 2.0) / 3, rel=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Advantages, MARA, gate, diversity
# ---------------------------------------------------------------------------------------------


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, zero = grpo.group_advantages(r, 4, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # Bessel: sqrt(1/3)
    assert adv[:4].tolist() == pytest.approx([x / (std + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)])
    assert adv[4:].tolist() == [0.0] * 4 and zero.tolist() == [False] * 4 + [True] * 4
    adv, _ = grpo.group_advantages(r, 4, "none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    adv, _ = grpo.group_advantages(r, 4, "batch")
    assert adv.tolist() == pytest.approx(
        (torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (r.std() + 1e-4)).tolist()
    )


def test_identical_rewards_give_exact_zero_advantages():
    # 8 x 1.1 sums to a value whose mean is not exactly 1.1: the group must still get advantages of
    # exactly 0
    r = torch.tensor([1.1] * 8 + [1.1, 0.1] * 4)
    adv, zero = grpo.group_advantages(r, 8, "group")
    assert (adv[:8] == 0).all() and zero[:8].all() and (adv[8:] != 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_update_without_zero_advantage_rows_has_the_same_gradient(loss_type):
    # grpo.py skips rows with A = 0 when beta = 0 (except for bnpo): same gradient, less compute.
    torch.manual_seed(0)
    logp = (torch.randn(6, 5) - 2).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(6, 5)  # ratio != 1: clipping engages on some tokens
    adv = torch.tensor([0.7, -0.7, 0.0, 0.0, 1.2, -0.3])
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
        ]
    )
    tokens = float(mask.sum())

    def grad(rows):
        logp.grad = None
        per_token, *_ = grpo.clipped_surrogate(
            logp[rows], old[rows], None, adv[rows], mask[rows], eps_low=0.2, eps_high=0.28, beta=0.0
        )
        grpo.aggregate_loss(
            per_token, mask[rows], loss_type, 5, batch_rows=6, global_tokens=tokens
        ).backward()
        return logp.grad.clone()

    assert torch.allclose(grad(torch.arange(6)), grad(torch.tensor([0, 1, 4, 5])), atol=1e-7)


def test_evaluate_leaves_prompts_without_gold_out_of_accuracy(monkeypatch):
    # A fake sampler: 2 samples per prompt with known texts. Prompt 2 has no gold answer: it must
    # not count as wrong.
    texts = {
        2: ["#### 5", "#### 4", "#### 1", "#### 2", "#### 7", "#### 7"],
        1: ["#### 5", "#### 3", "#### 7"],
    }

    class FakeRollout:
        def __init__(self, n):
            self.n, self.completion_mask = n, torch.ones(3 * n, 4)
            self.finished = torch.ones(3 * n, dtype=torch.bool)

        def texts(self, tokenizer):
            return texts[self.n]

    monkeypatch.setattr(
        grpo.sampling, "sample", lambda model, tok, prompts, n=1, **kw: FakeRollout(n)
    )
    heldout = [
        {"ids": [1], "prompt": "a", "answer": "5"},
        {"ids": [2], "prompt": "b", "answer": None},
        {"ids": [3], "prompt": "c", "answer": "7"},
    ]
    args = grpo.Args(eval_samples=2, max_completion_length=8, temperature=0.5, task="verifiable")
    row = grpo.evaluate(torch.nn.Linear(1, 1), None, heldout, "correct:1.0", args)
    assert row["accuracy"] == pytest.approx(3 / 4)  # 1 + 2 right of the 4 graded samples
    assert row["pass_at_k"] == 1.0 and row["greedy_accuracy"] == 1.0 and row["graded_prompts"] == 2


def test_documents_become_prompts_and_prompt_rows_pass_through():
    tok = loading.load_tokenizer("toy")
    rows = [
        {"text": "a" * 30, "domain": "news", "_line": 7},
        {"prompt": "q", "reference": "r"},
        {"text": "b" * 12},
    ]
    out = tasks.documents_as_prompts(rows, tok, "docs.jsonl", 10, 8)
    assert out[0] == {"domain": "news", "_line": 7, "prompt": "a" * 10, "reference": "a" * 8}
    assert out[1] is rows[1]
    assert out[2] == {"prompt": "b" * 10, "reference": "b" * 2}  # the continuation there is
    with pytest.raises(
        grpo.errors.DataError,
        match=r"^docs\.jsonl:3: field 'text': 12 tokens; the continuation task needs more than "
        r"--prefix-tokens 12$",
    ):
        tasks.documents_as_prompts(rows, tok, "docs.jsonl", 12, 8)


def test_mara_anchors_high_reward_samples():
    # group of 4: rewards 1, 1, 0.2, 1 with reference log-probs -3, -1, -0.5, -6; tau 0.5, beta 0.1
    r = torch.tensor([1.0, 1.0, 0.2, 1.0])
    lp = torch.tensor([-3.0, -1.0, -0.5, -6.0])
    new, anchored = grpo.mara_rewards(r, lp, 4, tau=0.5, beta=0.1)
    # anchor z = sample 2 (highest ref log-prob among r >= tau); R' = R(z) + beta (lp_z - lp_i);
    # sample 3 untouched
    assert new.tolist() == pytest.approx([1.0 + 0.1 * 2.0, 1.0, 0.2, 1.0 + 0.1 * 5.0])
    assert anchored.tolist() == [True, True, False, True]
    # a group with no sample above tau is unchanged
    new, _ = grpo.mara_rewards(
        torch.tensor([0.1, 0.2]), torch.tensor([-1.0, -2.0]), 2, tau=0.5, beta=0.1
    )
    assert new.tolist() == pytest.approx([0.1, 0.2])


def test_kl_term_is_k3_and_reference_equal_policy_gives_zero():
    # k3 = exp(ref - logp) - (ref - logp) - 1: 0 where ref == logp, e^-1 - (-1) - 1 = e^-1 where ref
    # = logp - 1
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -3.0]])
    loss, kl, _, _ = grpo.clipped_surrogate(
        logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), 0.2, 0.2, 0.5
    )
    assert kl.tolist()[0] == pytest.approx([0.0, math.exp(-1.0)])
    # A = 0: only beta * k3 is left
    assert loss.tolist()[0] == pytest.approx([0.0, 0.5 * math.exp(-1.0)])
    loss.sum().backward()
    # d k3 / d logp = 1 - e^(ref-logp)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.5 * (1 - math.exp(-1.0))])


# ---------------------------------------------------------------------------------------------
# Runs on the toy world (subprocesses)
# ---------------------------------------------------------------------------------------------


def _finite(row: dict) -> bool:
    return all(
        math.isfinite(v)
        for v in row.values()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )


@pytest.mark.slow
def test_script_verifiable_outputs(tmp_path):
    summary = run_grpo(tmp_path)
    for name in (
        "args.json",
        "metrics.jsonl",
        "samples.jsonl",
        "summary.json",
        "adapter_model.safetensors",
        "adapter_config.json",
    ):
        assert (tmp_path / name).is_file(), name
    rows = metrics(tmp_path)
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in (
        "reward",
        "reward_std",
        "rewards/correct/mean",
        "rewards/format/mean",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "gate/mixed_groups",
        "gate/all_zero_groups",
        "gate/all_one_groups",
        "gate/near_zero_groups",
        "diversity/distinct_2",
        "num_tokens",
        "step_time",
        "grad_norm",
    ):
        assert key in train[0], key
    assert all(_finite(r) for r in rows)
    held = summary["heldout"]
    assert held["metric"] == "accuracy"
    # the headline numbers are the held-out evaluations logged at step 0 and after the last step
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert (held["before"], held["after"]) == (evals[0]["eval/accuracy"], evals[1]["eval/accuracy"])
    # after - before with its interval, paired over the same held-out prompts
    assert held["diff"] == pytest.approx(held["after"] - held["before"])
    assert held["units"] == evals[0]["eval/graded_prompts"]
    assert held["diff_interval"][0] <= held["diff"] <= held["diff_interval"][1]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["split"] for s in samples} == {"train", "heldout"}
    assert all("completion" in s and "reward" in s for s in samples)
    # the curves: the reward and the held-out accuracy, no KL panel without --beta (and the loss,
    # about 0 with one update per batch, only where it is not exactly 0)
    panels = [key for _, key in plots.curve_panels(rows, held)]
    assert panels[-2:] == ["reward", "eval/accuracy"] and "kl" not in panels
    assert png_size(tmp_path / "curves.png") == (400 * len(panels), 320)


@pytest.mark.slow
def test_kl_zero_at_step0_and_ratio_clips_with_two_iterations(tmp_path):
    # Continuous rewards (Levenshtein) give every group a spread, so the first update moves the
    # policy.
    run_grpo(
        tmp_path,
        "--task",
        "continuation",
        "--reward",
        "levenshtein",
        "--beta",
        "0.05",
        "--num-iterations",
        "2",
        "--epsilon",
        "0.05",
        "--lr",
        "0.02",
        "--loss-type",
        "bnpo",
        "--mara-tau",
        "0.2",
        "--save-every",
        "1",
    )
    first, second = [r for r in metrics(tmp_path) if "reward" in r]
    # MARA ran on the reference's sequence log-probs: it anchored samples and moved their rewards
    assert first["mara/anchored_frac"] > 0 and first["mara/reward"] != first["reward"]
    # step 1 is in the middle of the generation batch and step 2 the last: no checkpoint
    assert not (tmp_path / "checkpoint").exists()
    assert first["kl"] == 0.0  # policy == reference before any update (LoRA B starts at 0)
    assert first["ratio/min"] == pytest.approx(1.0, abs=1e-5)
    assert first["ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert first["clip_ratio/region_mean"] == 0.0
    # the second step reuses the batch with the stored old log-probs: the ratio moved and the clip
    # engaged
    assert max(abs(second["ratio/min"] - 1), abs(second["ratio/max"] - 1)) > 0.05
    assert second["clip_ratio/region_mean"] > 0.0
    assert second["kl"] > 0.0
    assert second["reward"] == first["reward"]  # same generation batch


def test_mara_rollout_narrower_than_the_limit():
    # In process, no training: level-1 problems from the SFT adapter end well before 300 tokens, so
    # the rollout is narrower than --max-completion-length, and the reference log-probs MARA reads
    # must be as wide as the rollout, not as the limit.
    args = grpo.Args(
        toy_difficulty="1",
        max_completion_length=300,
        mara_tau=0.5,
        beta=0.04,
        num_generations=4,
        micro_batch_size=4,
        toy_train_size=2,
        eval_size=1,
        device="cpu",
    )
    args = grpo.resolve_defaults(args)
    tokenizer = loading.load_tokenizer("toy")
    model = lora.load_policy(args, torch.device("cpu"))
    train, _ = tasks.rl_prompts(tokenizer, args)
    generator = torch.Generator().manual_seed(0)
    batch = grpo.rollout(model, tokenizer, train, "correct:1.0,format:0.1", generator, args)
    width = batch.roll.completion_ids.shape[1]
    assert width < 300 and batch.metrics["completions/clipped_ratio"] == 0.0, width
    assert batch.ref_logp.shape == batch.roll.completion_ids.shape
    # reward = correct + 0.1 format, so r >= tau = 0.5 exactly for the correct samples
    m = batch.metrics
    assert m["mara/anchored_frac"] == pytest.approx(m["rewards/correct/mean"]), m


@pytest.mark.slow
def test_mara_with_every_completion_shorter_than_the_limit(tmp_path):
    # Level-1 problems from the SFT adapter end well before 300 tokens, so the rollout is narrower
    # than --max-completion-length: the reference log-probs must be as wide as the rollout, not as
    # the limit.
    run_grpo(
        tmp_path,
        "--init-adapter",
        "auto",
        "--toy-difficulty",
        "1",
        "--max-completion-length",
        "300",
        "--mara-tau",
        "0.5",
        "--beta",
        "0.04",
        "--max-steps",
        "1",
    )
    row = [r for r in metrics(tmp_path) if "reward" in r][0]
    assert row["completions/clipped_ratio"] == 0.0 and row["completions/max_length"] < 300, row
    # reward = correct + 0.1 format, so r >= tau = 0.5 exactly for the correct samples
    assert row["mara/anchored_frac"] == pytest.approx(row["rewards/correct/mean"]), row
    assert row["kl"] == 0.0


@pytest.mark.slow
def test_resume_repeats_the_interrupted_step_exactly(tmp_path):
    flags = ("--task", "continuation", "--reward", "levenshtein", "--save-every", "1")
    run_grpo(tmp_path, *flags)  # two steps; the checkpoint holds step 1
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 1
    first = [r for r in metrics(tmp_path) if "reward" in r]
    # redo step 2 from the checkpoint (the log is trimmed to step 1)
    summary = run_grpo(tmp_path, *flags, "--resume")
    again = [r for r in metrics(tmp_path) if "reward" in r]
    assert [r["step"] for r in again] == [1, 2] and again[0] == first[0]
    # same prompts, same sampling stream, same weights and optimizer state: the same step again
    for key in ("reward", "completions/mean_length", "loss", "entropy"):
        assert again[1][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-7), key
    assert again[1]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-4)
    stages = [
        s.get("stage")
        for s in map(json.loads, (tmp_path / "samples.jsonl").read_text().splitlines())
    ]
    assert stages.count("after") == min(10, 4)  # the first run's final samples were trimmed away
    assert summary["heldout"]["before"] is not None  # carried over from the first run


@pytest.mark.slow
def test_realism_real_qwen3_tokenizer_and_vocab(tmp_path):
    """A tiny random Qwen3 with the real 151,936 vocabulary and tokenizer, with QLoRA (a GPU's
    hub-model setup, asked for by flags: a CPU's default is plain LoRA)."""
    model_dir = save_tiny_qwen3(tmp_path / "qwen3-tiny")
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                    "answer": str(a + b),
                }
            )
            + "\n"
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
        )
    )
    out = tmp_path / "run"
    # --mask-truncated-completions: a random model never ends, so every row is masked out
    summary = run_grpo(
        out,
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--lora-r",
        "8",
        "--beta",
        "0.04",
        "--max-completion-length",
        "12",
        "--load-in-4bit",
        "--gradient-checkpointing",
        "--mask-truncated-completions",
    )
    assert summary["args"]["load_in_4bit"] and summary["args"]["gradient_checkpointing"]
    rows = [r for r in metrics(out) if "reward" in r]
    assert len(rows) == 2 and all(_finite(r) for r in rows)
    assert rows[0]["kl"] == 0.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # the real chat template was applied
    assert any("<|im_start|>assistant" in s["prompt"] for s in samples)


@pytest.mark.slow
def test_torchrun_two_ranks_stay_in_sync(tmp_path):
    run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
        "grpo.py",
        "--out",
        tmp_path,
        *TINY,
        "--task",
        "continuation",
        "--reward",
        "levenshtein",
        "--scale-rewards",
        "batch",
        env=ENV,
        timeout=600,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["rank_param_max_diff"] == 0.0
    rows = [r for r in metrics(tmp_path) if "reward" in r]
    assert len(rows) == 2 and rows[-1]["grad_norm"] > 0  # it trained
    assert rows[0]["num_tokens"] > 0


@pytest.mark.slow
def test_learning_toy_verifiable(tmp_path):
    """`python grpo.py` shortened: from the shipped toy SFT adapter, GRPO raises held-out accuracy
    at level 3 (Mean@4 at the sampling temperature) on a fixed seed. The full default (300 steps) is
    measured by the script itself and quoted in the README; this run is shorter and asserts a margin
    below what it measured."""
    run_script("grpo.py", "--out", tmp_path / "grpo", *LEARN, env=ENV, timeout=1800)
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    held = summary["heldout"]
    # a level the SFT model has not mastered
    assert held["metric"] == "accuracy" and 0.2 <= held["before"] <= 0.9, held
    assert held["after"] >= held["before"] + LEARN_MARGIN, held


def test_proxy_reward_and_proxy_model_go_together():
    import errors

    prompts = [{"prompt": "p", "reference": "r", "domain": "story"}]
    for reward, proxy in (("proxy_nll", ""), ("similarity", "toy/story")):
        args = grpo.Args(task="continuation", reward=reward, proxy_model=proxy)
        with pytest.raises(errors.ConfigError, match="go together"):
            grpo.default_reward(args, prompts)
    args = grpo.Args(task="continuation", reward="proxy_nll:1,chrf_pp:0.5", proxy_model="toy/story")
    assert grpo.default_reward(args, prompts) == "proxy_nll:1,chrf_pp:0.5"


def _domain_documents(tmp_path, domain, train=300, heldout=32):
    """One toy domain's documents as JSONL files {'text', 'domain'}: (training, held-out)."""
    import toy

    paths = []
    for split, n in (("train", train), ("test", heldout)):
        path = tmp_path / f"{domain}.{split}.jsonl"
        docs = toy.documents(split, n, seed=0, domains=[domain])
        path.write_text(
            "".join(json.dumps({"text": d["text"], "domain": domain}) + "\n" for d in docs)
        )
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_learning_proxy_reward_lowers_the_proxy_nll_of_heldout_continuations(tmp_path):
    """Continuation GRPO against the story proxy (the toy base with the shipped story adapter)
    raises the proxy's mean log-likelihood of the policy's continuations of held-out story prefixes
    (= lowers their proxy NLL), on a fixed seed: measured -0.305 -> -0.264 in this run."""
    train, heldout = _domain_documents(tmp_path, "story")
    out = tmp_path / "grpo"
    run_script(
        "grpo.py",
        *("--task", "continuation", "--data", train, "--eval-data", heldout),
        *("--reward", "proxy_nll", "--proxy-model", "toy/story", "--temperature", "1.0"),
        *("--max-steps", "30", "--eval-size", "32", "--save-every", "0", "--out", out),
        env=ENV,
        timeout=1800,
    )
    held = json.loads((out / "summary.json").read_text())["heldout"]
    assert held["metric"] == "mean_reward" and held["before"] < 0, held
    assert held["after"] >= held["before"] + 0.025, held
    steps = [r for r in metrics(out) if "reward" in r]
    assert all(0 < r["timing/reward"] < r["step_time"] for r in steps)
