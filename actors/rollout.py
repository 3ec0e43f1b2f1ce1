"""The rollout worker a rollout actor hosts: prompts in, groups of parsed traces out.

It formats each prompt through the configured template (actors/formatting.PromptFormat: plain for the tiny model,
the chat template for an instruct model, with the instruction and worked examples), samples n completions with its
engine, parses thought and answer in task.answer_format, and stamps every trace with the policy version it holds.
"""
from __future__ import annotations

import math
import time
import uuid

from scratchpad.actors.engines import bucket_tensors
from scratchpad.actors.formatting import PromptFormat
from scratchpad.common.config import ROLLOUT_CONTEXT_CAP, ExperimentConfig
from scratchpad.common.records import Group, Prompt, Trace, pack_ids, pack_logprobs


class RolloutWorker:
    def __init__(self, cfg: ExperimentConfig, model_path: str, index: int = 0):
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(cfg.run.threads_for("eval" if index >= cfg.rollout.num_engines else "rollout"))  # the evaluator comes after the engines
        self.cfg = cfg
        self.index = index
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.prompt_format = PromptFormat(cfg.task, self.tokenizer)
        self.chat = self.prompt_format.chat
        self.version = 0
        seed = cfg.rollout.seed + index
        gpu = cfg.rollout.gpus_per_engine > 0
        dtype = cfg.rollout.dtype or cfg.model.dtype
        if cfg.rollout.engine == "vllm":
            from scratchpad.actors.engines import VLLMEngine

            max_len = self._max_model_len(model_path)
            self.engine = VLLMEngine(model_path, dtype, seed, cfg.rollout.kv_cache_gib, max_len, gpu, cfg.rollout.enforce_eager,
                                      cfg.rollout.gpu_memory_utilization)
        else:
            from scratchpad.actors.engines import HFEngine

            self.engine = HFEngine(model_path, dtype, seed, gpu)

    def _max_model_len(self, model_path: str) -> int:
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", ROLLOUT_CONTEXT_CAP)
        return min(limit, ROLLOUT_CONTEXT_CAP)

    def format(self, prompt: Prompt) -> str:
        return self.prompt_format.render(prompt.text)

    def generate(self, prompts: list[Prompt], greedy: bool = False) -> list[Group]:
        """n sampled completions per prompt (1 greedy completion when greedy)."""
        texts = [self.format(p) for p in prompts]
        # Chat templates already hold BOS; the tiny tokenizer adds it. Never both.
        ids = [self.tokenizer(t, add_special_tokens=not self.chat)["input_ids"] for t in texts]
        r = self.cfg.rollout
        n = 1 if greedy else r.n
        samples = self.engine.generate(ids, n, 0.0 if greedy else r.temperature, r.top_p, r.max_new_tokens)
        now = time.time()
        groups = []
        for prompt, text, prompt_ids, group_samples in zip(prompts, texts, ids, samples):
            group_id = f"{prompt.prompt_id}/{uuid.uuid4().hex[:12]}"
            traces = []
            for k, s in enumerate(group_samples):
                completion = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                thought, answer, closed = self.prompt_format.parse(completion)
                traces.append(Trace(
                    trace_id=f"{group_id}:{k}", group_id=group_id, prompt_id=prompt.prompt_id, prompt=text,
                    prompt_ids=pack_ids(prompt_ids), question=prompt.text, completion=completion, completion_ids=pack_ids(s.token_ids),
                    logprobs=pack_logprobs(s.logprobs),
                    finish_reason=s.finish_reason, policy_version=self.version, reference=prompt.answer,
                    thought=thought, answer=answer, closed=closed, meta=prompt.meta,
                ))
            groups.append(Group(group_id=group_id, prompt_id=prompt.prompt_id, policy_version=self.version, traces=traces, created_at=now))
        return groups

    def join_weight_group(self, host: str, port: int, rank: int, members: list[str], backend: str, timeout_s: float) -> None:
        """Join learner rank 0's weight group (learner.weight_transport: collective) and allocate the receive buffers
        once, so no load pays for fresh pages."""
        import torch

        from scratchpad.common.weight_group import WeightGroup

        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = None
        group = WeightGroup(host, port, rank, members, backend, timeout_s)
        self.layout = group.share_layout(None)
        self.receive_buffers = [torch.empty(b.nbytes, dtype=torch.uint8, device=group.device) for b in self.layout]
        self.weight_group = group

    def receive_weights(self, version: int) -> int:
        """Receive version `version` from the weight group and load it in place; returns the version now held."""
        import torch

        self.weight_group.broadcast(self.receive_buffers, version)
        named = []
        for bucket, buffer in zip(self.layout, self.receive_buffers):
            flat, offset = buffer.view(getattr(torch, bucket.dtype)), 0
            for name, shape in zip(bucket.names, bucket.shapes):
                count = math.prod(shape)
                named.append((name, flat[offset:offset + count].view(shape)))
                offset += count
        self.engine.load_weights(named)
        self.version = version
        return self.version

    def update_weights(self, published: tuple[int, list]) -> int:
        """Load (policy_version, [WeightBucket]) into the running engine in place; returns the version now held."""
        version, buckets = published
        self.engine.load_weights(bucket_tensors(buckets))
        self.version = version
        return self.version
