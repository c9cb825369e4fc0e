"""GRPO: group-relative policy optimisation, with verifiable rewards or as continued pretraining.

For every prompt q the policy samples a group of G completions o_1..o_G at temperature T, and each
gets a reward r_i: a weighted sum of the reward functions of `rewards.py` (`--reward
name:weight,...`). The advantage compares a completion with its own group (DeepSeekMath, arXiv
2402.03300, sec. 4.1.2):

    A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)    --scale-rewards group (Bessel-corrected std);
                                                      batch: the batch's std; none: no division
                                                      (Dr. GRPO, arXiv 2503.20783, sec. 3.1)

and every completion token t is trained with PPO's clipped surrogate plus a k3 KL estimate to the
reference policy (the same model with LoRA switched off), written out in `clipped_surrogate`:

    rho_t = exp(logp_t - logp_old_t)
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t,
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman 2020; unbiased, >= 0)

summed over tokens by `--loss-type` (grpo, bnpo, dr_grpo, dapo; see `aggregate_loss`). Log-probs
divide the logits by T, as the sampler did. With one update per batch logp_old = logp.detach(), so
rho = 1 and the logged loss is about 0 while the gradient is not: watch `reward`, not `loss`.
Without a KL term (beta = 0, the default) a completion of a group with identical rewards has A = 0
and adds exactly nothing, so the update skips it (`--update-all-rows` keeps it).

Data: JSONL rows {'prompt': str | messages, 'answer'?, 'reference'?, 'domain'?} or documents
{'text', 'domain'?} (tasks.rl_prompts); 'toy' = toy arithmetic, or toy documents for continuation.
--init-adapter (merged; the reference policy is the merged model): 'auto' = the shipped toy
thinking-SFT adapter for toy arithmetic, none otherwise.

Continued pretraining (`--task continuation`, the model card Lambent/Qwen3-4B-Base-Continued-GRPO):
the prompt is a document prefix, the completion the policy's continuation, and the reward its
similarity to the true continuation (semantic similarity, chrF++, ROUGE-L, Levenshtein and a length
penalty, mixed by content type: `rewards.similarity`). The card trained Qwen3-4B-Base with QLoRA
r=128, alpha=256, lr 1e-5: the defaults for a real model on CUDA (DEFAULTS below).

MARA (`--mara-tau`, arXiv 2510.20817): the KL-regularised optimum pi_ref(y) exp(r(y)/beta) puts
its mass on one mode. Within a group, every sample with r >= tau gets the reward of the anchor z
(the high-reward sample most likely under pi_ref) plus beta (log pi_ref(z) - log pi_ref(y)), which
makes the optimum give all high-reward samples the same mass, so several modes stay alive.

Style (`--reward proxy_nll --proxy-model ...`, the model card
Lambent/Qwen3-4B-Base-Continued-GRPO-Style-Karcher): the reward is the mean per-token
log-likelihood of the completion under a small proxy model fitted to the domain
(`likelihood.ProxyNLLReward`; the card used SmolLM2-360M), so the policy learns the domain's style;
one adapter per domain, then `karcher_merge.py` (the pipeline: `scripts/style_karcher.py`).

Run:
    python grpo.py                                # toy arithmetic, from the toy SFT adapter
    python grpo.py --task continuation            # toy documents, similarity rewards, toy base
    python grpo.py --task continuation --reward proxy_nll --proxy-model toy/story   # style reward
    torchrun --nproc_per_node 4 grpo.py --model Qwen/Qwen3-1.7B-Base --data math.jsonl \\
        --reward correct:1.0,format:0.1 --init-adapter runs/sft_think_qwen
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch

import cli
import distributed
import errors
import lifecycle
import likelihood
import loading
import lora
import rewards
import sampling
import tasks
import toy

# ---------------------------------------------------------------------------------------------
# The GRPO pieces with a formula each (tests import them)
# ---------------------------------------------------------------------------------------------


def group_advantages(
    rewards_: torch.Tensor, G: int, scale: str, batch_std: torch.Tensor | None = None
):
    """A_i = r_i - mean_group(r), divided by (std + 1e-4) per --scale-rewards; also the
    zero-std-group flag per row. A group of identical rewards gets advantages of exactly 0 (not the
    rounding residue of r - mean)."""
    grouped = rewards_.view(-1, G)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)  # Bessel-corrected, as TRL
    adv = (grouped - mean).masked_fill((grouped == grouped[:, :1]).all(1, keepdim=True), 0.0)
    if scale == "group":
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        adv = adv / ((rewards_.std() if batch_std is None else batch_std) + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std)).expand_as(grouped)
    return adv.reshape(-1), zero_std.reshape(-1)


def mara_rewards(
    rewards_: torch.Tensor, seq_ref_logp: torch.Tensor, G: int, tau: float, beta: float
):
    """MARA (arXiv 2510.20817): per group, samples with r >= tau get R(z) + beta (log pi_ref(z) -
    log pi_ref(y)), z = the sample with r >= tau of highest log pi_ref. Returns the new rewards and
    which rows were anchored."""
    r, lp = rewards_.view(-1, G), seq_ref_logp.view(-1, G)
    high = r >= tau
    z = lp.masked_fill(~high, float("-inf")).argmax(1, keepdim=True)
    anchored = r.gather(1, z) + beta * (lp.gather(1, z) - lp)
    return torch.where(high, anchored, r).reshape(-1), high.reshape(-1)


def clipped_surrogate(
    logp, old_logp, ref_logp, advantages, mask, eps_low: float, eps_high: float, beta: float
):
    """Per token: L = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3, rho = exp(logp
    - old_logp), k3 = exp(ref - logp) - (ref - logp) - 1 (PPO, arXiv 1707.06347, eq. 7; DeepSeekMath
    eq. 3 and 4).

    Tensors [B, T]; advantages [B] or [B, T]; ref_logp None skips the KL term. Returns fp32 (loss,
    kl, low, high) shaped like logp, 0 on masked tokens; low / high flag tokens held by the clip
    (rho below 1 - eps_low with A < 0, above 1 + eps_high with A > 0: TRL's clip_ratio/low_mean and
    high_mean). Only logp gets a gradient."""
    m = mask.bool()
    zero = torch.zeros((), device=logp.device)
    # padding may hold anything: keep inf and nan out of the gradient
    logp = torch.where(m, logp.float(), zero)
    ratio = torch.exp(logp - torch.where(m, old_logp.detach().float(), zero))
    A = advantages.detach().float()
    A = A[:, None] if A.dim() == 1 else A
    loss = -torch.minimum(ratio * A, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * A)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = torch.where(m, ref_logp.detach().float(), zero) - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + beta * kl
    low = (ratio < 1.0 - eps_low) & (A < 0) & m
    high = (ratio > 1.0 + eps_high) & (A > 0) & m
    return torch.where(m, loss, zero), torch.where(m, kl, zero).detach(), low.float(), high.float()


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int,
    batch_rows: int | None = None,
    num_micro_batches: int = 1,
    global_tokens: float | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """One micro-batch's share of the loss. Summed over the micro-batches of a generation batch of
    `batch_rows` rows (and with gradients averaged over ranks) it is the objective of `loss_type`:

        grpo    : mean over sequences of  sum_t L M / sum_t M            (DeepSeekMath, eq. 3)
        bnpo    : sum L M / sum M over each micro-batch, mean over micro-batches
        dr_grpo : sum L M / (rows x max_completion_length)               (Dr. GRPO: no length bias)
        dapo    : sum L M / (completion tokens of the generation batch on all ranks)  (DAPO, eq. 8)
    """
    m = mask.to(per_token_loss.dtype)
    lm = per_token_loss * m
    rows = per_token_loss.shape[0] if batch_rows is None else batch_rows
    if loss_type == "grpo":
        return (lm.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / rows
    if loss_type == "bnpo":
        return lm.sum() / m.sum().clamp(min=1.0) / num_micro_batches
    if loss_type == "dr_grpo":
        return lm.sum() / (rows * max_completion_length)
    if loss_type == "dapo":
        tokens = float(m.sum()) if global_tokens is None else float(global_tokens)
        # the gradient all-reduce averages over ranks, so x world_size makes the normaliser the
        # global token count
        return lm.sum() * world_size / max(tokens, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}: choose grpo, bnpo, dr_grpo or dapo")


# ---------------------------------------------------------------------------------------------
# 1. Rollout: G completions per prompt, rewards, advantages -> a Batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One generation batch: what the update reads, and what was measured while making it."""

    roll: sampling.Rollout
    loss_mask: torch.Tensor  # [R, C'] 1 on the completion tokens the loss sees
    advantages: torch.Tensor  # [R]
    ref_logp: torch.Tensor | None  # [R, C'] reference (LoRA off) log-probs, when beta > 0 or MARA
    # [R, C'] log-probs before the first update, when num_iterations > 1
    old_logp: torch.Tensor | None
    update_rows: list[torch.Tensor]  # micro-batches of the rows the update trains on
    global_tokens: float  # completion tokens of the batch on all ranks (dapo's normaliser)
    num_tokens: int  # prompt and completion tokens sampled on this rank
    metrics: dict
    samples: list[dict]


