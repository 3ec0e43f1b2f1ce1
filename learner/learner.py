"""The learner: a DeepSpeed engine that pulls scored groups from Redis, steps, and publishes weights.

The only module that imports DeepSpeed. One instance per rank; the driver hosts
it in a Ray actor. A step is: fill the batch (drop stale or invalid groups),
compute advantages, forward/backward in micro-batches, optimizer step, ack the
entries, advance the policy version.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from scratchpad.common.buffer import BufferAddress, RedisBuffer
from scratchpad.common.config import ExperimentConfig
from scratchpad.common.records import Group, unpack_ids, unpack_logprobs
from scratchpad.learner.algorithms import (
    ADVANTAGES, aggregate, entropy_from_logits, gae_advantages, policy_loss, preference_loss, preference_pairs, token_logprobs,
    value_loss_per_token,
)


def _init_distributed(rank: int, world_size: int, master_port: int) -> None:
    import deepspeed

    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
    })
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")


PREFERENCE = ("dpo", "ipo")


def _global_sum(values: list[float]) -> list[float]:
    """Sum floats over all learner ranks (identity with one rank)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's (equal-length) tensor in rank order; returns it and where this rank's rows start."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor, 0
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts), torch.distributed.get_rank() * tensor.shape[0]


class Critic(torch.nn.Module):
    """PPO's value model: the policy's transformer body with a zero-initialised scalar head per position."""

    def __init__(self, model_path: str, dtype):
        from transformers import AutoModel

        super().__init__()
        self.body = AutoModel.from_pretrained(model_path, dtype=dtype)
        self.head = torch.nn.Linear(self.body.config.hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1)


