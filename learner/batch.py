"""Batch assembly: read scored groups from the buffer, drop what must not be trained (counted, with a reason), and
turn traces into padded tensors on the learner's device.

Dropped groups are acknowledged with the trained ones, so `produced == trained + dropped + in flight` holds.
"""
from __future__ import annotations

import numpy as np
import torch

from scratchpad.common.buffer import RedisBuffer
from scratchpad.common.config import ExperimentConfig
from scratchpad.common.records import Group, unpack_ids, unpack_logprobs

PREFERENCE = ("dpo", "ipo")


class BatchAssembler:
    """This rank's share of the next batch: `fill` reads until it is full, `take` hands it over with its drops."""

    def __init__(self, cfg: ExperimentConfig, buffer: RedisBuffer, consumer: str, groups_per_rank: int):
        self.cfg, self.buffer, self.consumer, self.groups_per_rank = cfg, buffer, consumer, groups_per_rank
        self.batch: list[tuple[str, Group]] = []
        self.dropped: dict[str, int] = {}
        self.dropped_ids: list[str] = []
        self.replay: list[tuple[str, Group]] = []  # after a resume: pending entries the checkpoint does not contain

    def fill(self, version: int, block_ms: int = 2000) -> int:
        """Read groups until the share is full or the stream runs dry; returns how many are missing."""
        while (want := self.groups_per_rank - len(self.batch)) > 0:
            entries, self.replay = self.replay[:want], self.replay[want:]
            entries = entries or self.buffer.read(self.consumer, want, block_ms)
            if not entries:
                break
            for entry_id, group in entries:
                reason = self.drop_reason(group, version)
                if reason:
                    self.dropped[reason] = self.dropped.get(reason, 0) + 1
                    self.dropped_ids.append(entry_id)
                else:
                    self.batch.append((entry_id, group))
        return max(0, self.groups_per_rank - len(self.batch))

    def drop_reason(self, group: Group, version: int) -> str | None:
        cfg = self.cfg.learner
        if version - group.policy_version > cfg.max_staleness:
            return "stale"
        if len(group.traces) != self.cfg.rollout.n or any(t.reward is None for t in group.traces):
            return "invalid"
        rewards = [t.reward for t in group.traces]
        if cfg.algorithm == "star" and max(rewards) < cfg.star_threshold:
            return "filtered"  # nothing verified to imitate
        if (cfg.filter_groups or cfg.algorithm in PREFERENCE) and max(rewards) == min(rewards):
            return "filtered"  # all equal: no advantage, no preference
        return None

    def take(self) -> tuple[list[tuple[str, Group]], list[str], dict[str, int]]:
        """(entries to train, ids of dropped entries, drop counts by reason); the share starts empty again."""
        out = (self.batch, self.dropped_ids, self.dropped)
        self.batch, self.dropped_ids, self.dropped = [], [], {}
        return out


