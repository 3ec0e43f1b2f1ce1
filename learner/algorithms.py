"""Advantages, losses and KL estimators as small pure functions over tensors, chosen by name.

Shapes: B sequences, T completion tokens (right-padded); `mask` (B, T) is 1 on
real completion tokens; rewards and advantages are (B,), with the n traces of a
group consecutive. Departures from the papers, stated:
- GRPO uses the population std of the group (unbiased=False) and eps=1e-6.
- The default aggregation is "token_mean" over the whole batch (DAPO); GRPO's
  original per-sequence mean is "seq_mean"; Dr. GRPO's "seq_sum" divides token
  sums by a constant (the generation budget) instead of each length.
- KL is a loss term against a frozen reference, with k1/k2/k3 estimators, or (PPO) a
  per-token reward penalty folded into GAE.
- PPO's GAE advantages are whitened over the real tokens of the whole batch, every rank's (learner.py).
- DPO/IPO log-probabilities are sums over the whole completion: thought and response.
"""
from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: r - mean_group, no std division (which over-weights easy and hard prompts)."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean of the other n-1 rewards of its group."""
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (baseline variant): subtract the group mean, then normalise by the whole batch's std."""
    centred = dr_grpo_advantages(rewards, group_size)
    return (centred - centred.mean()) / (centred.std(unbiased=False) + eps)


ADVANTAGES = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm: float) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar, as a SUM over this micro-batch divided by `norm`.

    token_mean: norm is the batch's real-token count. seq_mean: each row's mean, norm is the
    batch's sequence count. seq_sum: token sums, norm is sequences x generation budget (Dr. GRPO).
    Summing over micro-batches then gives exactly the whole batch's loss.
    """
    if mode == "seq_mean":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / norm
    if mode in ("token_mean", "seq_sum"):
        return (per_token * mask).sum() / norm
    raise ValueError(f"unknown loss aggregation {mode!r}")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi. k1: log ratio (unbiased, high variance);
    k2: half squared log ratio; k3: exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_pg_per_token(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with DAPO's asymmetric range [1 - clip_low, 1 + clip_high]
    and optional dual clip (negative advantages: loss bounded by dual_clip * |A|). Returns (loss, clipped?)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # per sequence (B,) or per token (B, T)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss, (clipped > unclipped).float()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    norm: float,
    aggregation: str = "token_mean",
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    behaviour_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy gradient plus kl_coef x KL to the reference minus entropy_coef x entropy, aggregated
    as `aggregation`. Advantages are per sequence (B,) or per token (B, T).

    old_logp are the sampler's logprobs, so the ratio also corrects for the engine/trainer
    mismatch and for staleness when max_staleness > 0. With `tis_cap`, old_logp is the learner's own (proximal)
    log p and each token's loss is weighted by min(exp(old_logp - behaviour_logp), tis_cap): truncated importance
    sampling from the sampler's policy (behaviour_logp) to the proximal one.
    """
    per_token, was_clipped = clipped_pg_per_token(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
    stats = {}
    if tis_cap is not None and behaviour_logp is not None:
        raw = torch.exp(old_logp.detach() - behaviour_logp)
        weight = raw.clamp(max=tis_cap)
        per_token = per_token * weight
        stats["tis_weight"] = masked_mean(weight, mask)
        stats["tis_truncated"] = masked_mean((raw > tis_cap).float(), mask)
    if ref_logp is not None and kl_coef:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    if entropy is not None:
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
        stats["entropy"] = masked_mean(entropy.detach(), mask)
    loss = aggregate(per_token, mask, aggregation, norm)
    with torch.no_grad():
        stats["clip_frac"] = masked_mean(was_clipped, mask)
        stats["logprob_gap"] = masked_mean((logp - old_logp).abs(), mask)
        stats["ratio_mean"] = masked_mean(torch.exp(logp - old_logp), mask)
    return loss, stats


def grpo_loss(logp, old_logp, advantages, mask, clip_eps, ref_logp=None, kl_coef=0.0):
    """GRPO as usually written: symmetric clip, token-level mean over the given tokens, k3 KL."""
    return policy_loss(logp, old_logp, advantages, mask, clip_low=clip_eps, clip_high=clip_eps,
                       norm=float(mask.sum().clamp(min=1)), ref_logp=ref_logp, kl_coef=kl_coef)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits): logits (B, T, V) -> (B, T), in nats."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded completions. token_rewards, values, mask: (B, T);
    values[t] is V of the state before token t. Past the last real token V = 0. Returns (advantages, returns)."""
    B, T = token_rewards.shape
    values = values * mask
    advantages = torch.zeros_like(token_rewards)
    running = torch.zeros(B, dtype=token_rewards.dtype)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=values.dtype)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def value_loss_per_token(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                         clip: float | None) -> torch.Tensor:
    """PPO's clipped value loss, 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2) per token."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss


def preference_pairs(rewards: torch.Tensor, group_size: int) -> list[tuple[int, int]]:
    """(chosen, rejected) row indices per group: its highest and its lowest reward (first on ties);
    a group whose rewards are all equal gives no pair."""
    pairs = []
    for g, row in enumerate(rewards.view(-1, group_size)):
        hi, lo = int(torch.argmax(row)), int(torch.argmin(row))
        if row[hi] > row[lo]:
            pairs.append((g * group_size + hi, g * group_size + lo))
    return pairs


def preference_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
                    ref_rejected_logp: torch.Tensor, beta: float, kind: str = "dpo") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO or IPO loss from sequence log-probabilities (P,), and the implicit reward margin.

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)).
    dpo: -log sigmoid(beta * h). ipo: (h - 1 / (2 beta))^2.
    """
    h = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    if kind == "dpo":
        loss = -torch.nn.functional.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    return loss, beta * h


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets]: logits (B, T, V), targets (B, T) -> (B, T); half precision is upcast to float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