def _ds_config(cfg: ExperimentConfig, micro: int, world_size: int) -> dict:
    # At ZeRO stage 0 the optimizer's step pre-hook clips (after DeepSpeed's all-reduce) and records the norm; at
    # stages 1-3 the hook would see only this rank's partition, so DeepSpeed clips the global norm itself.
    # The loop owns the accumulation boundary (managed_gradient_accumulation off): micro-batches of any number and
    # size accumulate until engine.step(), and each carries its own share of the loss, so nothing is rescaled.
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.learner.grad_clip if cfg.learner.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.learner.zero_stage,
                              "stage3_param_persistence_threshold": cfg.learner.zero3_persistence_threshold},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Learner:
    def __init__(self, cfg: ExperimentConfig, model_path: str, buffer: BufferAddress, rank: int = 0, world_size: int = 1,
                 master_port: int = 29500, resume_from: str | None = None):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.learner.seed)  # the same on every rank: DeepSpeed also broadcasts rank 0's weights
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.consumer = f"learner-{rank}"
        self.buffer = RedisBuffer(buffer)
        self.buffer.ensure_group()
        _init_distributed(rank, world_size, master_port)
        dtype = getattr(torch, cfg.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.groups_per_rank = cfg.rollout.prompts_per_step // world_size
        self.micro = min(cfg.learner.micro_batch_size, self.groups_per_rank * cfg.rollout.n)
        self.reference = None
        if cfg.learner.kl_coef > 0 or cfg.learner.algorithm in PREFERENCE:
            self.reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
            if cfg.learner.zero_stage == 3:  # partitioned like the policy; a forward gathers one layer at a time
                self.reference = deepspeed.initialize(model=self.reference, config=_ds_config(cfg, self.micro, world_size))[0]
        self.norms: dict[str, float] = {}
        self.engine = self._engine(model, cfg.learner.lr, cfg.learner.warmup_steps, "grad_norm")
        self.critic = None
        if cfg.learner.algorithm == "ppo":
            self.critic = self._engine(Critic(model_path, dtype), cfg.learner.critic_lr, 0, "critic_grad_norm")
        self.version = 0  # policy version of the weights the learner holds; +1 per step
        self.batch: list[tuple[str, Group]] = []
        self.dropped_pending: dict[str, int] = {}
        self.dropped_ids: list[str] = []
        # Entries trained (or dropped) since the last checkpoint: acknowledged only once a checkpoint holds their
        # update, so a crash re-delivers exactly them. Without checkpoints (checkpoint_every 0) each step acks.
        self.unacked_ids: list[str] = []
        self.unacked_trained = 0
        self.unacked_dropped: dict[str, int] = {}
        self.replay: list[tuple[str, Group]] = []  # after a resume: entries the checkpoint does not contain
        if resume_from:
            self._load(resume_from)
            self.replay = self.buffer.read(self.consumer, 1_000_000, 0, pending=True)

    def _engine(self, model, lr: float, warmup: int, norm_name: str):
        import deepspeed

        cfg = self.cfg.learner
        optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps)
        if cfg.zero_stage == 0:
            def clip(opt, args, kwargs):  # runs inside engine.step(), after the gradients are averaged over ranks
                params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
                self.norms[norm_name] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
            optim.register_step_pre_hook(clip)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched,
                                               config=_ds_config(self.cfg, self.micro, self.world_size))
        return engine

    # ---- batch assembly -------------------------------------------------------------------

    def fill_batch(self, block_ms: int = 2000) -> int:
        """Read groups until this rank's share of the batch is full or the stream runs dry; returns how many are missing."""
        while (want := self.groups_per_rank - len(self.batch)) > 0:
            entries, self.replay = self.replay[:want], self.replay[want:]
            entries = entries or self.buffer.read(self.consumer, want, block_ms)
            if not entries:
                break
            for entry_id, group in entries:
                reason = self._drop_reason(group)
                if reason:
                    self.dropped_pending[reason] = self.dropped_pending.get(reason, 0) + 1
                    self.dropped_ids.append(entry_id)
                else:
                    self.batch.append((entry_id, group))
        return max(0, self.groups_per_rank - len(self.batch))

    def _drop_reason(self, group: Group) -> str | None:
        cfg = self.cfg.learner
        if self.version - group.policy_version > cfg.max_staleness:
            return "stale"
        if len(group.traces) != self.cfg.rollout.n:
            return "invalid"
        if any(t.reward is None for t in group.traces):
            return "invalid"
        rewards = [t.reward for t in group.traces]
        if cfg.algorithm == "star" and max(rewards) < cfg.star_threshold:
            return "filtered"  # nothing verified to imitate
        if (cfg.filter_groups or cfg.algorithm in PREFERENCE) and max(rewards) == min(rewards):
            return "filtered"  # all equal: no advantage, no preference
        return None

    # ---- the step -------------------------------------------------------------------------

    def _tensors(self, traces: list) -> dict[str, torch.Tensor]:
        prompts = [torch.from_numpy(unpack_ids(t.prompt_ids).astype(np.int64)) for t in traces]
        completions = [torch.from_numpy(unpack_ids(t.completion_ids).astype(np.int64)) for t in traces]
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        comp_width = max(len(c) for c in completions)
        n = len(traces)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        targets = torch.full((n, comp_width), self.pad_id, dtype=torch.long)
        old_logp = torch.zeros((n, comp_width))
        mask = torch.zeros((n, comp_width))
        starts = torch.zeros(n, dtype=torch.long)
        for i, (t, prompt, completion) in enumerate(zip(traces, prompts, completions)):
            p, c = len(prompt), len(completion)
            input_ids[i, :p] = prompt
            input_ids[i, p : p + c] = completion
            attention[i, : p + c] = 1
            targets[i, :c] = completion
            old_logp[i, :c] = torch.from_numpy(unpack_logprobs(t.logprobs).astype(np.float32))
            mask[i, :c] = 1
            starts[i] = p
        rewards = torch.tensor([t.reward for t in traces], dtype=torch.float32)
        return {"input_ids": input_ids, "attention": attention, "targets": targets, "old_logp": old_logp,
                "mask": mask, "starts": starts, "rewards": rewards, "lengths": (starts + mask.sum(1).long())}

    def _positions(self, batch: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        # Completion token k of row i sits at position starts[i] + k and is predicted from position starts[i] + k - 1.
        comp = batch["targets"].shape[1]
        pos = batch["starts"][rows].unsqueeze(1) - 1 + torch.arange(comp).unsqueeze(0)
        return pos.clamp(max=batch["input_ids"].shape[1] - 1)

    def _forward(self, model, batch: dict[str, torch.Tensor], rows: slice, entropy: bool = False):
        """(b, C) log p of each completion token under `model` (0 on padding), and its entropy if asked."""
        width = int(batch["lengths"][rows].max())  # trim the padding this micro-batch does not need
        ids, att = batch["input_ids"][rows, :width], batch["attention"][rows, :width]
        logits = model(input_ids=ids, attention_mask=att).logits  # (b, W, V)
        pos = self._positions(batch, rows).clamp(max=width - 1)
        picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        mask = batch["mask"][rows]
        logp = token_logprobs(picked, batch["targets"][rows]) * mask
        return logp, (entropy_from_logits(picked) * mask if entropy else None)

    def _values(self, model, batch: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """(b, C) critic values of the state before each completion token, 0 on padding."""
        width = int(batch["lengths"][rows].max())
        values = model(batch["input_ids"][rows, :width], batch["attention"][rows, :width])
        return values.gather(1, self._positions(batch, rows).clamp(max=width - 1)) * batch["mask"][rows]

    def _no_grad_pass(self, fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(batch, rows) for rows in self._micro_batches(batch, range(batch["mask"].shape[0]))])

    def _prepare(self, groups: list[Group]) -> tuple[dict[str, torch.Tensor], int]:
        """The step's tensors and the algorithm's per-row targets; returns them and rows per unit (2 for pairs)."""
        cfg = self.cfg.learner
        n = self.cfg.rollout.n
        traces = [t for g in groups for t in g.traces]
        if cfg.algorithm in PREFERENCE:
            rewards = torch.tensor([t.reward for t in traces])
            order = [i for pair in preference_pairs(rewards, n) for i in pair]  # chosen, rejected, chosen, ...
            batch = self._tensors([traces[i] for i in order])
            batch["ref_seq_logp"] = self._no_grad_pass(lambda b, r: self._forward(self.reference, b, r)[0], batch).sum(1)
            return batch, 2
        if cfg.algorithm == "star":
            return self._tensors([t for t in traces if t.reward >= cfg.star_threshold]), 1
        batch = self._tensors(traces)
        penalty = None
        if self.reference is not None:
            batch["ref_logp"] = self._no_grad_pass(lambda b, r: self._forward(self.reference, b, r)[0], batch)
            if cfg.kl_mode == "reward":
                penalty = cfg.kl_coef * (batch["old_logp"] - batch["ref_logp"]) * batch["mask"]
        if cfg.algorithm == "ppo":
            values = self._no_grad_pass(lambda b, r: self._values(self.critic, b, r), batch)
            token_rewards = torch.zeros_like(values)
            last = batch["mask"].sum(1).long() - 1
            token_rewards[torch.arange(len(traces)), last.clamp(min=0)] = batch["rewards"]
            if penalty is not None:
                token_rewards = token_rewards - penalty
            advantages, returns = gae_advantages(token_rewards, values, batch["mask"], cfg.gamma, cfg.lam)
            mean, sq, count = _global_sum([float((advantages * batch["mask"]).sum()), float((advantages**2 * batch["mask"]).sum()),
                                           float(batch["mask"].sum())])
            mean /= max(count, 1.0)
            std = max(sq / max(count, 1.0) - mean**2, 0.0) ** 0.5
            batch["advantages"] = (advantages - mean) / (std + 1e-8) * batch["mask"]
            batch["old_values"], batch["returns"] = values, returns
        else:
            rewards = batch["rewards"] - (penalty.sum(1) if penalty is not None else 0.0)
            every, offset = _gather_rows(rewards)  # REINFORCE++ normalises over the whole batch, every rank's rows
            batch["advantages"] = ADVANTAGES[cfg.algorithm](every, n)[offset : offset + len(traces)]
        return batch, 1

    def _micro_batches(self, batch: dict[str, torch.Tensor], rows_range: range, unit: int = 1) -> list[slice]:
        """Consecutive rows, at most micro_batch_size each and, with micro_batch_tokens, at most that many
        rows x padded width; a unit (a chosen/rejected pair) is never split."""
        cfg = self.cfg.learner
        out, start, width = [], rows_range.start, 0
        for row in range(rows_range.start, rows_range.stop, unit):
            width_with = max(width, int(batch["lengths"][row : row + unit].max()))
            rows_with = row + unit - start
            if row > start and (rows_with > cfg.micro_batch_size or (cfg.micro_batch_tokens and rows_with * width_with > cfg.micro_batch_tokens)):
                out.append(slice(start, row))
                start, width_with = row, int(batch["lengths"][row : row + unit].max())
            width = width_with
        if rows_range.stop > start:
            out.append(slice(start, rows_range.stop))
        return out

    def train(self) -> dict[str, float]:
        """ppo_epochs x minibatches optimizer steps on the filled batch; acks it and returns metrics."""
        assert self.batch, "train() called with an empty batch; call fill_batch() first"
        started = time.time()
        cfg = self.cfg.learner
        groups = [g for _, g in self.batch]
        batch, unit = self._prepare(groups)
        units = batch["mask"].shape[0] // unit
        sums: dict[str, float] = {}
        for epoch in range(cfg.ppo_epochs):
            for m in range(cfg.minibatches):
                lo, hi = units * m // cfg.minibatches * unit, units * (m + 1) // cfg.minibatches * unit
                stats = self._optimizer_step(batch, range(lo, hi), unit)
                for name, value in stats.items():
                    if name != "logprob_gap" or epoch == 0:  # the gap compares the sampler with the weights that sampled
                        sums[name] = sums.get(name, 0.0) + value / (cfg.minibatches * (cfg.ppo_epochs if name != "logprob_gap" else 1))
        self.unacked_ids += [entry_id for entry_id, _ in self.batch] + self.dropped_ids
        self.unacked_trained += len(self.batch)
        for reason, count in self.dropped_pending.items():
            self.unacked_dropped[reason] = self.unacked_dropped.get(reason, 0) + count
        if not self.cfg.run.checkpoint_every:
            self._ack()
        lags = [self.version - g.policy_version for g in groups]
        self.version += 1
        all_rewards = torch.tensor([t.reward for g in groups for t in g.traces])
        metrics = {
            **sums,
            "tokens": int(batch["mask"].sum()),
            "trained_sequences": int(batch["mask"].shape[0]),
            "reward_mean": float(all_rewards.mean()),
            "groups_trained": len(self.batch),
            "groups_dropped": sum(self.dropped_pending.values()),
            **{f"dropped_{reason}": count for reason, count in self.dropped_pending.items()},
            "policy_lag_mean": sum(lags) / len(lags),
            "learner_seconds": time.time() - started,
            "policy_version": self.version,
            "group_ids": [g.group_id for g in groups],  # the audit trail for "nothing lost, nothing trained twice"
        }
        self.batch, self.dropped_pending, self.dropped_ids = [], {}, []
        return metrics

    def _optimizer_step(self, batch: dict[str, torch.Tensor], rows_range: range, unit: int) -> dict[str, float]:
        """Forward/backward over `rows_range` in micro-batches, then one optimizer step (every rank together)."""
        cfg = self.cfg.learner
        rows_all = slice(rows_range.start, rows_range.stop)
        mask_all = batch["mask"][rows_all]
        tokens, seqs = _global_sum([float(mask_all.sum()), float(mask_all.shape[0])])
        if cfg.algorithm in PREFERENCE:
            norm = seqs / 2  # pairs
        elif cfg.algorithm in ("star", "ppo"):
            norm = tokens
        else:
            norm = {"token_mean": tokens, "seq_mean": seqs, "seq_sum": seqs * self.cfg.rollout.max_new_tokens}[cfg.loss_aggregation]
        norm = max(norm, 1.0)
        # DeepSpeed averages gradients over ranks; each rank's loss is its share of the global sum, so undo the mean.
        scale = float(self.world_size)
        train_policy = not (self.critic is not None and self.version < cfg.critic_warmup_steps)
        sums: dict[str, float] = {}
        self.engine.train()
        local_tokens = float(mask_all.sum())
        for rows in self._micro_batches(batch, rows_range, unit):
            mask = batch["mask"][rows]
            share = float(mask.sum()) / max(local_tokens, 1.0)
            if self.critic is not None:
                values = self._values(self.critic, batch, rows)
                vloss = aggregate(value_loss_per_token(values, batch["old_values"][rows], batch["returns"][rows], cfg.value_clip),
                                  mask, "token_mean", norm)
                self.critic.backward(vloss * scale)
                sums["value_loss"] = sums.get("value_loss", 0.0) + float(vloss) * scale / self.world_size
            if not train_policy:
                continue
            logp, entropy = self._forward(self.engine, batch, rows, entropy=True)
            if cfg.algorithm in PREFERENCE:
                seq = logp.sum(1)
                ref = batch["ref_seq_logp"][rows]
                per_pair, margin = preference_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.algorithm)
                loss = per_pair.sum() / norm
                stats = {"margin": margin.detach().mean(), "pair_accuracy": (margin > 0).float().mean(),
                         "entropy": (entropy.sum() / mask.sum().clamp(min=1)).detach()}
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate(entropy, mask, "token_mean", norm)
            elif cfg.algorithm == "star":
                loss = aggregate(-logp, mask, "token_mean", norm)
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate(entropy, mask, "token_mean", norm)
                stats = {"nll": (-logp.sum() / mask.sum().clamp(min=1)).detach(),
                         "entropy": (entropy.sum() / mask.sum().clamp(min=1)).detach()}
            else:
                loss, stats = policy_loss(
                    logp, batch["old_logp"][rows], batch["advantages"][rows], mask, clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, norm=norm, aggregation="token_mean" if cfg.algorithm == "ppo" else cfg.loss_aggregation,
                    dual_clip=cfg.dual_clip, ref_logp=batch["ref_logp"][rows] if "ref_logp" in batch and cfg.kl_mode == "loss" else None,
                    kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy=entropy, entropy_coef=cfg.entropy_coef,
                )
            if cfg.algorithm not in PREFERENCE:
                stats["logprob_gap"] = ((logp - batch["old_logp"][rows]).abs() * mask).sum() / mask.sum().clamp(min=1)
            self.engine.backward(loss * scale)
            sums["loss"] = sums.get("loss", 0.0) + float(loss) * scale / self.world_size
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + float(value) * share
        for engine, name, active in ((self.engine, "grad_norm", train_policy), (self.critic, "critic_grad_norm", True)):
            if engine is not None and active:
                engine.step()
                sums[name] = self.norms[name] if cfg.zero_stage == 0 else float(engine.get_global_grad_norm() or 0.0)
        return sums

    # ---- publication ----------------------------------------------------------------------

    def _gathered(self):
        """Context in which the policy's parameters are whole on every rank: under ZeRO-3 a collective that every
        rank must enter (it gathers the full model at once); a no-op at stages 0-2, where they are whole anyway."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))

    def weights(self, every_rank: bool = False) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """(policy_version, [(HF name, full CPU tensor)]): what rollout engines load in place. Call it on every rank;
        only rank 0 returns the tensors (the others an empty list) unless every_rank."""
        with self._gathered():
            if self.rank != 0 and not every_rank:
                return self.version, []
            return self.version, [(name, p.detach().to("cpu").clone()) for name, p in self.engine.module.state_dict().items()]

    def save_pretrained(self, directory: str) -> str:
        """The HF model and tokenizer, written by rank 0; call it on every rank."""
        with self._gathered():
            if self.rank == 0:
                self.engine.module.save_pretrained(directory)
                self.tokenizer.save_pretrained(directory)
        return directory

    def policy_version(self) -> int:
        return self.version

    def _ack(self) -> None:
        self.buffer.ack(self.unacked_ids, trained=self.unacked_trained, dropped=self.unacked_dropped)
        self.unacked_ids, self.unacked_trained, self.unacked_dropped = [], 0, {}

    def _load(self, path: str) -> None:
        import random

        import numpy as np

        _, state = self.engine.load_checkpoint(path, tag="state")
        if self.critic is not None:
            self.critic.load_checkpoint(path, tag="critic")
        self.version = state["policy_version"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])

    def save_checkpoint(self, root: str, keep: int) -> str:
        """DeepSpeed checkpoint (model, optimizer, scheduler, policy version, RNG) written under a temporary
        name and renamed into place, so a crash never leaves a half-written `step-N`; keeps the last `keep`."""
        import random
        import shutil

        import numpy as np

        final = os.path.join(root, f"step-{self.version}")
        tmp = os.path.join(root, f".tmp-step-{self.version}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        state = {"policy_version": self.version, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "numpy_rng": np.random.get_state()}
        self.engine.save_checkpoint(tmp, tag="state", client_state=state)  # collective: every rank writes its part
        if self.critic is not None:
            self.critic.save_checkpoint(tmp, tag="critic")
        self._barrier()
        if self.rank == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted((d for d in os.listdir(root) if d.startswith("step-")), key=lambda d: int(d.split("-")[1]))
            for old in done[:-keep]:
                shutil.rmtree(os.path.join(root, old))
        self._barrier()
        self._ack()  # only now does a checkpoint hold these entries' updates
        return final

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
