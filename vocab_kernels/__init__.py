"""Memory-lean token log-probs, entropy and GKD's generalized JSD, never holding [N, V] at once.

Full-vocabulary logits are where RL and distillation spend their memory: for Qwen3 (V = 151,936),
16 rollouts x 1,024 tokens of logits are 5 GB in bf16 and 10 GB as the fp32 copy naive code makes.
These ops walk the vocabulary in blocks (online log-sum-exp) and the rows in chunks, and recompute
the softmax in backward from one saved log-sum-exp per row.

Backends, same signatures and results:
- Triton (`vocab_kernels/triton_kernels.py`) for CUDA tensors, or for any tensor when
  TRITON_INTERPRET=1 is set
  (the Triton CPU interpreter; set it before triton is first imported);
- plain PyTorch (`vocab_kernels/reference.py`) otherwise, chunked the same way so CPU memory stays
  bounded.
Outputs and accumulation are fp32 whatever the input dtype (fp32, bf16, fp16).

Importing this package is cheap and has no side effects: triton is imported on first use. (It is not
called `kernels`: that name belongs to a PyPI package transformers imports, which ours would
shadow.)
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["token_logprobs", "linear_token_logprobs", "generalized_jsd", "linear_generalized_jsd"]

_warned_interpreter_on_cuda = False


def _backend(*tensors: torch.Tensor | None):
    """The Triton module for CUDA tensors or under TRITON_INTERPRET=1, else the PyTorch
    reference."""
    global _warned_interpreter_on_cuda
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and on_cuda and not _warned_interpreter_on_cuda:
        _warned_interpreter_on_cuda = True
        warnings.warn(
            "vocab_kernels: TRITON_INTERPRET=1 is set, so the Triton kernels run in the CPU "
            "interpreter "
            "(tensors are copied to the host and back), far slower than compiled kernels on the "
            "GPU; "
            "unset TRITON_INTERPRET before starting Python to compile them",
            RuntimeWarning,
            stacklevel=3,
        )
    if interpret or on_cuda:
        from vocab_kernels import triton_kernels

        return triton_kernels
    from vocab_kernels import reference

    return reference


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log softmax(logits / T) at the target token, per row; optionally the entropy of that softmax.

    logits [..., V] (any float dtype), targets [...] integer ids. Returns logp [...] fp32, or
    (logp, entropy) when `return_entropy`. Both are differentiable w.r.t. logits. Targets outside
    [0, V) (an ignore index such as -100) give logp 0 and no gradient.
    """
    return _backend(logits).token_logprobs(logits, targets, temperature, return_entropy)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    weight_grad_rows: torch.Tensor | None = None,
):
    """token_logprobs(hidden @ weight.T, targets) without ever holding the [N, V] logits.

    hidden [N, H] final hidden states, weight [V, H] the LM head, targets [N]. Rows go through in
    chunks of `chunk_size` (default: a power of two with at most 2^27 logits, 512 rows at Qwen3's
    vocab); only per-row log-sum-exp (and entropy) are kept. Differentiable w.r.t. hidden and
    weight. With a frozen LM head (weight.requires_grad False) the hidden-state gradient is computed
    during the forward pass (no recompute: 2 GEMMs in all, like naive autograd); otherwise backward
    recomputes each chunk's logits (4 GEMMs against naive's 3). GEMMs run in fp32 on CPU, in the
    inputs' dtype on CUDA (the weight gradient accumulates in fp32 on both). `weight_grad_rows` (1-D
    integer tensor of row ids, e.g. the few embedding rows being trained): the weight gradient is
    computed for those rows only (a [k, H] GEMM per chunk instead of [V, H]; for k <= H also without
    the recompute) and is zero elsewhere; the hidden-state gradient is unchanged. Targets outside
    [0, V) give logp 0 and no gradient.
    """
    return _backend(hidden, weight).linear_token_logprobs(
        hidden, weight, targets, temperature, return_entropy, chunk_size, weight_grad_rows
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token generalized JSD of GKD (Agarwal et al. 2023), P = teacher, Q = student, both at T:

    beta KL(P||M) + (1 - beta) KL(Q||M), M = beta P + (1 - beta) Q; beta 0 is KL(P||Q) (forward) and
    beta 1 is KL(Q||P) (reverse), as TRL special-cases them. Logits [..., V]; returns [...] fp32,
    differentiable w.r.t. the student logits (the teacher gets no gradient).
    """
    return _backend(student_logits).generalized_jsd(
        student_logits, teacher_logits, beta, temperature
    )


def linear_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T) in row
    chunks.

    Hidden states [N, H_s] / [N, H_t], LM heads [V, H_s] / [V, H_t]. Returns [N] fp32,
    differentiable w.r.t. student_hidden and student_weight.
    """
    return _backend(student_hidden, student_weight).linear_generalized_jsd(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        beta,
        temperature,
        chunk_size,
    )
