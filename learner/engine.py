"""Engine setup: the process group, DeepSpeed engines, the critic, and collectives on the learner's device.

The only module that imports DeepSpeed. On a GPU each learner rank is a Ray actor that sees exactly the GPU Ray
assigned it (CUDA_VISIBLE_DEVICES), so its local device is cuda:0 whatever its global rank; the rendezvous
address is rank 0's node, so ranks may span nodes. Collectives (gloo on CPU, NCCL on GPU) run on tensors that
live on the learner's device.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import torch

from scratchpad.common.config import ExperimentConfig


def learner_device(num_gpus: float) -> torch.device:
    """cuda:0 (the one GPU Ray shows this actor) when the learner reserved a GPU and one is visible; else the CPU."""
    if num_gpus > 0 and torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device,
                     timeout_s: float = 600.0) -> None:
    import deepspeed

    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": "0" if device.type == "cuda" else str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
    })
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over all learner ranks (identity with one rank)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's (equal-length) tensor in rank order; returns it and where this rank's rows start."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor, 0
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts), torch.distributed.get_rank() * tensor.shape[0]


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def gathered(module):
    """Context in which `module`'s parameters are whole on every rank: under ZeRO-3 a collective every rank must enter
    (it gathers the full model at once); a no-op at stages 0-2, where they are whole anyway."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


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


def ds_config(cfg: ExperimentConfig, micro: int, world_size: int) -> dict:
    # At ZeRO stage 0 the optimizer's step pre-hook clips (after DeepSpeed's all-reduce) and records the norm; at
    # stages 1-3 the hook would see only this rank's partition, so DeepSpeed clips the global norm itself.
    # The loop owns the accumulation boundary (managed_gradient_accumulation off): micro-batches of any number and
    # size accumulate until engine.step(), and each carries its own share of the loss, so nothing is rescaled.
    # bf16: the module computes in bf16 while DeepSpeed's optimizer keeps fp32 master weights (the model is loaded
    # in fp32 by the learner).
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


def lr_factor(version: int, warmup: int, schedule: str, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for the optimizer steps of learner step `version` (0-based): a linear
    warmup over `warmup` steps, then constant or a linear/cosine decay that reaches `min_ratio` at step `total`."""
    if warmup and version < warmup:
        return (version + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (version - warmup) / (total - warmup))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def schedule_factor(cfg: ExperimentConfig, warmup: int, schedule: str, start: int = 0):
    """The scheduler's multiplier by optimizer step. It counts the engine's optimizer steps, of which each learner
    step takes ppo_epochs x minibatches, and maps them to learner steps, so warmup and decay are in learner steps
    whatever the minibatching. An engine that first steps at learner step `start` (the policy after PPO's
    critic_warmup_steps) warms up over its own first steps and still ends its decay at run.steps."""
    per_version = cfg.learner.ppo_epochs * cfg.learner.minibatches
    total = max(cfg.run.steps - start, 1)
    return lambda s: lr_factor(s // per_version, warmup, schedule, total, cfg.learner.min_lr_ratio)


def build_engine(cfg: ExperimentConfig, model, lr: float, warmup: int, micro: int, world_size: int, on_norm,
                 schedule: str = "constant", start: int = 0):
    """A DeepSpeed engine around `model` with AdamW, linear warmup and `schedule` after it (learner.lr_schedule,
    in learner steps: `schedule_factor`). At ZeRO 0,
    `on_norm(norm)` gets the clipped gradient norm of each step (computed inside engine.step(), after the
    gradients are averaged over ranks)."""
    import deepspeed

    lc = cfg.learner
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=lc.weight_decay, betas=(0.9, lc.adam_beta2), eps=lc.adam_eps)
    if lc.zero_stage == 0:
        def clip(opt, args, kwargs):
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            on_norm(float(torch.nn.utils.clip_grad_norm_(params, lc.grad_clip or float("inf"))))
        optim.register_step_pre_hook(clip)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule_factor(cfg, warmup, schedule, start))
    # The float32 weights themselves: DeepSpeed replaces each parameter's data with a bf16 copy, and these keep the old.
    checkpoint = {name: p.detach() for name, p in model.named_parameters()} if cfg.model.dtype == "bfloat16" else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched, config=ds_config(cfg, micro, world_size))
    if checkpoint is not None:
        seed_fp32_masters(engine, checkpoint)
    return engine


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The optimizer's float32 master of each parameter of a bf16 engine, by name: at ZeRO 0 the tensors the
    optimizer steps (FP16_UnfusedOptimizer's fp32_groups); at ZeRO 1-3 a copy assembled from every rank's partition,
    a collective every rank must enter."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        by_id = {id(low): high for lows, highs in zip(opt.fp16_groups, opt.fp32_groups) for low, high in zip(lows, highs)}
        return {name: by_id[id(p)] for name, p in engine.module.named_parameters() if id(p) in by_id}
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}


def seed_fp32_masters(engine, checkpoint: dict[str, torch.Tensor]) -> None:
    """Start a bf16 engine's float32 masters at the checkpoint's float32 weights. DeepSpeed casts the module to bf16
    first and copies its masters from the cast, so they would start at the checkpoint rounded to bf16: on SmolLM2 up
    to 0.013 off, and a typical element 1e-4 off, the size of 25 Adam steps at lr 4e-6."""
    opt = engine.optimizer
    with torch.no_grad():
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            for name, master in fp32_masters(engine).items():
                master.copy_(checkpoint[name])
            return
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in engine.module.named_parameters():
            safe_set_full_fp32_param(p, checkpoint[name].to(engine.device))


def frozen_reference(cfg: ExperimentConfig, model_path: str, micro: int, world_size: int, device: torch.device):
    """The frozen reference policy on the learner's device; under ZeRO-3 partitioned like the policy (a forward
    gathers one layer at a time)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.model.dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
    if cfg.learner.zero_stage == 3:
        return deepspeed.initialize(model=reference, config=ds_config(cfg, micro, world_size))[0]
    return reference.to(device)
