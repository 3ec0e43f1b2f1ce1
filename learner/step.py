"""The per-algorithm step: targets for each row (advantages, returns, reference log p), then forward/backward in
micro-batches and one optimizer step. `learner` is the rank's Learner (engine, reference, critic, device, version).

Off-policy correction (asynchronous mode): the clipped ratio is taken against the sampler's log p, as in the
synchronous loop, unless `learner.tis_cap` is set; then the ratio is taken against the learner's own log p at the
start of the step (the proximal policy) and each token is weighted by min(pi_prox / pi_sampler, tis_cap), the
truncated importance weight of the sampler's (possibly stale) policy.
"""
from __future__ import annotations

import torch

from scratchpad.learner.algorithms import (
    ADVANTAGES, aggregate, gae_advantages, policy_loss, preference_loss, preference_pairs, value_loss_per_token,
)
from scratchpad.learner.batch import PREFERENCE, micro_batches, positions, shared_prompt_layout, to_tensors
from scratchpad.learner.engine import gather_rows, global_sum
from scratchpad.learner.logprobs import completion_logprobs


def forward(learner, model, batch: dict, rows: slice, entropy: bool = False):
    """(b, C) log p of each completion token under `model` (0 on padding), and its entropy if asked, at the rollouts'
    sampling temperature (the policy they were drawn from; greedy rollouts, temperature 0, take the logits as they are)."""
    width = int(batch["lengths"][rows].max())  # trim the padding this micro-batch does not need
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    lc = learner.cfg.learner
    temperature = learner.cfg.rollout.temperature or 1.0
    packed = None
    if lc.share_prompts:  # the reference, proximal and training passes share the micro-batches: pack each once a step
        layouts = batch.setdefault("packed", {})  # (start, stop) of a micro-batch's rows -> its layout; dies with the batch
        if (rows.start, rows.stop) not in layouts:
            layouts[rows.start, rows.stop] = shared_prompt_layout(batch, rows)
        packed = layouts[rows.start, rows.stop]
    return completion_logprobs(module, batch["input_ids"][rows, :width], batch["attention"][rows, :width], positions(batch, rows, width),
                               batch["targets"][rows], batch["mask"][rows], lc.logprob_chunk_tokens, entropy, lc.entropy_coef > 0,
                               temperature, packed)


def values(critic, batch: dict, rows: slice) -> torch.Tensor:
    """(b, C) critic values of the state before each completion token, 0 on padding."""
    width = int(batch["lengths"][rows].max())
    out = critic(batch["input_ids"][rows, :width], batch["attention"][rows, :width])
    return out.gather(1, positions(batch, rows, width)) * batch["mask"][rows]


def _no_grad_pass(learner, fn, batch: dict) -> torch.Tensor:
    lc = learner.cfg.learner
    with torch.no_grad():
        return torch.cat([fn(batch, rows) for rows in micro_batches(batch, range(batch["mask"].shape[0]), lc.micro_batch_size, lc.micro_batch_tokens)])


def _ref_logp(learner, batch: dict) -> torch.Tensor:
    return _no_grad_pass(learner, lambda b, r: forward(learner, learner.reference, b, r)[0], batch)


def prepare(learner, groups: list) -> tuple[dict, int]:
    """The step's tensors and the algorithm's per-row targets; returns them and rows per unit (2 for pairs)."""
    lc, n = learner.cfg.learner, learner.cfg.rollout.n
    traces = [t for g in groups for t in g.traces]
    if lc.algorithm in PREFERENCE:
        order = [i for pair in preference_pairs(torch.tensor([t.reward for t in traces]), n) for i in pair]  # chosen, rejected, ...
        batch = to_tensors([traces[i] for i in order], learner.pad_id, learner.device)
        batch["ref_seq_logp"] = _ref_logp(learner, batch).sum(1)
        return batch, 2
    if lc.algorithm == "star":
        return to_tensors([t for t in traces if t.reward >= lc.star_threshold], learner.pad_id, learner.device), 1
    batch = to_tensors(traces, learner.pad_id, learner.device)
    if lc.tis_cap is not None and (lc.ppo_epochs > 1 or lc.minibatches > 1):  # with one update, pi_prox is this forward's own
        batch["prox_logp"] = _no_grad_pass(learner, lambda b, r: forward(learner, learner.engine, b, r)[0], batch)
    penalty = None
    if learner.reference is not None:
        batch["ref_logp"] = _ref_logp(learner, batch)
        if lc.kl_mode == "reward":
            penalty = lc.kl_coef * (batch["old_logp"] - batch["ref_logp"]) * batch["mask"]
    if lc.algorithm == "ppo":
        _ppo_targets(learner, batch, penalty)
    else:
        rewards = batch["rewards"] - (penalty.sum(1) if penalty is not None else 0.0)
        every, offset = gather_rows(rewards)  # REINFORCE++ normalises over the whole batch, every rank's rows
        batch["advantages"] = ADVANTAGES[lc.algorithm](every, n)[offset : offset + len(traces)]
    return batch, 1


