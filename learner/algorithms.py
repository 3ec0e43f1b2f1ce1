"""Advantages, losses and KL estimators as small pure functions over tensors, chosen by name.

Shapes: B sequences, T completion tokens (right-padded); `mask` (B, T) is 1 on
real completion tokens. GRPO here departs from the paper in two stated ways:
the loss is averaged over all real tokens of the batch (token-level, as DAPO
argues) rather than per sequence, and the KL term is the k3 estimator against
a frozen reference, added to the loss (0 by default).
"""
from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(B,) rewards of consecutive groups -> (B,) advantages (r - mean_group) / (std_group + eps)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + eps)).view(-1)


ADVANTAGES = {"grpo": grpo_advantages}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, non-negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, token-level mean. logp/old_logp/mask: (B, T); advantages: (B,).

    old_logp are the sampler's logprobs, so the ratio also corrects for the
    engine/trainer mismatch and for staleness when max_staleness > 0.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "logprob_gap": masked_mean((logp - old_logp).abs(), mask),
        }
    return loss, stats


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy gradient plus kl_coef * k3 KL to the reference (token-level means)."""
    loss, stats = clipped_pg_loss(logp, old_logp, advantages, mask, clip_eps)
    if ref_logp is not None:
        kl = masked_mean(kl_k3(logp, ref_logp), mask)
        stats["kl"] = kl.detach()
        loss = loss + kl_coef * kl
    return loss, stats


LOSSES = {"grpo": grpo_loss}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets]: logits (B, T, V), targets (B, T) -> (B, T), in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
