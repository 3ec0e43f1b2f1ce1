"""The learner a learner actor hosts: pull scored groups from Redis, step, checkpoint, publish weights.

One instance per rank. A step is: fill the batch (learner/batch.py: drop stale or invalid groups, counted), compute
the algorithm's targets and step in micro-batches (learner/step.py), hold the entries until a checkpoint contains
their update, then acknowledge them (learner/publish.py). Engines and collectives are in learner/engine.py.
"""
from __future__ import annotations

import time

import torch

from scratchpad.common.buffer import BufferAddress, RedisBuffer
from scratchpad.common.config import ExperimentConfig
from scratchpad.learner import publish
from scratchpad.learner.batch import PREFERENCE, BatchAssembler
from scratchpad.learner.engine import Critic, build_engine, frozen_reference, init_distributed, learner_device
from scratchpad.learner.step import optimizer_step, prepare

LAG_BINS = 8  # policy-lag histogram: lags 0..6, and 7 or more


class Learner:
    def __init__(self, cfg: ExperimentConfig, model_path: str, buffer: BufferAddress, rank: int = 0, world_size: int = 1,
                 master_port: int = 29500, resume_from: str | None = None, master_addr: str = "127.0.0.1"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.learner.seed)  # the same on every rank: DeepSpeed also broadcasts rank 0's weights
        torch.set_num_threads(cfg.run.threads_for("learner"))
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = learner_device(cfg.learner.num_gpus)
        self.buffer = RedisBuffer(buffer)
        self.buffer.ensure_group()
        init_distributed(rank, world_size, master_addr, master_port, self.device)
        # fp32 weights even for bf16 training: DeepSpeed casts the module, and build_engine starts its masters here.
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.config.use_cache = False
        if cfg.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        groups_per_rank = cfg.rollout.prompts_per_step // world_size
        micro = min(cfg.learner.micro_batch_size, groups_per_rank * cfg.rollout.n)
        self.assembler = BatchAssembler(cfg, self.buffer, f"learner-{rank}", groups_per_rank)
        self.reference = None
        if cfg.learner.kl_coef > 0 or cfg.learner.algorithm in PREFERENCE:
            self.reference = frozen_reference(cfg, model_path, micro, world_size, self.device)
        self.norms: dict[str, float] = {}
        self.engine = build_engine(cfg, model, cfg.learner.lr, cfg.learner.warmup_steps, micro, world_size,
                                   lambda norm: self.norms.__setitem__("grad_norm", norm), cfg.learner.lr_schedule,
                                   start=cfg.learner.critic_warmup_steps if cfg.learner.algorithm == "ppo" else 0)
        self.critic = None
        if cfg.learner.algorithm == "ppo":
            self.critic = build_engine(cfg, Critic(model_path, torch.float32), cfg.learner.critic_lr, 0, micro, world_size,
                                       lambda norm: self.norms.__setitem__("critic_grad_norm", norm))
        self.version = 0  # policy version of the weights the learner holds; +1 per step
        # Entries trained (or dropped) since the last checkpoint: acknowledged only once a checkpoint holds their
        # update, so a crash re-delivers exactly them. Without checkpoints (checkpoint_every 0) each step acks.
        self.unacked_ids: list[str] = []
        self.unacked_trained = 0
        self.unacked_dropped: dict[str, int] = {}
        if resume_from:
            publish.load_checkpoint(self, resume_from)
            self.assembler.replay = self.buffer.read(self.assembler.consumer, 1_000_000, 0, pending=True)

    def fill_batch(self, block_ms: int = 2000) -> int:
        """Read groups until this rank's share of the batch is full or the stream runs dry; returns how many are missing."""
        return self.assembler.fill(self.version, block_ms)

    def train(self) -> dict:
        """ppo_epochs x minibatches optimizer steps on the filled batch; holds its entries for the next checkpoint
        (or acks them at once without checkpoints) and returns metrics."""
        assert self.assembler.batch, "train() called with an empty batch; call fill_batch() first"
        started = time.time()
        lc = self.cfg.learner
        entries, dropped_ids, dropped = self.assembler.take()
        groups = [g for _, g in entries]
        batch, unit = prepare(self, groups)
        units = batch["mask"].shape[0] // unit
        lr = float(self.engine.get_lr()[0])  # learner.lr_schedule's rate for this step's first optimizer step
        sums: dict[str, float] = {}
        for epoch in range(lc.ppo_epochs):
            for m in range(lc.minibatches):
                lo, hi = units * m // lc.minibatches * unit, units * (m + 1) // lc.minibatches * unit
                for name, value in optimizer_step(self, batch, range(lo, hi), unit).items():
                    if name != "logprob_gap" or epoch == 0:  # the gap compares the sampler with the weights that sampled
                        sums[name] = sums.get(name, 0.0) + value / (lc.minibatches * (lc.ppo_epochs if name != "logprob_gap" else 1))
        self.unacked_ids += [entry_id for entry_id, _ in entries] + dropped_ids
        self.unacked_trained += len(entries)
        for reason, count in dropped.items():
            self.unacked_dropped[reason] = self.unacked_dropped.get(reason, 0) + count
        if not self.cfg.run.checkpoint_every:
            self._ack()
        lags = [self.version - g.policy_version for g in groups]
        self.version += 1
        rewards = torch.tensor([t.reward for g in groups for t in g.traces])
        return {
            **sums,
            "lr": lr,
            "tokens": int(batch["mask"].sum()),
            "trained_sequences": int(batch["mask"].shape[0]),
            "reward_mean": float(rewards.mean()),
            "groups_trained": len(entries),
            "groups_dropped": sum(dropped.values()),
            **{f"dropped_{reason}": count for reason, count in dropped.items()},
            "policy_lag_mean": sum(lags) / len(lags),
            "policy_lag_max": max(lags),
            "policy_lag_hist": [sum(min(max(lag, 0), LAG_BINS - 1) == b for lag in lags) for b in range(LAG_BINS)],
            "learner_seconds": time.time() - started,
            "policy_version": self.version,
            "group_ids": [g.group_id for g in groups],  # the audit trail for "nothing lost, nothing trained twice"
        }

    def weights(self, every_rank: bool = False) -> tuple[int, list]:
        """(policy_version, weight buckets) for the rollout engines; call it on every rank."""
        return publish.publish(self, every_rank)

    def join_weight_group(self, host: str, port: int, members: list[str], backend: str, timeout_s: float) -> None:
        """Open the weight group with the rollout engines (learner.weight_transport: collective); every rank."""
        publish.join_weight_group(self, host, port, members, backend, timeout_s)

    def broadcast_weights(self) -> int:
        """Send the policy to the weight group's engines; every rank. Returns the version sent."""
        return publish.broadcast_weights(self)

    def save_pretrained(self, directory: str) -> str:
        return publish.save_pretrained(self, directory)

    def save_checkpoint(self, root: str, keep: int) -> str:
        path = publish.save_checkpoint(self, root, keep)
        self._ack()  # only now does a checkpoint hold these entries' updates
        return path

    def policy_version(self) -> int:
        return self.version

    def _ack(self) -> None:
        self.buffer.ack(self.unacked_ids, trained=self.unacked_trained, dropped=self.unacked_dropped)
        self.unacked_ids, self.unacked_trained, self.unacked_dropped = [], 0, {}

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