def _ppo_targets(learner, batch: dict, penalty) -> None:
    lc = learner.cfg.learner
    vals = _no_grad_pass(learner, lambda b, r: values(learner.critic, b, r), batch)
    token_rewards = torch.zeros_like(vals)
    last = batch["mask"].sum(1).long() - 1
    token_rewards[torch.arange(vals.shape[0], device=vals.device), last.clamp(min=0)] = batch["rewards"]
    if penalty is not None:
        token_rewards = token_rewards - penalty
    advantages, returns = gae_advantages(token_rewards, vals, batch["mask"], lc.gamma, lc.lam)
    mean, sq, count = global_sum([float((advantages * batch["mask"]).sum()), float((advantages**2 * batch["mask"]).sum()),
                                  float(batch["mask"].sum())], learner.device)
    mean /= max(count, 1.0)
    std = max(sq / max(count, 1.0) - mean**2, 0.0) ** 0.5
    batch["advantages"] = (advantages - mean) / (std + 1e-8) * batch["mask"]
    batch["old_values"], batch["returns"] = vals, returns


def _norm(learner, rows_all: slice, batch: dict) -> float:
    lc = learner.cfg.learner
    mask_all = batch["mask"][rows_all]
    tokens, seqs = global_sum([float(mask_all.sum()), float(mask_all.shape[0])], learner.device)
    if lc.algorithm in PREFERENCE:
        return max(seqs / 2, 1.0)  # pairs
    if lc.algorithm in ("star", "ppo"):
        return max(tokens, 1.0)
    return max({"token_mean": tokens, "seq_mean": seqs, "seq_sum": seqs * learner.cfg.rollout.max_new_tokens}[lc.loss_aggregation], 1.0)


def _policy_terms(learner, batch: dict, rows: slice, norm: float) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the policy loss and its statistics."""
    lc = learner.cfg.learner
    mask = batch["mask"][rows]
    logp, entropy = forward(learner, learner.engine, batch, rows, entropy=True)
    ent_mean = (entropy.sum() / mask.sum().clamp(min=1)).detach()
    if lc.algorithm in PREFERENCE:
        seq, ref = logp.sum(1), batch["ref_seq_logp"][rows]
        per_pair, margin = preference_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], lc.beta, lc.algorithm)
        loss = per_pair.sum() / norm
        stats = {"margin": margin.detach().mean(), "pair_accuracy": (margin > 0).float().mean(), "entropy": ent_mean}
    elif lc.algorithm == "star":
        loss = aggregate(-logp, mask, "token_mean", norm)
        stats = {"nll": (-logp.sum() / mask.sum().clamp(min=1)).detach(), "entropy": ent_mean}
    else:
        sampler = batch["old_logp"][rows]
        prox = None
        if lc.tis_cap is not None:
            prox = batch["prox_logp"][rows] if "prox_logp" in batch else logp.detach()
        loss, stats = policy_loss(
            logp, prox if prox is not None else sampler, batch["advantages"][rows], mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
            norm=norm, aggregation="token_mean" if lc.algorithm == "ppo" else lc.loss_aggregation, dual_clip=lc.dual_clip,
            ref_logp=batch["ref_logp"][rows] if "ref_logp" in batch and lc.kl_mode == "loss" else None, kl_coef=lc.kl_coef,
            kl_estimator=lc.kl_estimator, entropy=entropy, entropy_coef=lc.entropy_coef,
            behaviour_logp=sampler if prox is not None else None, tis_cap=lc.tis_cap,
        )
    if lc.entropy_coef and lc.algorithm in (*PREFERENCE, "star"):  # policy_loss adds it for the policy gradient
        loss = loss - lc.entropy_coef * aggregate(entropy, mask, "token_mean", norm)
    if lc.algorithm not in PREFERENCE:  # learner vs sampler, on the same tokens
        stats["logprob_gap"] = ((logp.detach() - batch["old_logp"][rows]).abs() * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats


def optimizer_step(learner, batch: dict, rows_range: range, unit: int) -> dict[str, float]:
    """Forward/backward over `rows_range` in micro-batches, then one optimizer step (every rank together)."""
    lc = learner.cfg.learner
    norm = _norm(learner, slice(rows_range.start, rows_range.stop), batch)
    # DeepSpeed averages gradients over ranks; each rank's loss is its share of the global sum, so undo the mean.
    scale = float(learner.world_size)
    train_policy = not (learner.critic is not None and learner.version < lc.critic_warmup_steps)
    sums: dict[str, float] = {}
    learner.engine.train()
    local_tokens = float(batch["mask"][rows_range.start : rows_range.stop].sum())
    for rows in micro_batches(batch, rows_range, lc.micro_batch_size, lc.micro_batch_tokens, unit):
        share = float(batch["mask"][rows].sum()) / max(local_tokens, 1.0)
        if learner.critic is not None:
            vloss = aggregate(value_loss_per_token(values(learner.critic, batch, rows), batch["old_values"][rows], batch["returns"][rows],
                                                   lc.value_clip), batch["mask"][rows], "token_mean", norm)
            learner.critic.backward(vloss * scale)
            sums["value_loss"] = sums.get("value_loss", 0.0) + float(vloss.detach()) * scale / learner.world_size
        if not train_policy:
            continue
        loss, stats = _policy_terms(learner, batch, rows, norm)
        learner.engine.backward(loss * scale)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * scale / learner.world_size
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + float(value) * share
    for engine, name, active in ((learner.engine, "grad_norm", train_policy), (learner.critic, "critic_grad_norm", True)):
        if engine is not None and active:
            engine.step()
            sums[name] = learner.norms[name] if lc.zero_stage == 0 else float(engine.get_global_grad_norm() or 0.0)
    return sums
