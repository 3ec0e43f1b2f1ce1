"""Per-token log-probabilities of completions without materialising full-vocabulary copies.

A causal LM's `forward` returns logits for every position: (b, W, V) floats, 1.9 GB for 64 rows x 150 positions x
49,152 words. Here the decoder runs alone, the hidden states of the completion positions are picked, and the output
head runs over chunks of `chunk_tokens` real tokens at a time inside activation checkpointing, so only one chunk's
(chunk, V) logits exist at once, in the forward and again in the backward. Entropy comes from the same chunk's
logits, under no_grad unless its gradient is wanted (entropy_coef > 0).

With a sampling temperature T the policy is softmax(logits / T): the distribution the rollouts were drawn from and
the one the engines report log p under (vLLM's processed logprobs, HF's processed scores). Training the T = 1
policy on T = 0.7 samples instead would be off-policy by the temperature, with nothing to correct it.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, entropy: bool, entropy_grad: bool,
           temperature: float):
    logits = head(hidden).float()  # (n, V), upcast: half-precision log-softmax loses the small probabilities
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp, torch.zeros_like(logp)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, ent


def hidden_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def completion_logprobs(model, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor, chunk_tokens: int = 1024, entropy: bool = False, entropy_grad: bool = False,
                        temperature: float = 1.0, packed: dict | None = None):
    """(b, C) log p(targets) predicted from `positions` (b, C) of input_ids (b, W), 0 where mask is 0; and the
    (b, C) entropy there when `entropy` (else None), both of softmax(logits / temperature). `model` is a Hugging
    Face causal LM (or a module wrapping one). With `packed` (batch.shared_prompt_layout) the decoder runs once
    per distinct prompt over the packed rows instead, and input_ids, attention and positions are not used."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    b, c = targets.shape
    if packed is not None:
        mask4d, kind = packed["attention_mask"], getattr(model.config, "_attn_implementation", None) or "sdpa"
        if kind == "eager":  # eager attention adds its mask to the scores
            mask4d = torch.zeros(mask4d.shape, dtype=hidden_dtype(model), device=mask4d.device).masked_fill(
                ~mask4d, torch.finfo(hidden_dtype(model)).min)
        elif kind != "sdpa":
            raise ValueError(f"learner.share_prompts: the model's attention ({kind}) takes no block mask; use sdpa or eager, or share_prompts: false")
        hidden = decoder(input_ids=packed["input_ids"], attention_mask=mask4d,
                         position_ids=packed["position_ids"]).last_hidden_state  # (B, T, H)
        picked = hidden.reshape(-1, hidden.shape[-1])[packed["predictor"].reshape(-1)]  # (b*C, H)
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state  # (b, W, H)
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).reshape(b * c, -1)  # (b*C, H)
    real = mask.reshape(-1).nonzero().squeeze(1)  # padding never reaches the head
    rows, wanted = picked[real], targets.reshape(-1)[real]
    logp_parts, ent_parts = [], []
    grad = torch.is_grad_enabled()
    for start in range(0, rows.shape[0], chunk_tokens):
        args = (head, rows[start : start + chunk_tokens], wanted[start : start + chunk_tokens], softcap, entropy, entropy_grad,
                float(temperature))
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logp_parts.append(lp)
        ent_parts.append(ent)
    flat = torch.zeros(b * c, dtype=torch.float32, device=hidden.device)
    logp = flat.index_put((real,), torch.cat(logp_parts)) if logp_parts else flat
    if not entropy:
        return logp.view(b, c), None
    ent = flat.index_put((real,), torch.cat(ent_parts)) if ent_parts else flat
    return logp.view(b, c), ent.view(b, c)