def to_tensors(traces: list, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors of prompt + completion, on `device`. Shapes: input_ids/attention (n, W); targets,
    old_logp (the sampler's log p) and mask (n, C); starts (n,) where each completion begins; rewards (n,);
    prompt_of (n,) the first row with the same prompt tokens (rows of one group share it: shared_prompt_layout)."""
    prompts = [unpack_ids(t.prompt_ids).astype(np.int64) for t in traces]
    completions = [unpack_ids(t.completion_ids).astype(np.int64) for t in traces]
    n = len(traces)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    comp_width = max(len(c) for c in completions)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    targets = np.full((n, comp_width), pad_id, dtype=np.int64)
    old_logp = np.zeros((n, comp_width), dtype=np.float32)
    mask = np.zeros((n, comp_width), dtype=np.float32)
    starts = np.zeros(n, dtype=np.int64)
    first_row: dict[bytes, int] = {}
    prompt_of = np.array([first_row.setdefault(t.prompt_ids, i) for i, t in enumerate(traces)], dtype=np.int64)
    for i, (t, prompt, completion) in enumerate(zip(traces, prompts, completions)):
        p, c = len(prompt), len(completion)
        input_ids[i, :p], input_ids[i, p : p + c] = prompt, completion
        attention[i, : p + c] = 1
        targets[i, :c] = completion
        old_logp[i, :c] = unpack_logprobs(t.logprobs)
        mask[i, :c] = 1
        starts[i] = p
    arrays = {"input_ids": input_ids, "attention": attention, "targets": targets, "old_logp": old_logp, "mask": mask,
              "starts": starts, "rewards": np.array([t.reward for t in traces], dtype=np.float32),
              "lengths": starts + mask.sum(1).astype(np.int64), "prompt_of": prompt_of}
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def positions(batch: dict[str, torch.Tensor], rows: slice, width: int) -> torch.Tensor:
    """(b, C) positions whose output predicts each completion token: token k of row i sits at starts[i] + k and is
    predicted from starts[i] + k - 1; padding positions are clamped into the row."""
    comp = batch["targets"].shape[1]
    pos = batch["starts"][rows].unsqueeze(1) - 1 + torch.arange(comp, device=batch["starts"].device).unsqueeze(0)
    return pos.clamp(max=width - 1)


def micro_batches(batch: dict[str, torch.Tensor], rows_range: range, max_rows: int, max_tokens: int, unit: int = 1) -> list[slice]:
    """Consecutive rows, at most max_rows each and, with max_tokens, at most that many rows x padded width; a unit
    (a chosen/rejected pair) is never split."""
    lengths = batch["lengths"].tolist()
    out, start, width = [], rows_range.start, 0
    for row in range(rows_range.start, rows_range.stop, unit):
        unit_width = max(lengths[row : row + unit])
        width_with, rows_with = max(width, unit_width), row + unit - start
        if row > start and (rows_with > max_rows or (max_tokens and rows_with * width_with > max_tokens)):
            out.append(slice(start, row))
            start, width_with = row, unit_width
        width = width_with
    if rows_range.stop > start:
        out.append(slice(start, rows_range.stop))
    return out


def shared_prompt_layout(batch: dict[str, torch.Tensor], rows: slice, min_width: int = 512) -> dict[str, torch.Tensor]:
    """The rows of a micro-batch packed so each prompt is computed once (learner.share_prompts): one packed row per
    distinct prompt, [prompt, completion 1, completion 2, ...], right-padded to the longest. Each completion sees
    its prompt and its own earlier tokens only (a block mask) and takes the positions it had after its prompt, so
    every completion token's hidden state is the one the padded layout computes, from a prompt forward shared by the
    group's samples instead of repeated n times.

    A packed row holds at most max(min_width, 2 x the longest padded row) tokens; a group whose completions do not
    fit continues in another row with its prompt again. So attention, which runs over the whole packed row (masked
    entries included), never grows past a few padded rows' worth, and the mask stays small for long completions.

    Returns input_ids and position_ids (B, T), a boolean attention mask (B, 1, T, T) (True: may attend), and
    `predictor` (b, C): for completion token k of row i, the index into the flattened (B * T) hidden states whose
    output predicts it (the prompt's last position for k = 0); padding points at position 0 and is masked later."""
    starts = batch["starts"][rows].tolist()
    lengths = batch["lengths"][rows].tolist()
    owners = batch["prompt_of"][rows].tolist()
    input_ids = batch["input_ids"][rows].cpu().numpy()
    comp = batch["targets"].shape[1]
    limit = max(min_width, 2 * max(lengths))
    packed: list[list[int]] = []  # local rows of each packed row; the first one's prompt heads it
    open_row: dict[int, int] = {}  # prompt owner -> its packed row still taking completions
    used: list[int] = []
    for local, owner in enumerate(owners):
        c = lengths[local] - starts[local]
        b = open_row.get(owner)
        if b is None or used[b] + c > limit:
            open_row[owner], b = len(packed), len(packed)
            packed.append([])
            used.append(starts[local])
        packed[b].append(local)
        used[b] += c
    width = max(used)
    ids = np.zeros((len(packed), width), dtype=np.int64)
    pos = np.zeros((len(packed), width), dtype=np.int64)
    segment = np.full((len(packed), width), -1, dtype=np.int64)  # 0 prompt, s >= 1 completion s, -1 padding
    predictor = np.zeros((len(owners), comp), dtype=np.int64)
    for b, members in enumerate(packed):
        p = starts[members[0]]
        ids[b, :p], pos[b, :p], segment[b, :p] = input_ids[members[0], :p], np.arange(p), 0
        at = p
        for s, row in enumerate(members, start=1):
            c = lengths[row] - starts[row]
            if c == 0:
                continue
            ids[b, at : at + c] = input_ids[row, p : p + c]
            pos[b, at : at + c] = np.arange(p, p + c)
            segment[b, at : at + c] = s
            predictor[row, :c] = b * width + np.concatenate(([p - 1], np.arange(at, at + c - 1)))
            at += c
    device = batch["input_ids"].device  # the (B, T, T) mask is built where attention runs, not moved there
    seg = torch.from_numpy(segment).to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal & ((seg.unsqueeze(1) == 0) | (seg.unsqueeze(1) == seg.unsqueeze(2)))  # (B, query, key)
    return {"input_ids": torch.from_numpy(ids).to(device), "position_ids": torch.from_numpy(pos).to(device),
            "attention_mask": allowed.unsqueeze(1), "predictor": torch.from_numpy(predictor).to(device)}
