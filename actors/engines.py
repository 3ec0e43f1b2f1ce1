"""Generation engines behind one small interface: vLLM (production) and HF transformers (fallback).

Both take prompt token ids and return, per prompt, n samples of
(completion token ids, per-token sampler logprobs, finish reason). Both load
new weights in place from (HF name, tensor) pairs, never by restarting.
This is the only module that imports vLLM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol


def bucket_tensors(buckets) -> list[tuple[str, object]]:
    """(HF name, torch tensor) for every parameter of published weight buckets (common/records.WeightBucket), as views
    of the buckets' buffers: no copy until the engine copies them into its own parameters."""
    import warnings

    import torch

    from scratchpad.common.records import unpack_bucket

    out = []
    with warnings.catch_warnings():  # the object store's buffers are read-only; engines only ever read them
        warnings.simplefilter("ignore", UserWarning)
        for bucket in buckets:
            for name, array in unpack_bucket(bucket):
                tensor = torch.from_numpy(array)
                out.append((name, tensor.view(torch.bfloat16) if bucket.dtype == "bfloat16" else tensor))
    return out


def _quiet_reload(tied: bool, engine_dtype: str) -> None:
    """vLLM's in-place reload warns "<Layer>: Failed to load weights" for every layer that no checkpoint tensor
    reaches, and puts that layer's tensors back as they were. Two are expected: the rotary layer (its cos/sin cache is
    a buffer no checkpoint holds) and, with tied embeddings, the output layer (its weight is the embedding's, which
    `_retie_lm_head` hands back to it after the reload). Drop those lines, and the cast warnings (`_quiet_cast`); keep
    every other."""
    import logging

    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    quiet = next((f for f in log.filters if getattr(f, "scratchpad", False)), None)
    if quiet is None:
        class Expected(logging.Filter):
            scratchpad, layers = True, {"RotaryEmbedding"}

            def filter(self, record):
                message = record.getMessage()
                return not ("Failed to load weights" in message and message.split(":")[0] in self.layers)

        quiet = Expected()
        log.addFilter(quiet)
    if tied:
        quiet.layers.add("ParallelLMHead")
    _quiet_cast(engine_dtype)


def _quiet_cast(engine_dtype: str) -> None:
    """vLLM warns for every float32 checkpoint or learner tensor loaded into a lower-precision engine, at start and at
    every reload: the cast rollout.dtype asks for. Drop those lines (once per process); keep every other."""
    import logging

    loader = logging.getLogger("vllm.model_executor.models.utils")
    if engine_dtype != "float32" and not any(getattr(f, "scratchpad", False) for f in loader.filters):
        class Cast(logging.Filter):
            scratchpad = True
            expected = f"with dtype torch.float32 into parameter with dtype torch.{engine_dtype}"

            def filter(self, record):
                return not (record.getMessage().startswith("Attempted to load weight") and self.expected in record.getMessage())

        loader.addFilter(Cast())


def _retie_lm_head(worker) -> bool:
    """Run inside vLLM's worker after `reload_weights`, for a model whose output layer shares the input embedding.

    The reload skips `lm_head.weight` (vLLM's loader drops it for tied models: it is `embed_tokens.weight`), finds no
    tensor loaded into the output layer and puts its pre-reload tensors back as a fallback: the tie breaks, and the
    model keeps scoring tokens with the old embedding (on CPU also through the old packed copy the GEMM kernel made
    of it), while it reads the new one. Measured on SmolLM2-135M: after a reload with a changed embedding, vLLM's
    greedy tokens no longer matched HF's. Tie it again and redo the output layer's post-load processing."""
    model = worker.model_runner.get_model()
    lm_head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or not hasattr(lm_head, "quant_method"):
        return False
    lm_head.weight = embed.weight
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


@dataclass
class Sample:
    token_ids: list[int]  # (C,) completion ids, EOS included when the model stopped
    logprobs: list[float]  # (C,) log p of each sampled id under the unmodified distribution
    finish_reason: str  # "stop" or "length"


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_tokens: int) -> list[list[Sample]]: ...

    def load_weights(self, named_tensors: list[tuple[str, object]]) -> None: ...


class VLLMEngine:
    """An in-process vLLM engine (V1 multiprocessing off: one process, fast start, in-place reload)."""

    def __init__(self, model_path: str, dtype: str, seed: int, kv_cache_gib: float, max_model_len: int, gpu: bool, enforce_eager: bool,
                 gpu_memory_utilization: float = 0.9):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not gpu:
            # vLLM otherwise sizes its cache from NUMA node 0's free memory and refuses on small VMs.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
        from vllm import LLM

        _quiet_cast(dtype)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            disable_log_stats=True,
            # log p of each sampled token under the distribution it was drawn from (after temperature and top-p),
            # which is the policy the learner trains: raw logprobs would be those of temperature 1
            logprobs_mode="processed_logprobs",
            enforce_eager=enforce_eager,
            **({"gpu_memory_utilization": gpu_memory_utilization} if gpu else {}),
        )
        # An output layer tied to the input embedding needs re-tying after every weight load (_retie_lm_head).
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_text_config, "tie_word_embeddings", False))
        self.dtype = dtype

    def generate(self, prompts, n, temperature, top_p, max_tokens):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_tokens, logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outputs:
            samples = []
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs)]
                samples.append(Sample(ids, lps, "stop" if comp.finish_reason == "stop" else "length"))
            result.append(samples)
        return result

    def load_weights(self, named_tensors):
        _quiet_reload(self.tied, self.dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        if self.tied:
            self.llm.collective_rpc(_retie_lm_head)
        # Prefix caching would otherwise serve KV computed under the old weights.
        self.llm.reset_prefix_cache()


class HFEngine:
    """transformers.generate: slower, but runs any causal LM on any device."""

    def __init__(self, model_path: str, dtype: str, seed: int, gpu: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        torch.manual_seed(seed)

    def generate(self, prompts, n, temperature, top_p, max_tokens):
        torch = self.torch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        rows = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), pad, device=self.device)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(rows):  # left padding so every row continues from its last column
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        sample = temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                pad_token_id=pad, output_scores=True, return_dict_in_generate=True,
            )
        new = out.sequences[:, width:]
        # scores are the logits after temperature and top-p: log p under the distribution each token was drawn from
        logps = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        result = []
        for r in range(len(rows)):
            toks = new[r].tolist()
            stop = next((k for k, t in enumerate(toks) if t in eos_ids), None)
            end = len(toks) if stop is None else stop + 1
            reason = "stop" if stop is not None else "length"
            if r % n == 0:
                result.append([])
            result[-1].append(Sample(toks[:end], logps[r, :end].tolist(), reason))
        return result

    def load_weights(self, named_tensors):
        state = dict(named_tensors)
        with self.torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in state:
                    param.copy_(state[name].to(param.device, param.dtype))
