"""Publication and checkpoints: weights for the rollout engines, the final HF model, DeepSpeed checkpoints.

Weights leave rank 0 as a few buckets (common/records.WeightBucket) in one object-store put that every reader maps
zero-copy. On a CPU learner at ZeRO 0-2 the buckets hold views of the parameters, so the put is the only copy. A checkpoint is written under a temporary
name and renamed into place, so a crash never leaves a half-written `step-N`; only then are the entries it holds
acknowledged.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from scratchpad.common.records import WeightBucket
from scratchpad.learner.engine import barrier, fp32_masters, gathered


def grouped(named: list[tuple[str, torch.Tensor]], bucket_bytes: int):
    """Parameters grouped into buckets of about `bucket_bytes`, one dtype per bucket, in order; a tensor shared by two
    names (tied embeddings) travels once, under its first name. Yields (dtype, [(name, tensor)])."""
    seen: set[int] = set()
    pending: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        pending.setdefault(tensor.dtype, []).append((name, tensor))
        if sum(t.numel() * t.element_size() for _, t in pending[tensor.dtype]) >= bucket_bytes:
            yield tensor.dtype, pending.pop(tensor.dtype)
    for dtype in list(pending):
        yield dtype, pending.pop(dtype)


def buckets_of(named: list[tuple[str, torch.Tensor]], bucket_bytes: int, copy: bool = True) -> list[WeightBucket]:
    """Buckets for the object store (see grouped). copy packs each bucket into one flat CPU buffer (off a GPU, or
    out of parameters that are gathered only for the call); without it, a CPU tensor travels as a view of itself, and
    the object-store put that follows is the only copy. A fresh multi-GB buffer per publication is not free: its
    pages fault in on first touch, which measured 1.2-5.3 s for a 0.5B model's 1.8 GB here against 0.14 s for the put
    of the views (bench/weight_sync.py)."""

    def as_numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()

    out: list[WeightBucket] = []
    for dtype, items in grouped(named, bucket_bytes):
        flat = [t.detach().reshape(-1) for _, t in items]
        if copy or any(t.device.type != "cpu" for t in flat):
            flat = [torch.cat(flat).to("cpu")]  # one copy; one transfer off a GPU
        out.append(WeightBucket([n for n, _ in items], [list(t.shape) for _, t in items], str(dtype).removeprefix("torch."),
                                [as_numpy(t) for t in flat]))
    return out


def publish(learner, every_rank: bool = False) -> tuple[int, list[WeightBucket]]:
    """(policy_version, buckets) of the policy; call it on every rank (a collective under ZeRO-3). Only rank 0
    returns buckets unless every_rank. At ZeRO 0-2 on a CPU the buckets are views of the live parameters: the caller
    must serialise them (Ray does, as the actor method returns) or copy them before the next step changes them."""
    with gathered(learner.engine.module):
        if learner.rank != 0 and not every_rank:
            return learner.version, []
        named = list(learner.engine.module.state_dict(keep_vars=False).items())
        views = learner.cfg.learner.zero_stage < 3  # ZeRO-3's gathered parameters are gone once the context exits
        return learner.version, buckets_of(named, learner.cfg.learner.publish_bucket_mb * 2**20, copy=not views)


def join_weight_group(learner, host: str, port: int, members: list[str], backend: str, timeout_s: float) -> None:
    """Learner rank 0 opens the weight group (common/weight_group.py) and shares the buckets' layout; call it on
    every rank."""
    from scratchpad.common.weight_group import BucketLayout, WeightGroup

    if learner.rank != 0:
        with gathered(learner.engine.module):  # ZeRO-3: rank 0's gather needs every rank
            return
    if getattr(learner, "weight_group", None) is not None:
        learner.weight_group.close()
    learner.weight_group = None
    group = WeightGroup(host, port, 0, members, backend, timeout_s)
    with gathered(learner.engine.module):
        named = list(learner.engine.module.state_dict(keep_vars=False).items())
        layout = [BucketLayout([n for n, _ in items], [list(t.shape) for _, t in items], str(dtype).removeprefix("torch."),
                               sum(t.numel() * t.element_size() for _, t in items))
                  for dtype, items in grouped(named, learner.cfg.learner.publish_bucket_mb * 2**20)]
    group.share_layout(layout)
    learner.weight_group = group


def broadcast_weights(learner) -> int:
    """Send the policy to every engine of the weight group, one flat bucket at a time; call it on every rank (a
    collective under ZeRO-3). Returns the policy version sent."""
    with gathered(learner.engine.module):
        if learner.rank != 0:
            return learner.version
        group = learner.weight_group
        named = list(learner.engine.module.state_dict(keep_vars=False).items())
        buffers = [torch.cat([t.detach().reshape(-1) for _, t in items]).view(torch.uint8).to(group.device)
                   for _, items in grouped(named, learner.cfg.learner.publish_bucket_mb * 2**20)]
        group.broadcast(buffers, learner.version)
    return learner.version


def save_pretrained(learner, directory: str) -> str:
    """The HF model and tokenizer, written by rank 0; call it on every rank. bf16 training writes its float32
    masters (the weights it trains), not the bf16 copy the forward runs on, so no precision is lost to the next run."""
    masters = fp32_masters(learner.engine) if learner.cfg.model.dtype == "bfloat16" else None  # a collective at ZeRO-3
    with gathered(learner.engine.module):
        if learner.rank == 0:
            module = learner.engine.module
            if masters is None:
                module.save_pretrained(directory)
            else:
                module.save_pretrained(directory, state_dict={name: t.detach().cpu() for name, t in masters.items()})
                # save_pretrained records the module's dtype (bf16); the tensors it wrote are float32
                config = Path(directory) / "config.json"
                config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "float32"}, indent=2) + "\n")
            learner.tokenizer.save_pretrained(directory)
    return directory


def load_checkpoint(learner, path: str) -> None:
    _, state = learner.engine.load_checkpoint(path, tag="state")
    if learner.critic is not None:
        learner.critic.load_checkpoint(path, tag="critic")
    learner.version = state["policy_version"]
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])


def save_checkpoint(learner, root: str, keep: int) -> str:
    """DeepSpeed checkpoint (model, optimizer, scheduler, policy version, RNG) as `root/step-<version>`; keeps the
    newest `keep`. Every rank must call it (the save is a collective)."""
    final = os.path.join(root, f"step-{learner.version}")
    tmp = os.path.join(root, f".tmp-step-{learner.version}")
    if learner.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(learner.world_size)
    state = {"policy_version": learner.version, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "numpy_rng": np.random.get_state()}
    learner.engine.save_checkpoint(tmp, tag="state", client_state=state)
    if learner.critic is not None:
        learner.critic.save_checkpoint(tmp, tag="critic")
    barrier(learner.world_size)
    if learner.rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted((d for d in os.listdir(root) if d.startswith("step-")), key=lambda d: int(d.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier(learner.world_size)
    return final
