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

from scratchpad.cluster.buffer import BufferAddress, RedisBuffer
from scratchpad.cluster.config import ExperimentConfig
from scratchpad.cluster.records import Group, unpack_ids, unpack_logprobs
from scratchpad.learner.algorithms import ADVANTAGES, policy_loss, token_logprobs


def _init_distributed(rank: int, world_size: int, master_port: int) -> None:
    import deepspeed

    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
    })
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")


class Learner:
    def __init__(self, cfg: ExperimentConfig, model_path: str, buffer: BufferAddress, rank: int = 0, world_size: int = 1,
                 master_port: int = 29500, resume_from: str | None = None):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.learner.seed + rank)
        self.cfg = cfg
        self.consumer = f"learner-{rank}"
        self.buffer = RedisBuffer(buffer)
        self.buffer.ensure_group()
        _init_distributed(rank, world_size, master_port)
        dtype = getattr(torch, cfg.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.reference = None
        if cfg.learner.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
        batch = cfg.rollout.prompts_per_step * cfg.rollout.n // cfg.learner.minibatches  # rows per optimizer step
        micro = min(cfg.learner.micro_batch_size, batch)
        self.micro = micro
        self.accum = -(-batch // micro)  # ceil: the last micro-batch may be short; the loss weights by its norm, not rows
        optim = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay,
                                  betas=(0.9, cfg.learner.adam_beta2), eps=cfg.learner.adam_eps)
        warm = cfg.learner.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": self.accum,
            "train_batch_size": micro * self.accum * world_size,
            "gradient_clipping": cfg.learner.grad_clip,
            "zero_optimization": {"stage": cfg.learner.zero_stage},
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched, config=ds_config)
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

    # ---- batch assembly -------------------------------------------------------------------

    def fill_batch(self, block_ms: int = 2000) -> int:
        """Read groups until the step's batch is full or the stream runs dry; returns how many are still missing."""
        while (want := self.cfg.rollout.prompts_per_step - len(self.batch)) > 0:
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
        return max(0, self.cfg.rollout.prompts_per_step - len(self.batch))

    def _drop_reason(self, group: Group) -> str | None:
        if self.version - group.policy_version > self.cfg.learner.max_staleness:
            return "stale"
        if len(group.traces) != self.cfg.rollout.n:
            return "invalid"
        if any(t.reward is None for t in group.traces):
            return "invalid"
        return None

    # ---- the step -------------------------------------------------------------------------

    def _tensors(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        traces = [t for g in groups for t in g.traces]
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
                "mask": mask, "starts": starts, "rewards": rewards}

    def _completion_logprobs(self, model, batch: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """(b, C) log p of each completion token under `model`, 0 on padding."""
        ids, att = batch["input_ids"][rows], batch["attention"][rows]
        logits = model(input_ids=ids, attention_mask=att).logits  # (b, W, V)
        comp = batch["targets"][rows].shape[1]
        # Completion token k of row i sits at position starts[i] + k and is predicted from position starts[i] + k - 1.
        pos = batch["starts"][rows].unsqueeze(1) - 1 + torch.arange(comp).unsqueeze(0)
        pos = pos.clamp(max=ids.shape[1] - 1)
        picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return token_logprobs(picked, batch["targets"][rows]) * batch["mask"][rows]

    def train(self) -> dict[str, float]:
        """ppo_epochs x minibatches optimizer steps on the filled batch; acks it and returns metrics."""
        assert self.batch, "train() called with an empty batch; call fill_batch() first"
        started = time.time()
        cfg = self.cfg.learner
        groups = [g for _, g in self.batch]
        batch = self._tensors(groups)
        advantages = ADVANTAGES[cfg.algorithm](batch["rewards"], self.cfg.rollout.n)
        n = batch["input_ids"].shape[0]
        size = n // cfg.minibatches  # whole groups per minibatch: the config requires prompts_per_step % minibatches == 0
        sums: dict[str, float] = {}
        for epoch in range(cfg.ppo_epochs):
            for m in range(cfg.minibatches):
                stats = self._optimizer_step(batch, advantages, range(m * size, (m + 1) * size))
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
        metrics = {
            **sums,
            "tokens": int(batch["mask"].sum()),
            "reward_mean": float(batch["rewards"].mean()),
            "groups_trained": len(self.batch),
            "groups_dropped": sum(self.dropped_pending.values()),
            "policy_lag_mean": sum(lags) / len(lags),
            "learner_seconds": time.time() - started,
            "policy_version": self.version,
            "group_ids": [g.group_id for g in groups],  # the audit trail for "nothing lost, nothing trained twice"
        }
        self.batch, self.dropped_pending, self.dropped_ids = [], {}, []
        return metrics

    def _optimizer_step(self, batch: dict[str, torch.Tensor], advantages: torch.Tensor, rows_range: range) -> dict[str, float]:
        """Forward/backward over `rows_range` in micro-batches, then one optimizer step."""
        cfg = self.cfg.learner
        mask_all = batch["mask"][rows_range.start:rows_range.stop]
        norm = {"token_mean": float(mask_all.sum()), "seq_mean": float(len(rows_range)),
                "seq_sum": float(len(rows_range) * self.cfg.rollout.max_new_tokens)}[cfg.loss_aggregation]
        sums: dict[str, float] = {}
        self.engine.train()
        for start in range(rows_range.start, rows_range.stop, self.micro):
            rows = slice(start, min(rows_range.stop, start + self.micro))
            logp = self._completion_logprobs(self.engine, batch, rows)
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_logp = self._completion_logprobs(self.reference, batch, rows)
            mask = batch["mask"][rows]
            # Each micro-batch's loss is its share of the minibatch loss (sum / minibatch norm), so the parts add
            # up exactly; DeepSpeed divides by gradient_accumulation_steps in backward, so multiply it back.
            loss, stats = policy_loss(
                logp, batch["old_logp"][rows], advantages[rows], mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                norm=norm, aggregation=cfg.loss_aggregation, dual_clip=cfg.dual_clip, ref_logp=ref_logp,
                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            )
            self.engine.backward(loss * self.accum)
            if self.engine.is_gradient_accumulation_boundary():
                sums["grad_norm"] = self._grad_norm()
            self.engine.step()
            share = float(mask.sum() / mask_all.sum())
            sums["loss"] = sums.get("loss", 0.0) + float(loss)
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + float(value) * share
        if cfg.zero_stage > 0:
            sums["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        return sums

    def _grad_norm(self) -> float:
        """Global gradient norm before clipping, from the parameters' .grad (ZeRO stage 0)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0

    # ---- publication ----------------------------------------------------------------------

    def weights(self) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """(policy_version, [(HF name, CPU tensor)]): what rollout engines load in place."""
        module = self.engine.module
        return self.version, [(name, p.detach().to("cpu").clone()) for name, p in module.state_dict().items()]

    def save_pretrained(self, directory: str) -> str:
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
        shutil.rmtree(tmp, ignore_errors=True)
        state = {"policy_version": self.version, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "numpy_rng": np.random.get_state()}
        self.engine.save_checkpoint(tmp, tag="state", client_state=state)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted((d for d in os.listdir(root) if d.startswith("step-")), key=lambda d: int(d.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old))
        self._ack()  # only now does a checkpoint hold these entries' updates
        return final

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
