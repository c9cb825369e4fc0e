"""GRPO: group-relative policy optimisation, with verifiable rewards or as continued pretraining.

For every prompt q the policy samples a group of G completions o_1..o_G at temperature T, and each
gets a reward r_i: a weighted sum of the reward functions of `rewards.py` (`--reward name:weight,...`).
The advantage compares a completion with its own group (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2):

    A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)     --scale-rewards group (Bessel-corrected std)
                                                       batch: the std of the whole batch; none: no division
                                                       (Dr. GRPO, arXiv 2503.20783, sec. 3.1)

and every completion token t is trained with PPO's clipped surrogate plus a k3 KL estimate to the
reference policy (the same model with LoRA switched off), computed by `kernels.policy_loss`:

    rho_t = exp(logp_t - logp_old_t)
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t,
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman 2020; unbiased, >= 0)

summed over tokens by `--loss-type` (grpo, bnpo, dr_grpo, dapo; see `aggregate_loss`). Log-probs
divide the logits by T, as the sampler did. With one update per batch logp_old = logp.detach(), so
rho = 1 and the logged loss is about 0 while the gradient is not: watch `reward`, not `loss`.
Without a KL term (beta = 0, the default) a completion of a group with identical rewards has A = 0
and adds exactly nothing, so the update skips it (`--update-all-rows` keeps it).

Continued pretraining (`--task continuation`, seed 000): the prompt is a document prefix, the
completion the policy's continuation, and the reward its similarity to the true continuation
(semantic similarity, chrF++, ROUGE-L, Levenshtein, a length penalty, mixed by content type:
`rewards.similarity`). Seed 000 trained Qwen3-4B-Base this way with QLoRA r=128, alpha=256.

MARA (`--mara-tau`, arXiv 2510.20817): the KL-regularised optimum pi_ref(y) exp(r(y)/beta) puts
its mass on one mode. Within a group, every sample with r >= tau gets the reward of the anchor z
(the high-reward sample most likely under pi_ref) plus beta (log pi_ref(z) - log pi_ref(y)), which
makes the optimum give all high-reward samples the same mass, so several modes stay alive.

Run:
    python sft_think.py && python grpo.py          # toy: arithmetic, starting from runs/sft_think
    python grpo.py --task continuation             # toy documents, similarity rewards, from the toy base
    python grpo.py --model Qwen/Qwen3-4B-Base --task continuation --data docs.jsonl   # QLoRA r=128 a=256
    torchrun --nproc_per_node 4 grpo.py --model Qwen/Qwen3-1.7B-Base --data math.jsonl \\
        --reward correct:1.0,format:0.1 --init-adapter runs/sft_think_qwen
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed
from tqdm import tqdm

import common
import lora
import rewards
import toy
from kernels import policy_loss


@dataclass
class Args:
    model: str = field(default="toy", metadata={"help": "hub id or local dir of a causal LM; 'toy' = the toy base"})
    task: Literal["verifiable", "continuation"] = field(default="verifiable", metadata={
        "help": "verifiable: prompts with answers; continuation: document prefixes, similarity to the true continuation"})
    data: str = field(default="toy", metadata={
        "help": "JSONL: {'prompt': str|messages, 'answer'?, 'reference'?, 'domain'?} or documents {'text', 'domain'?}; "
                "'toy' = toy arithmetic (verifiable) or toy documents (continuation)"})
    eval_data: str = field(default="", metadata={"help": "held-out JSONL of the same schema (default: toy test split, "
                                                         "or the last --eval-size rows of --data)"})
    init_adapter: str = field(default="auto", metadata={
        "help": "PEFT adapter merged into the model before a fresh LoRA is added (the reference policy is then the "
                "merged model); 'auto' = runs/sft_think for the toy verifiable task, none otherwise; '' = none"})
    reward: str = field(default="", metadata={
        "help": "reward spec 'name:weight,...' from rewards.py (default: verifiable 'correct:1.0,format:0.1'; "
                "continuation 'similarity' (mix by domain), or 'creative' when the data has no domain)"})
    out: str = field(default="runs/grpo", metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, LoRA init, sampling)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (AdamW); default 3e-4 toy, 1e-5 hub model"})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "share of steps with linear warmup from 0 (Adam's first steps move every LoRA weight by about lr "
                "whatever its gradient: without warmup they undid the SFT model on the toy)"})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "after warmup, cosine decay to this share of the peak LR (1.0 keeps it constant, as DAPO and verl do)"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps (a generation batch lasts --num-iterations steps)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch per device (x num-generations rows)"})
    num_generations: int = field(default=8, metadata={"help": "G: completions per prompt (a group)"})
    micro_batch_size: int = field(default=32, metadata={"help": "rows per forward/backward; gradients accumulate over "
                                                                "the generation batch's micro-batches"})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "new tokens per completion, also dr_grpo's constant (default: 128 verifiable, --continuation-tokens "
                "for continuation, so completion and reference are windows of the same length)"})
    max_prompt_length: int = field(default=1024, metadata={"help": "longest prompt in tokens; longer is an error"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature; log-probs use the same T "
                                                                     "(default 0.5 toy, 1.0 hub model)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={
        "help": "divide advantages by the group std, the batch std, or not at all (Dr. GRPO)"})
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(default="dapo", metadata={
        "help": "token aggregation: grpo per-sequence mean; bnpo micro-batch token mean; dr_grpo / (rows x "
                "max-completion-length); dapo / tokens of the whole generation batch"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range below: rho >= 1 - epsilon"})
    epsilon_high: float | None = field(default=None, metadata={"help": "clip range above (DAPO clip-higher: 0.28); "
                                                                       "default = --epsilon"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient against the reference (LoRA off); 0 skips "
                                                       "the reference pass"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps per generation batch (mu); > 1 stores "
                                                            "old log-probs and makes the ratio and clipping matter"})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "drop completions that hit --max-completion-length from the loss"})
    update_all_rows: bool = field(default=False, metadata={
        "help": "forward/backward every completion in the update, also those with advantage 0 (without --beta they add "
                "exactly 0 to the gradient, so by default they are skipped except for bnpo; set it for like-for-like "
                "timings, or to log entropy over all completions)"})
    mara_tau: float | None = field(default=None, metadata={
        "help": "MARA reward threshold tau (needs --beta > 0); off when unset"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 16 toy, 128 hub model as in seed 000)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank: 32 toy, 256 hub)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    load_in_4bit: bool | None = field(default=None, metadata={"help": "QLoRA NF4 base (default: on for a hub model)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "recompute activations in backward "
                                                                               "(default: on for a hub model)"})
    prefix_tokens: int = field(default=96, metadata={"help": "continuation on documents ({'text'} rows, toy): prefix tokens"})
    continuation_tokens: int = field(default=64, metadata={"help": "continuation on documents: reference tokens"})
    toy_difficulty: str = field(default="3", metadata={"help": "toy arithmetic level(s), comma-separated, for training "
                                                                "and held-out accuracy"})
    toy_train_size: int = field(default=4000, metadata={"help": "toy training prompts"})
    eval_size: int = field(default=200, metadata={"help": "held-out prompts"})
    eval_samples: int = field(default=4, metadata={"help": "k: samples per held-out prompt at --temperature (Mean@k)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0 = before and after only)"})
    log_completions: int = field(default=2, metadata={"help": "groups per step written to samples.jsonl"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (for --resume)"})
    save_merged: bool = field(default=False, metadata={"help": "also save the merged full model to <out>/model"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    report_to: str = field(default="", metadata={"help": "also log to wandb or trackio"})


def resolve_defaults(args: Args) -> Args:
    """Fill the model-dependent defaults: seed 000's QLoRA setup for a real model (any --model but 'toy': a hub id
    or a local directory), small and fast for the toy."""
    hub = args.model != "toy"
    if args.lr is None:
        args.lr = 1e-5 if hub else 3e-4
    if args.temperature is None:
        args.temperature = 1.0 if hub else 0.5
    if args.lora_r is None:
        args.lora_r = 128 if hub else 16
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_r
    if args.load_in_4bit is None:
        args.load_in_4bit = hub
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = hub
    if args.max_completion_length is None:
        args.max_completion_length = 128 if args.task == "verifiable" else args.continuation_tokens
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    if args.init_adapter == "auto":
        args.init_adapter = "runs/sft_think" if args.model == "toy" and args.task == "verifiable" else ""
    if args.num_generations < 2:
        raise ValueError("--num-generations must be >= 2: a group of one has no relative advantage")
    if args.mara_tau is not None and args.beta <= 0:
        raise ValueError("--mara-tau needs --beta > 0: MARA's bonus beta (log pi_ref(z) - log pi_ref(y)) is 0 without it")
    return args


# ---------------------------------------------------------------------------------------------
# Prompts: each row becomes {"ids": prompt token ids, "prompt": readable text, + reward columns}
# ---------------------------------------------------------------------------------------------

def render_prompt(prompt, tokenizer) -> str:
    """A list of messages goes through the chat template (generation prompt added); a string is used as is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_rows(rows: list[dict], tokenizer, args: Args, source: str) -> list[dict]:
    """Token ids and reward columns per row; errors name file:line and field."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}:{row.get('_line', i + 1)}"
        cols = {k: v for k, v in row.items() if k not in ("messages", "text", "_line")}
        if args.task == "continuation" and "text" in row and "prompt" not in row:
            # A plain document: cut by tokens into a prefix (the prompt) and the true continuation (the reference).
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            if len(ids) <= args.prefix_tokens:
                raise common.DataError(f"{where}: field 'text' has {len(ids)} tokens; the continuation task needs more "
                                       f"than --prefix-tokens {args.prefix_tokens}")
            prefix, ref = ids[: args.prefix_tokens], ids[args.prefix_tokens: args.prefix_tokens + args.continuation_tokens]
            cols.update(prompt=tokenizer.decode(prefix), reference=tokenizer.decode(ref))
            out.append({"ids": prefix, **cols})
            continue
        if "prompt" not in row:
            raise common.DataError(f"{where}: field 'prompt' missing (present: {', '.join(sorted(row))})")
        if args.task == "continuation" and row.get("reference") is None:
            raise common.DataError(f"{where}: field 'reference' missing: the continuation task scores similarity to it")
        text = render_prompt(row["prompt"], tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > args.max_prompt_length:
            raise common.DataError(f"{where}: field 'prompt' has {len(ids)} tokens (allowed 1..{args.max_prompt_length})")
        cols["prompt"] = text
        out.append({"ids": ids, **cols})
    return out


def load_prompts(args: Args, tokenizer) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompts (toy world by default)."""
    if args.data == "toy":
        if args.task == "verifiable":
            make = lambda split, n: [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                     for r in toy.arithmetic(split, n, seed=args.seed, difficulty=toy.parse_levels(args.toy_difficulty))]
        else:
            make = lambda split, n: toy.documents(split, n, seed=args.seed)  # cut by tokens in encode_rows
        return (encode_rows(make("train", args.toy_train_size), tokenizer, args, "toy"),
                encode_rows(make("test", args.eval_size), tokenizer, args, "toy"))
    rows = [{**r, "_line": i + 1} for i, r in enumerate(common.load_rows(args.data))]
    if args.eval_data:
        held = [{**r, "_line": i + 1} for i, r in enumerate(common.load_rows(args.eval_data, split="test"))]
        held = held[: args.eval_size]
        return encode_rows(rows, tokenizer, args, args.data), encode_rows(held, tokenizer, args, args.eval_data)
    n_eval = max(1, min(args.eval_size, len(rows) // 10))
    if len(rows) <= n_eval:
        raise common.DataError(f"{args.data}: {len(rows)} rows; need more than {n_eval} to hold some out (or pass --eval-data)")
    return (encode_rows(rows[: len(rows) - n_eval], tokenizer, args, args.data),
            encode_rows(rows[len(rows) - n_eval:], tokenizer, args, args.data))


def default_reward(args: Args, prompts: list[dict]) -> str:
    if args.reward:
        return args.reward
    if args.task == "verifiable":
        return "correct:1.0,format:0.1"
    return "similarity" if all(p.get("domain") is not None for p in prompts) else "creative"


def reward_columns(rows: list[dict], repeat: int) -> dict[str, list]:
    """Every data column except the token ids, one entry per completion (TRL passes columns the same way)."""
    keys = sorted({k for r in rows for k in r if k != "ids"})
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids: the tokenizer's and the model's, plus Qwen3's end-of-turn and end-of-text tokens when present."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# The GRPO pieces with a formula each (tests import them)
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards_: torch.Tensor, G: int, scale: str, batch_std: torch.Tensor | None = None):
    """A_i = r_i - mean_group(r), divided by (std + 1e-4) per --scale-rewards; also the zero-std-group flag per row.
    A group of identical rewards gets advantages of exactly 0 (not the rounding residue of r - mean)."""
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


def mara_rewards(rewards_: torch.Tensor, seq_ref_logp: torch.Tensor, G: int, tau: float, beta: float):
    """MARA (arXiv 2510.20817): per group, samples with r >= tau get R(z) + beta (log pi_ref(z) - log pi_ref(y)),
    z = the sample with r >= tau of highest log pi_ref. Returns the new rewards and which rows were anchored."""
    r, lp = rewards_.view(-1, G), seq_ref_logp.view(-1, G)
    high = r >= tau
    z = lp.masked_fill(~high, float("-inf")).argmax(1, keepdim=True)
    anchored = r.gather(1, z) + beta * (lp.gather(1, z) - lp)
    return torch.where(high, anchored, r).reshape(-1), high.reshape(-1)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
                   batch_rows: int | None = None, num_micro_batches: int = 1, global_tokens: float | None = None,
                   world_size: int = 1) -> torch.Tensor:
    """One micro-batch's share of the loss. Summed over the micro-batches of a generation batch of `batch_rows`
    rows (and with gradients averaged over ranks) it is the objective of `loss_type` (REFERENCE "GRPO"):

        grpo    : mean over sequences of  sum_t L M / sum_t M                 (DeepSeekMath, eq. 3)
        bnpo    : sum L M / sum M over each micro-batch, mean over micro-batches
        dr_grpo : sum L M / (rows x max_completion_length)                    (Dr. GRPO: no length bias)
        dapo    : sum L M / (completion tokens of the generation batch on all ranks)   (DAPO, eq. 8)
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
        # all_reduce_gradients averages over ranks, so x world_size makes the normaliser the global token count
        return lm.sum() * world_size / max(tokens, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}: choose grpo, bnpo, dr_grpo or dapo")


def reward_gate(primary: torch.Tensor, G: int, success: float = 0.5, near_zero: float = 0.05) -> dict[str, float]:
    """Group statistics of the first reward (seed 004's reward gate): mixed groups carry the learning signal."""
    g = primary.view(-1, G)
    ok = g >= success
    return {"gate/mixed_groups": (ok.any(1) & ~ok.all(1)).float().mean().item(),
            "gate/all_zero_groups": (g.abs() <= 1e-6).all(1).float().mean().item(),
            "gate/all_one_groups": (g >= 1 - 1e-6).all(1).float().mean().item(),
            "gate/near_zero_groups": (g.mean(1) < near_zero).float().mean().item(),
            "gate/any_success_groups": ok.any(1).float().mean().item()}


def distinct2_within_groups(token_rows: list[list[int]], G: int) -> float:
    """distinct-2 over model tokens per group (unique bigrams / bigrams of its G completions), mean over groups."""
    vals = []
    for s in range(0, len(token_rows), G):
        grams = [tuple(t[i:i + 2]) for t in token_rows[s:s + G] for i in range(len(t) - 1)]
        if grams:
            vals.append(len(set(grams)) / len(grams))
    return sum(vals) / len(vals) if vals else 0.0


def micro_batch(roll: common.Rollout, rows: slice) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids, attention_mask and completion width K of some rollout rows, without the columns that are padding
    in every one of them (left of the prompts, right of the completions): less compute, same log-probs."""
    pm, cm = roll.prompt_mask[rows], roll.completion_mask[rows]
    left = int((pm.sum(0) == 0).long().cumprod(0).sum())
    width = max(1, int(cm.sum(1).max()))
    ids = torch.cat([roll.prompt_ids[rows, left:], roll.completion_ids[rows, :width]], 1)
    return ids, torch.cat([pm[:, left:], cm[:, :width]], 1), width


# ---------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tokenizer, heldout: list[dict], spec: str, args: Args, eos: list[int]) -> dict:
    """Mean reward of --eval-samples samples per held-out prompt at the training temperature, with a fixed
    generator (the same draws before and after training). verifiable also reports `accuracy` (Mean@k: the
    share of correct samples, the policy's own accuracy), `pass_at_k` and greedy accuracy."""
    device = next(model.parameters()).device
    n = args.eval_samples
    gen = torch.Generator(device=device).manual_seed(args.seed + 12345)
    roll = common.sample(model, tokenizer, [p["ids"] for p in heldout], n=n, max_new_tokens=args.max_completion_length,
                         temperature=args.temperature, top_p=args.top_p, generator=gen,
                         eos_token_ids=eos, batch_size=128)
    texts = roll.texts(tokenizer)
    cols = reward_columns(heldout, n)
    total, per_fn = rewards.compute_rewards(spec, texts, cols)
    row = {"mean_reward": sum(total) / len(total), "mean_length": float(roll.completion_mask.sum(1).float().mean()),
           "distinct_2": rewards.distinct_n(texts, 2)}
    if args.task == "verifiable" and "answer" in cols:
        # Prompts without a gold answer (rewards.correct gives None) are left out of the accuracies, not counted wrong.
        res = rewards.correct(texts, cols["answer"], cols.get("style"))
        graded = [g for g in (res[i: i + n] for i in range(0, len(res), n)) if g[0] is not None]
        greedy = common.sample(model, tokenizer, [p["ids"] for p in heldout], n=1,
                               max_new_tokens=args.max_completion_length, greedy=True, eos_token_ids=eos,
                               batch_size=128)
        cols1 = reward_columns(heldout, 1)
        res1 = [v for v in rewards.correct(greedy.texts(tokenizer), cols1["answer"], cols1.get("style")) if v is not None]
        if graded:
            row["accuracy"] = sum(v for g in graded for v in g) / (len(graded) * n)  # Mean@k
            row["pass_at_k"] = sum(any(v > 0 for v in g) for g in graded) / len(graded)
            row["greedy_accuracy"] = sum(res1) / len(res1)
            row["graded_prompts"] = len(graded)
    row["_samples"] = [{"prompt": c, "completion": t, "reward": r}
                       for c, t, r in zip(cols["prompt"][:: n][:10], texts[:: n][:10], total[:: n][:10])]
    return row


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(args: Args):
    t_start = time.perf_counter()
    args = resolve_defaults(args)
    rank, world, local_rank = common.init_distributed()
    common.set_seed(args.seed)
    device = common.pick_device(args.device, local_rank)
    out = common.prepare_out_dir(args.out, args, resume=args.resume)
    tokenizer = common.load_tokenizer(args.model)
    model = common.load_model(args.model, device=device, load_in_4bit=args.load_in_4bit,
                              gradient_checkpointing=args.gradient_checkpointing)
    if args.init_adapter:
        if not (Path(args.init_adapter) / lora.WEIGHTS_NAME).is_file():
            hint = " Run `python sft_think.py` first (it writes runs/sft_think)," if args.init_adapter == "runs/sft_think" \
                else ""
            raise FileNotFoundError(f"--init-adapter {args.init_adapter}: no {lora.WEIGHTS_NAME} there.{hint} or pass "
                                    f"--init-adapter '' to start from the model itself.")
        # Fold the SFT adapter into the weights: the starting checkpoint becomes the reference policy (LoRA off).
        lora.merge(lora.load_adapter(model, args.init_adapter))
    lora.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    params = lora.lora_parameters(model)
    common.broadcast_parameters(params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = common.cosine_schedule(optimizer, int(args.warmup_ratio * args.max_steps), args.max_steps,
                                         min_ratio=args.min_lr_ratio)
    logger = common.MetricsLogger(out, report_to=args.report_to or None)

    train, heldout = load_prompts(args, tokenizer)
    spec = default_reward(args, train)
    reward_names = [n for n, _ in rewards.parse_reward_spec(spec)]
    eos = stop_token_ids(model, tokenizer)
    G, C = args.num_generations, args.max_completion_length
    need_ref = args.beta > 0 or args.mara_tau is not None

    state = common.load_checkpoint(out, model, optimizer, scheduler) if args.resume else None
    start = state["step"] if state else 0
    before = state["data_state"]["before"] if state else None
    if before is None and common.is_main():
        before = evaluate(model, tokenizer, heldout, spec, args, eos)
        samples = before.pop("_samples")
        common.write_jsonl(out / "samples.jsonl", [{"split": "heldout", "stage": "before", "step": 0, **s} for s in samples])
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})

    # Each rank draws its own prompts: one seeded order per epoch, rank r takes every world-th prompt of a step.
    per_gen = args.batch_size * world
    epoch_len = max(1, len(train) // per_gen)

    def prompts_for(gen_index: int) -> list[dict]:
        epoch, pos = divmod(gen_index, epoch_len)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
        return [train[i] for i in order[pos * per_gen: (pos + 1) * per_gen][rank::world]]

    model.train()
    batch, t_train, tokens_seen, last = None, 0.0, 0, {}
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="grpo", disable=not common.is_main())
    for step in bar:
        t0, t_rollout = time.perf_counter(), 0.0
        # ---- 1. Rollout: G completions per prompt, rewards, advantages (once per --num-iterations steps) ----
        if step % args.num_iterations == 0 or batch is None:
            prompts = prompts_for(step // args.num_iterations)
            gen = torch.Generator(device=device).manual_seed(args.seed * 100003 + (step // args.num_iterations) * world + rank)
            roll = common.sample(model, tokenizer, [p["ids"] for p in prompts], n=G, max_new_tokens=C,
                                 temperature=args.temperature, top_p=args.top_p, generator=gen, eos_token_ids=eos)
            texts = roll.texts(tokenizer)
            total, per_fn = rewards.compute_rewards(spec, texts, reward_columns(prompts, G))
            r = torch.tensor(total, dtype=torch.float32)
            # The loss mask: 1 up to and including the first EOS (from the sampler, never from the pad id);
            # --mask-truncated-completions also drops completions that never ended (DAPO's overlong filtering).
            mask = roll.completion_mask.clone()
            if args.mask_truncated_completions:
                mask = mask * roll.finished[:, None].long()
            R = roll.completion_ids.shape[0]
            chunks = [slice(s, min(s + args.micro_batch_size, R)) for s in range(0, R, args.micro_batch_size)]

            # Reference (LoRA off) and old-policy log-probs, without gradients, before any update on this batch.
            def logprobs_no_grad() -> torch.Tensor:
                full = torch.zeros(R, C, device=device)
                for c in chunks:
                    ids, attn, K = micro_batch(roll, c)
                    full[c, :K] = common.sequence_logprobs(model, ids, attn, K, temperature=args.temperature)
                return full

            ref_logp = old_logp = None
            with torch.no_grad():
                if need_ref:
                    with lora.disabled(model):
                        ref_logp = logprobs_no_grad()
                if args.num_iterations > 1:
                    old_logp = logprobs_no_grad()
            mara_info = {}
            if args.mara_tau is not None:
                seq_ref = (ref_logp * roll.completion_mask).sum(-1).cpu()
                r, anchored = mara_rewards(r, seq_ref, G, args.mara_tau, args.beta)
                mara_info = {"mara/anchored_frac": anchored.float().mean().item(), "mara/reward": r.mean().item()}

            batch_std = None
            if args.scale_rewards == "batch":  # the std of the global batch: sums over ranks
                s = common.all_reduce_sum(torch.tensor([r.sum(), (r * r).sum(), r.numel()], dtype=torch.float64))
                batch_std = torch.sqrt((s[1] - s[0] ** 2 / s[2]) / (s[2] - 1).clamp(min=1)).float()
            adv, zero_std = group_advantages(r, G, args.scale_rewards, batch_std)
            adv = adv.to(device)
            global_tokens = float(common.all_reduce_sum(mask.sum().float().cpu()))
            tokens = [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]
            lengths = roll.completion_mask.sum(1).float()
            roll_metrics = {
                **rewards.reward_metrics(total, per_fn), **mara_info,
                "frac_reward_zero_std": zero_std.float().mean().item(),
                **reward_gate(torch.tensor([v if v is not None else 0.0 for v in per_fn[reward_names[0]]]), G),
                "diversity/distinct_2": distinct2_within_groups(tokens, G),
                "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                "completions/max_length": lengths.max().item(),
                "completions/clipped_ratio": (~roll.finished).float().mean().item(),
            }
            tokens_seen += int(roll.attention_mask.sum())
            t_rollout = time.perf_counter() - t0
            # A completion whose advantage is 0 (its group's rewards are all equal) adds exactly 0 to the clipped
            # objective, and the normalisers of grpo, dr_grpo and dapo do not depend on which rows are in a
            # micro-batch: without a KL term the update skips those rows (same gradient, less compute).
            # bnpo normalises per micro-batch, so it keeps every row. Entropy and ratio metrics are over the rows updated.
            keep_all = args.update_all_rows or args.beta > 0 or args.loss_type == "bnpo"
            live = torch.arange(R) if keep_all else (adv != 0).nonzero().view(-1).cpu()
            update_chunks = [live[s:s + args.micro_batch_size] for s in range(0, len(live), args.micro_batch_size)]
            batch = (roll, mask, adv, ref_logp, old_logp, update_chunks, R)
            if common.is_main():
                rows = [{"split": "train", "step": step + 1, "prompt": prompts[i // G]["prompt"], "completion": texts[i],
                         "reward": total[i], "rewards": {n: per_fn[n][i] for n in reward_names},
                         "advantage": float(adv[i]), "finished": bool(roll.finished[i])}
                        for i in range(min(R, args.log_completions * G))]
                for row in rows:
                    common.append_jsonl(out / "samples.jsonl", row)

        # ---- 2. Policy update: micro-batches, gradient accumulation, one optimizer step ----
        t1 = time.perf_counter()
        roll, mask, adv, ref_logp, old_logp, update_chunks, R = batch
        sums = torch.zeros(7, dtype=torch.float64)  # loss, kl, entropy, low, high, ratio, tokens
        ratio_min, ratio_max = float("inf"), float("-inf")
        for c in update_chunks:
            ids, attn, K = micro_batch(roll, c)
            m = mask[c, :K]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logp, entropy = common.sequence_logprobs(model, ids, attn, K, temperature=args.temperature,
                                                         return_entropy=True)
            old = old_logp[c, :K] if old_logp is not None else logp.detach()  # one step per batch: rho = 1
            ref = ref_logp[c, :K] if ref_logp is not None else None
            per_token, kl, low, high = policy_loss(logp, old, ref, adv[c], m, eps_low=args.epsilon,
                                                   eps_high=args.epsilon_high, beta=args.beta)
            loss = aggregate_loss(per_token, m, args.loss_type, C, batch_rows=R, num_micro_batches=len(update_chunks),
                                  global_tokens=global_tokens, world_size=world)
            loss.backward()
            mf = m.float()
            ratio = torch.exp(logp.detach() - old)
            if mf.sum() > 0:
                ratio_min = min(ratio_min, float(ratio[m.bool()].min()))
                ratio_max = max(ratio_max, float(ratio[m.bool()].max()))
            sums += torch.tensor([float(loss.detach()), float((kl * mf).sum()), float((entropy.detach() * mf).sum()),
                                  float((low * mf).sum()), float((high * mf).sum()), float((ratio * mf).sum()),
                                  float(mf.sum())], dtype=torch.float64)
        for p in params:  # every row skipped: a zero gradient, so Adam's moments still step as they would
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        common.all_reduce_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        t_update = time.perf_counter() - t1

        # ---- 3. Logging (TRL's names), evaluation, checkpoints ----
        sums = common.all_reduce_sum(sums)
        n_tok = max(float(sums[6]), 1.0)
        last = {**roll_metrics, "loss": float(sums[0]) / world,
                "kl": float(sums[1]) / n_tok, "entropy": float(sums[2]) / n_tok,
                "clip_ratio/low_mean": float(sums[3]) / n_tok, "clip_ratio/high_mean": float(sums[4]) / n_tok,
                "clip_ratio/region_mean": float(sums[3] + sums[4]) / n_tok,
                "ratio/mean": float(sums[5]) / n_tok,
                "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                "num_tokens": tokens_seen * world, "step_time": time.perf_counter() - t0,
                "timing/rollout": t_rollout,  # 0 on steps that reuse a stored generation batch
                "timing/update": t_update}
        if ratio_min <= ratio_max:  # rank 0's extremes; absent when every completion was masked out
            last.update({"ratio/min": ratio_min, "ratio/max": ratio_max})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps and common.is_main():
            ev = evaluate(model, tokenizer, heldout, spec, args, eos)
            ev.pop("_samples")
            last.update({f"eval/{k}": v for k, v in ev.items()})
        logger.log(step + 1, last)
        bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.3g}",
                        **({"acc": f"{last['eval/accuracy']:.3f}"} if "eval/accuracy" in last else {}))
        at_boundary = (step + 1) % args.num_iterations == 0  # a checkpoint never splits a generation batch
        if args.save_every and (step + 1) % args.save_every == 0 and at_boundary and step + 1 < args.max_steps:
            common.save_checkpoint(out, step + 1, model, optimizer, scheduler, data_state={"before": before})

    # ---- Final evaluation, adapter, summary ----
    # Ranks must hold the same adapter (same start, same averaged gradients); measure it so users can read it.
    rank_diff = 0.0
    if world > 1:
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        first = flat.clone()
        torch.distributed.broadcast(first, src=0)
        rank_diff = float(common.all_reduce_sum((flat - first).abs().max().cpu()))
    summary = {}
    if common.is_main():
        after = evaluate(model, tokenizer, heldout, spec, args, eos)
        samples = after.pop("_samples")
        for s in samples:
            common.append_jsonl(out / "samples.jsonl", {"split": "heldout", "stage": "after", "step": args.max_steps, **s})
        logger.log(args.max_steps, {f"eval/{k}": v for k, v in after.items()})
        lora.save_adapter(model, str(out), base_model_name_or_path=None if args.model == "toy" else args.model)
        if args.save_merged:
            lora.merge(model).save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
        metric = "accuracy" if "accuracy" in after else "mean_reward"  # verifiable data with gold answers
        summary = {
            "method": "grpo", "task": args.task, "reward": spec, "init_adapter": args.init_adapter or None,
            "heldout": {"metric": metric, "before": before.get(metric), "after": after.get(metric),
                        "note": (f"Mean@{args.eval_samples} at T={args.temperature}"
                                 + (f", level{'s' * (',' in args.toy_difficulty)} {args.toy_difficulty}" if args.data == "toy" and args.task == "verifiable"
                                    else ""))},
            "before": before, "after": after, "final": last, "train_seconds": t_train,
            "wall_seconds": time.perf_counter() - t_start, "num_tokens": tokens_seen * world,
            "peak_memory_mb": common.peak_memory_mb(device), "world_size": world,
            "rank_param_max_diff": rank_diff, "args": asdict(args),
        }
        common.atomic_write_json(out / "summary.json", summary)
        print(f"\n| task | metric | before | after | reward (last step) | train s | wall s |\n|---|---|---|---|---|---|---|\n"
              f"| {args.task} | {metric} | {before.get(metric):.4f} | {after.get(metric):.4f} | "
              f"{last.get('reward', float('nan')):.4f} | {t_train:.0f} | {summary['wall_seconds']:.0f} |")
    logger.close()
    common.cleanup_distributed()
    return summary


if __name__ == "__main__":
    main(common.parse_args(Args))
