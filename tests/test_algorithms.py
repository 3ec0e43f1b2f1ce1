"""The algorithms against hand-computed values, in float64."""
import math

import pytest
import torch

from scratchpad.learner.algorithms import (
    aggregate, dr_grpo_advantages, entropy_from_logits, gae_advantages, grpo_advantages, grpo_loss, kl_estimate,
    policy_loss, preference_loss, preference_pairs, reinforce_pp_advantages, rloo_advantages, token_logprobs,
    value_loss_per_token,
)



@pytest.fixture(autouse=True)
def float64():
    """Every test in this file computes in float64; the default goes back after each, so no other file inherits it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(rewards, group_size=4, eps=0.0 + 1e-12)
    # group 1: mean 0.5, population std 0.5 -> +-1; group 2: all equal -> 0
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-9)


def test_clipped_loss_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.9)]])
    old = torch.tensor([[math.log(0.25), math.log(0.9)]])
    mask = torch.tensor([[1.0, 1.0]])
    adv = torch.tensor([2.0])
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 1: ratio 2 -> clipped to 1.2 -> -2.4; token 2: ratio 1 -> -2; mean -2.2
    assert math.isclose(loss.item(), -2.2, rel_tol=1e-12)
    assert math.isclose(stats["clip_frac"].item(), 0.5)


def test_negative_advantage_takes_the_pessimistic_side():
    logp, old = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    loss, _ = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert math.isclose(loss.item(), 2.0, rel_tol=1e-12)  # max(2 * 1, 1.2 * 1): the unclipped, larger penalty


def test_kl_k3_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # delta = log 0.5 - ... = ln(0.25/0.5) = -ln 2; k3 = e^delta - delta - 1 = 0.5 + ln2 - 1
    assert math.isclose(kl_estimate(logp, ref, "k3").item(), 0.5 + math.log(2) - 1, rel_tol=1e-12)
    assert kl_estimate(logp, logp, "k3").item() == 0.0


def test_grpo_loss_recomputed_independently():
    gen = torch.Generator().manual_seed(0)
    B, T, G = 8, 5, 4
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + (torch.rand(B, T, generator=gen) - 0.5) * 0.6
    ref = logp + (torch.rand(B, T, generator=gen) - 0.5) * 0.4
    mask = (torch.rand(B, T, generator=gen) > 0.2).double()
    rewards = torch.rand(B, generator=gen)
    eps, beta = 0.2, 0.05
    adv = grpo_advantages(rewards, G)
    loss, _ = grpo_loss(logp, old, adv, mask, eps, ref, beta)
    # Independent loop over tokens.
    total, count = 0.0, 0.0
    for i in range(B):
        g = i // G
        rs = [rewards[j].item() for j in range(g * G, g * G + G)]
        mean = sum(rs) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / G)
        a = (rewards[i].item() - mean) / (std + 1e-6)
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            surrogate = min(ratio * a, max(min(ratio, 1 + eps), 1 - eps) * a)
            d = ref[i, t].item() - logp[i, t].item()
            total += -surrogate + beta * (math.exp(d) - d - 1)
            count += 1
    assert math.isclose(loss.item(), total / count, rel_tol=1e-10)


def test_token_logprobs_matches_log_softmax():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert math.isclose(token_logprobs(logits, torch.tensor([[1]])).item(), math.log(0.75), rel_tol=1e-12)


def test_other_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 1.0])
    assert torch.allclose(dr_grpo_advantages(rewards, 4), torch.tensor([0.5, -0.5, -0.5, 0.5, 2.0, -1.0, -1.0, 0.0]))
    # RLOO: r_i - mean(others); group 1: 1 - 1/3, 0 - 2/3
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 3 - 1 / 3, -4 / 3, -4 / 3, 1 - 1.0])
    assert torch.allclose(rloo_advantages(rewards, 4), expected)
    centred = dr_grpo_advantages(rewards, 4)
    pp = reinforce_pp_advantages(rewards, 4)
    assert torch.allclose(pp, (centred - centred.mean()) / (centred.std(unbiased=False) + 1e-6))
    assert abs(pp.mean().item()) < 1e-9 and abs(pp.std(unbiased=False).item() - 1) < 1e-5


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert math.isclose(kl_estimate(logp, ref, "k1").item(), math.log(2), rel_tol=1e-12)
    assert math.isclose(kl_estimate(logp, ref, "k2").item(), 0.5 * math.log(2) ** 2, rel_tol=1e-12)


def test_asymmetric_and_dual_clip_by_hand():
    mask = torch.ones(1, 1)
    # ratio 1.25: clip_high 0.28 leaves it unclipped (DAPO), 0.2 clips it.
    logp, old = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.4)]])
    loose, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28, norm=1.0)
    tight, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2, norm=1.0)
    assert math.isclose(loose.item(), -1.25, rel_tol=1e-12) and math.isclose(tight.item(), -1.2, rel_tol=1e-12)
    # ratio 5 with A = -1: plain PPO loss 5, dual clip c=3 bounds it at 3.
    logp, old = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.1)]])
    plain, _ = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2, norm=1.0)
    dual, _ = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2, norm=1.0, dual_clip=3.0)
    assert math.isclose(plain.item(), 5.0, rel_tol=1e-12) and math.isclose(dual.item(), 3.0, rel_tol=1e-12)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean", norm=3.0).item() == 2.0  # (1 + 3 + 2) / 3 tokens
    assert aggregate(per_token, mask, "seq_mean", norm=2.0).item() == 2.0  # (2 + 2) / 2 sequences
    assert aggregate(per_token, mask, "seq_sum", norm=2 * 4.0).item() == 0.75  # 6 / (2 x budget 4)
    # Micro-batches add up to the whole batch.
    halves = aggregate(per_token[:1], mask[:1], "seq_mean", 2.0) + aggregate(per_token[1:], mask[1:], "seq_mean", 2.0)
    assert halves.item() == 2.0


def test_gae_by_hand():
    # One sequence of 3 real tokens + 1 pad; reward 1 at the last real token; gamma 0.9, lambda 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])  # the padded value must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.6            # 0.4
    d1 = 0.0 + 0.9 * 0.6 - 0.4            # 0.14
    d0 = 0.0 + 0.9 * 0.4 - 0.2            # 0.16
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-12)
    assert torch.allclose(ret[:, :3], torch.tensor([[a0 + 0.2, a1 + 0.4, a2 + 0.6]]), atol=1e-12)


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.5, 0.0, 2.0]])
    values = torch.tensor([[1.0, -1.0, 0.5]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[2.5, 2.0, 2.0]]), atol=1e-12)
    assert torch.allclose(adv, ret - values, atol=1e-12)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, 1.0])
    loss = value_loss_per_token(values, old, returns, clip=0.2)
    # token 0: unclipped (1-0)^2 = 1; clipped V = 0.7 -> 0.49; max 1 -> 0.5. token 1: both (0-1)^2 -> 0.5
    assert torch.allclose(loss, torch.tensor([0.5, 0.5]), atol=1e-12)
    # the clip takes the pessimistic side: moving towards the return but past the clip keeps the larger loss
    loss = value_loss_per_token(torch.tensor([0.9]), torch.tensor([0.0]), torch.tensor([1.0]), clip=0.2)
    assert math.isclose(loss.item(), 0.5 * 0.8**2, rel_tol=1e-12)


def test_preference_pairs_take_best_and_worst_and_skip_ties():
    rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.3, 0.3, 0.3, 0.3, 2.0, -1.0, 0.0, 0.0])
    assert preference_pairs(rewards, 4) == [(1, 0), (8, 9)]


def test_dpo_and_ipo_by_hand():
    pc, pr, rc, rr = torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.5]), torch.tensor([-2.5])
    h = (-2.0 + 2.5) - (-3.0 + 2.5)  # 1.0
    loss, margin = preference_loss(pc, pr, rc, rr, beta=0.1, kind="dpo")
    assert math.isclose(loss.item(), -math.log(1 / (1 + math.exp(-0.1 * h))), rel_tol=1e-12)
    assert math.isclose(margin.item(), 0.1 * h, rel_tol=1e-12)
    loss, _ = preference_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert math.isclose(loss.item(), (h - 5.0) ** 2, rel_tol=1e-12)


def test_entropy_of_uniform_and_one_hot():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = entropy_from_logits(logits)
    assert math.isclose(ent[0, 0].item(), math.log(4), rel_tol=1e-12)
    assert ent[0, 1].item() < 1e-30


def test_per_token_advantages_and_entropy_bonus():
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    adv = torch.tensor([[1.0, -2.0]])
    ent = torch.tensor([[0.3, 0.7]])
    loss, stats = policy_loss(logp, logp, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, norm=2.0,
                              entropy=ent, entropy_coef=0.1)
    # ratio 1: per token -A - 0.1 * H -> (-1 - 0.03) + (2 - 0.07) = 0.9, over 2 tokens
    assert math.isclose(loss.item(), 0.45, rel_tol=1e-12)
    assert math.isclose(stats["entropy"].item(), 0.5, rel_tol=1e-12)