def rollout(
    model, tokenizer, prompts: list[dict], spec: str, generator, args: Args, functions=None
) -> Batch:
    """G = --num-generations completions per prompt, their rewards under `spec` (`functions`: the
    reward objects, as the proxy model; with MARA's anchor when --mara-tau is set), group
    advantages, the loss mask, and the rows the update trains on."""
    G, micro_batch_size, temperature = args.num_generations, args.micro_batch_size, args.temperature
    roll = sampling.sample(
        model,
        tokenizer,
        [p["ids"] for p in prompts],
        n=G,
        max_new_tokens=args.max_completion_length,
        temperature=temperature,
        top_p=args.top_p,
        generator=generator,
    )
    texts = roll.texts(tokenizer)
    t_reward = time.perf_counter()
    # `finished`: which completions ended with EOS (the proxy reward scores only their EOS)
    columns = {**rewards.reward_columns(prompts, G), "finished": roll.finished.tolist()}
    total, per_fn = rewards.compute_rewards(spec, texts, columns, functions)
    t_reward = time.perf_counter() - t_reward
    r = torch.tensor(total, dtype=torch.float32)
    # The loss mask: 1 up to and including the first EOS (from the sampler, never from the pad id);
    # --mask-truncated-completions also drops completions that never ended (DAPO's overlong
    # filtering).
    truncated = args.mask_truncated_completions
    mask = roll.completion_mask * (roll.finished[:, None].long() if truncated else 1)
    # Reference (LoRA off) and old-policy log-probs, before any update on this batch.
    ref_logp = old_logp = None
    if args.beta > 0 or args.mara_tau is not None:
        with lora.disabled(model):
            ref_logp = sampling.rollout_logprobs(model, roll, micro_batch_size, temperature)
    if args.num_iterations > 1:
        old_logp = sampling.rollout_logprobs(model, roll, micro_batch_size, temperature)
    extra = {}
    if args.mara_tau is not None:
        seq_ref_logp = (ref_logp * roll.completion_mask).sum(-1).cpu()
        r, anchored = mara_rewards(r, seq_ref_logp, G, args.mara_tau, args.beta)
        extra = {
            "mara/anchored_frac": anchored.float().mean().item(),
            "mara/reward": r.mean().item(),
        }
    batch_std = distributed.global_std(r) if args.scale_rewards == "batch" else None
    adv, zero_std = group_advantages(r, G, args.scale_rewards, batch_std)
    # A completion whose advantage is 0 adds exactly 0 to the clipped objective, and the normalisers
    # of grpo, dr_grpo and dapo do not depend on which rows share a micro-batch: skipping it gives
    # the same gradient. bnpo's normaliser does, and a KL term is not 0.
    skip_zero_advantage = not (args.update_all_rows or args.beta > 0 or args.loss_type == "bnpo")
    R = len(texts)
    live = (adv != 0).nonzero().view(-1) if skip_zero_advantage else torch.arange(R)
    names = [n for n, _ in rewards.parse_reward_spec(spec)]
    metrics = {
        **rewards.reward_metrics(total, per_fn),
        **extra,
        "frac_reward_zero_std": zero_std.float().mean().item(),
        **rewards.reward_gate(per_fn[names[0]], G),
        "diversity/distinct_2": rewards.distinct_n_within_groups(roll.tokens(), G, n=2),
        **roll.length_metrics(),
        "timing/reward": t_reward,
    }
    samples = [
        {
            "prompt": prompts[i // G]["prompt"],
            "completion": texts[i],
            "reward": total[i],
            "rewards": {n: per_fn[n][i] for n in names},
            "advantage": float(adv[i]),
            "finished": bool(roll.finished[i]),
        }
        for i in range(min(R, args.log_completions * G))
    ]
    return Batch(
        roll=roll,
        loss_mask=mask,
        advantages=adv.to(mask.device),
        ref_logp=ref_logp,
        old_logp=old_logp,
        update_rows=[live[s : s + micro_batch_size] for s in range(0, len(live), micro_batch_size)],
        global_tokens=float(distributed.all_reduce_sum(mask.sum().float().cpu())),
        num_tokens=int(roll.attention_mask.sum()),
        metrics=metrics,
        samples=samples,
    )


# ---------------------------------------------------------------------------------------------
# 2. Update: the clipped surrogate over micro-batches, gradients accumulated (the optimizer step is
#    the caller's)
# ---------------------------------------------------------------------------------------------


def update(model, batch: Batch, args: Args, world: int) -> dict:
    """Forward/backward of `clipped_surrogate` summed by `aggregate_loss` over the batch's update
    micro-batches, at --temperature, with --loss-type, --epsilon / --epsilon-high, --beta and
    --max-completion-length; returns the loss and the token means of kl, entropy, clip and ratio
    (summed over ranks)."""
    sums = dict.fromkeys(("loss", "kl", "entropy", "low", "high", "ratio", "tokens"), 0.0)
    ratio_min, ratio_max = float("inf"), float("-inf")
    R = batch.roll.completion_ids.shape[0]
    for rows in batch.update_rows:
        ids, attn, K = sampling.micro_batch(batch.roll, rows)
        m = batch.loss_mask[rows, :K]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
            logp, entropy = sampling.sequence_logprobs(
                model,
                ids,
                attn,
                K,
                temperature=args.temperature,
                return_entropy=True,
                group=batch.roll.group[rows],
            )
        # one step per batch: logp_old = logp.detach(), so rho = 1
        old = batch.old_logp[rows, :K] if batch.old_logp is not None else logp.detach()
        ref = batch.ref_logp[rows, :K] if batch.ref_logp is not None else None
        per_token, kl, low, high = clipped_surrogate(
            logp, old, ref, batch.advantages[rows], m, args.epsilon, args.epsilon_high, args.beta
        )
        loss = aggregate_loss(
            per_token,
            m,
            args.loss_type,
            args.max_completion_length,
            batch_rows=R,
            num_micro_batches=len(batch.update_rows),
            global_tokens=batch.global_tokens,
            world_size=world,
        )
        loss.backward()
        mf, ratio = m.float(), torch.exp(logp.detach() - old)
        if mf.sum() > 0:
            ratio_min = min(ratio_min, float(ratio[m.bool()].min()))
            ratio_max = max(ratio_max, float(ratio[m.bool()].max()))
        for key, value in (
            ("loss", loss.detach()),
            ("kl", (kl * mf).sum()),
            ("entropy", (entropy.detach() * mf).sum()),
            ("low", (low * mf).sum()),
            ("high", (high * mf).sum()),
            ("ratio", (ratio * mf).sum()),
            ("tokens", mf.sum()),
        ):
            sums[key] += float(value)
    summed = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
    total = dict(zip(sums, summed.tolist()))
    n = max(total["tokens"], 1.0)
    stats = {
        "loss": total["loss"] / world,
        "kl": total["kl"] / n,
        "entropy": total["entropy"] / n,
        "clip_ratio/low_mean": total["low"] / n,
        "clip_ratio/high_mean": total["high"] / n,
        "clip_ratio/region_mean": (total["low"] + total["high"]) / n,
        "ratio/mean": total["ratio"] / n,
    }
    if ratio_min <= ratio_max:  # rank 0's extremes; absent when every completion was masked out
        stats.update({"ratio/min": ratio_min, "ratio/max": ratio_max})
    return stats


# ---------------------------------------------------------------------------------------------
# 3. Held-out evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, heldout: list[dict], spec: str, args: Args, functions=None) -> dict:
    """Mean reward of k = --eval-samples samples per held-out prompt at the training temperature,
    with a fixed generator (the same draws before and after training). On the verifiable task
    (prompts with gold answers) also `accuracy` (Mean@k: the share of correct samples), `pass_at_k`
    and greedy accuracy; prompts without a gold answer are left out."""
    k, max_new_tokens = args.eval_samples, args.max_completion_length
    device = next(model.parameters()).device
    ids = [p["ids"] for p in heldout]
    roll = sampling.sample(
        model,
        tokenizer,
        ids,
        n=k,
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=torch.Generator(device=device).manual_seed(args.seed + 12345),
        batch_size=128,
    )
    texts = roll.texts(tokenizer)
    cols = {**rewards.reward_columns(heldout, k), "finished": roll.finished.tolist()}
    total, _ = rewards.compute_rewards(spec, texts, cols, functions)
    row = {
        "_units": {"mean_reward": [sum(total[i : i + k]) / k for i in range(0, len(total), k)]},
        "mean_reward": sum(total) / len(total),
        "mean_length": float(roll.completion_mask.sum(1).float().mean()),
        "distinct_2": rewards.distinct_n(texts, 2),
    }
    graded = rewards.accuracy(texts, heldout, k, units=True) if args.task == "verifiable" else {}
    if graded:  # Mean@k, pass@k, and greedy accuracy
        greedy = sampling.sample(
            model, tokenizer, ids, n=1, max_new_tokens=max_new_tokens, greedy=True, batch_size=128
        )
        greedy_accuracy = rewards.accuracy(greedy.texts(tokenizer), heldout)["accuracy"]
        row["_units"].update(graded.pop("_units"))
        row.update(graded, greedy_accuracy=greedy_accuracy)
    row["_samples"] = [
        {"prompt": c, "completion": t, "reward": r}
        for c, t, r in zip(cols["prompt"][::k][:10], texts[::k][:10], total[::k][:10])
    ]
    return row


# ---------------------------------------------------------------------------------------------
# Flags and defaults
# ---------------------------------------------------------------------------------------------


@dataclass
class Args(cli.TrainArgs):
    out: str = "runs/grpo"
    init_adapter: str = "auto"
    max_steps: int = 300
    log_completions: int = 2
    """groups per step written to samples.jsonl (prompt, completions, rewards, advantages)"""
    task: Literal["verifiable", "continuation"] = "verifiable"
    """verifiable: prompts with answers; continuation: document prefixes, similarity to the true
    continuation"""
    reward: str = ""
    """reward spec 'name:weight,...' from rewards.py, or proxy_nll (with --proxy-model) (default:
    verifiable 'correct:1.0,format:0.1'; continuation 'similarity' (mix by domain), or 'creative'
    when the data has no domain)"""
    num_generations: int = 8
    """G: completions per prompt (a group); a step trains on --batch-size x G completions"""
    max_completion_length: int | None = None
    """new tokens per completion, also dr_grpo's constant (default: 128 verifiable,
    --continuation-tokens for continuation, so completion and reference are windows of the same
    length)"""
    max_prompt_length: int = 1024
    """longest prompt in tokens; longer is an error"""
    temperature: float | None = None
    """sampling temperature; log-probs use the same T (default 0.5 toy, 1.0 hub model)"""
    top_p: float = 1.0
    """nucleus sampling"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group std, the batch std, or not at all (Dr. GRPO)"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """token aggregation: grpo per-sequence mean; bnpo micro-batch token mean; dr_grpo / (rows x
    max-completion-length); dapo / tokens of the whole generation batch"""
    epsilon: float = 0.2
    """clip range below: rho >= 1 - epsilon"""
    epsilon_high: float | None = None
    """clip range above (DAPO clip-higher: 0.28); default = --epsilon"""
    beta: float = 0.0
    """k3 KL coefficient against the reference (LoRA off); 0 skips the reference pass"""
    num_iterations: int = 1
    """optimizer steps per generation batch (mu); > 1 stores old log-probs and makes the ratio and
    clipping matter"""
    mask_truncated_completions: bool = False
    """drop completions that hit --max-completion-length from the loss"""
    update_all_rows: bool = False
    """forward/backward every completion in the update, also those with advantage 0 (without --beta
    they add exactly 0 to the gradient, so by default they are skipped except for bnpo; set it for
    like-for-like timings, or to log entropy over all completions)"""
    mara_tau: float | None = None
    """MARA reward threshold tau (needs --beta > 0); default: off"""
    proxy_model: str = ""
    """the proxy model of --reward proxy_nll: a hub id or model dir, or adapter dir(s) joined by '+'
    onto --model (toy: toy/story = the toy base fitted to stories); its own tokenizer scores the
    decoded text"""
    prefix_tokens: int = 96
    """continuation on documents ({'text'} rows, toy): prefix tokens"""
    continuation_tokens: int = 64
    """continuation on documents: reference tokens"""
    toy_difficulty: str = "3"
    """toy arithmetic level(s), comma-separated, for training and held-out accuracy"""
    eval_size: int = 200
    """held-out prompts"""
    eval_samples: int = 4
    """k: samples per held-out prompt at --temperature (Mean@k)"""
    eval_every: int = 0
    """evaluate every N steps (0 = before and after only)"""
    save_merged: bool = False
    """also save the merged full model to <out>/model"""


# {field: (toy, real model on one CUDA GPU)}. The real column is the QLoRA setup of the model card
# Lambent/Qwen3-4B-Base-Continued-GRPO (on a CPU lora.SMALL_DEVICE_SETUP replaces it); a warmup
# (TrainArgs's 10%) matters here: Adam's first steps move every LoRA weight by about lr whatever its
# gradient, and without warmup they undid the SFT model on the toy.
DEFAULTS = {
    "lr": (3e-4, 1e-5),
    "lora_r": (16, 128),
    "load_in_4bit": (False, True),
    "gradient_checkpointing": (False, True),
    "temperature": (0.5, 1.0),
}


def resolve_defaults(args: Args) -> Args:
    """Fill the defaults left None: DEFAULTS for the model and device, then those derived from
    other flags; reject settings GRPO cannot train with."""
    lora.fill_defaults(args, DEFAULTS)
    if args.max_completion_length is None:
        args.max_completion_length = 128 if args.task == "verifiable" else args.continuation_tokens
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    if args.init_adapter == "auto":
        toy_verifiable = args.model == "toy" and args.task == "verifiable"
        args.init_adapter = str(toy.SFT_ADAPTER_DIR) if toy_verifiable else ""
    if args.mara_tau is not None and args.beta <= 0:
        raise errors.ConfigError(
            "--mara-tau needs --beta > 0: MARA's bonus beta (log pi_ref(z) - log pi_ref(y)) is "
            "0 without it"
        )
    return args


def default_reward(args: Args, prompts: list[dict]) -> str:
    """--reward, else the task's default; every name is checked here, before any model runs."""
    spec = args.reward
    if not spec and args.task == "verifiable":
        spec = "correct:1.0,format:0.1"
    elif not spec:
        spec = "similarity" if all(p.get("domain") is not None for p in prompts) else "creative"
    rewards.check_spec(spec, objects=("proxy_nll",))
    uses_proxy = "proxy_nll" in dict(rewards.parse_reward_spec(spec))
    if uses_proxy != bool(args.proxy_model):
        raise errors.ConfigError(
            f"--reward {spec} with --proxy-model {args.proxy_model!r}: the proxy_nll reward and "
            "--proxy-model go together (the proxy scores each completion's likelihood)"
        )
    return spec


def reward_objects(args: Args, device) -> dict:
    """The rewards that are objects: proxy_nll's model (--proxy-model, on the policy's device, no
    gradients), or none."""
    if not args.proxy_model:
        return {}
    return {"proxy_nll": likelihood.ProxyNLLReward(args.proxy_model, device, base=args.model)}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def report(args: Args, spec: str, before: dict, last: dict, train_seconds: float, after: dict):
    """(GRPO's fields of summary.json, the results table): the held-out metric (accuracy when the
    prompts have gold answers, else the mean reward) before and after training."""
    metric = "accuracy" if "accuracy" in after else "mean_reward"
    note = f"Mean@{args.eval_samples} at T={args.temperature}"
    if args.data == "toy" and args.task == "verifiable":
        note += f", toy level(s) {args.toy_difficulty}"
    heldout = {"metric": metric, "before": before.get(metric), "after": after.get(metric)}
    table = {
        "task": args.task,
        **heldout,
        "reward (last step)": last.get("reward"),
        "train s": round(train_seconds),
    }
    fields = {"method": "grpo", "task": args.task, "reward": spec}
    return {**fields, "heldout": {**heldout, "note": note}}, table


def main(args: Args):
    args = resolve_defaults(args)
    run = lifecycle.start_run(args, args.resume, args.report_to)
    tokenizer = loading.load_tokenizer(args.model)
    train, heldout = tasks.rl_prompts(tokenizer, args)
    spec = default_reward(args, train)
    functions = reward_objects(args, run.device)
    # the reference policy (LoRA off) is the model with --init-adapter merged
    model = lora.load_policy(args, run.device)
    opt = lifecycle.adamw(lora.lora_parameters(model), args)

    heldout_eval = functools.partial(evaluate, model, tokenizer, heldout, spec, args, functions)
    start, state = lifecycle.begin_training(run, model, opt, heldout_eval, args.resume)
    state.setdefault("tokens_seen", 0)
    model.train()
    batch, t_train, last = None, 0.0, {}
    for step in lifecycle.training_steps(run, start, args, "grpo"):
        t0, t_rollout = time.perf_counter(), 0.0
        if step % args.num_iterations == 0 or batch is None:  # a batch lasts --num-iterations steps
            prompts, generator = lifecycle.step_batch(run, train, args, step // args.num_iterations)
            batch = rollout(model, tokenizer, prompts, spec, generator, args, functions)
            lifecycle.log_samples(run, step + 1, batch.samples)
            state["tokens_seen"] += batch.num_tokens * run.world
            t_rollout = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = update(model, batch, args, run.world)
        stats.update(opt(stats["loss"], step + 1))
        t_train += time.perf_counter() - t0
        last = {
            **batch.metrics,
            **stats,
            "learning_rate": opt.scheduler.get_last_lr()[0],
            "num_tokens": state["tokens_seen"],
            "step_time": time.perf_counter() - t0,
            "timing/rollout": t_rollout,
            "timing/update": time.perf_counter() - t1,
        }
        lifecycle.end_step(
            run,
            step + 1,
            last,
            model,
            opt,
            state,
            args,
            show={"reward": ".3f", "kl": ".3g", "eval/accuracy": ".3f"},
            evaluate=heldout_eval,
            can_save=(step + 1) % args.num_iterations == 0,  # never inside a generation batch
        )
    return lifecycle.finish_training(
        run,
        args,
        model,
        tokenizer,
        opt,
        state,
        last,
        t_train,
        evaluate=heldout_eval,
        report=functools.partial(report, args, spec, state["before"], last, t_train),
        merged=args.save_merged,
    )


if __name__ == "__main__":
    cli.run_cli(main, Args)
