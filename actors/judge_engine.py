"""The judge's engine actor: text in, text out, on vLLM (or HF transformers), for a `judge` reward component.

It is an engine host like a rollout actor, so it lives beside the engines (actors/engines.py, the one vLLM import
site). The reward side (rewards/judge.py: prompts, parsing, retries, cache) reaches it only through a Ray handle.
"""
from __future__ import annotations


class JudgeEngine:
    """One engine for one judge component; `complete` is called by every reward actor's Judge."""

    def __init__(self, component, policy_path: str, dtype: str = "float32", seed: int = 0, threads: int | None = None):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        path = component.model_path or policy_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None
        gpu = component.num_gpus > 0
        if component.engine == "vllm":
            from scratchpad.actors.engines import VLLMEngine

            max_len = min(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096), 4096)
            self.engine = VLLMEngine(path, dtype, seed, component.kv_cache_gib, max_len, gpu, enforce_eager=True,
                                     gpu_memory_utilization=component.gpu_memory_utilization)
        else:
            from scratchpad.actors.engines import HFEngine

            self.engine = HFEngine(path, dtype, seed, gpu)

    def complete(self, texts: list[str], temperature: float, max_new_tokens: int) -> list[str]:
        """One reply per judge prompt (an instruct model gets it as the user turn of its chat template)."""
        if self.chat:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                     for t in texts]
        ids = [self.tokenizer(t, add_special_tokens=not self.chat)["input_ids"] for t in texts]
        samples = self.engine.generate(ids, 1, temperature, 1.0, max_new_tokens)
        return [self.tokenizer.decode(s[0].token_ids, skip_special_tokens=True) for s in samples]
