"""The chunked selective log-softmax gives the full-vocabulary log-softmax's values and gradients."""
import pytest
import torch

from scratchpad.learner.logprobs import completion_logprobs


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).float()


def reference(model, ids, att, pos, targets, mask, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=att).logits / temperature
    picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    logp = torch.log_softmax(picked, -1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    return chosen, entropy


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (3, 1.0), (1024, 1.0), (3, 0.6)])
def test_values_and_gradients_match_full_softmax(model, chunk, temperature):
    torch.manual_seed(1)
    ids = torch.randint(0, 301, (3, 12))
    att = torch.ones_like(ids)
    att[2, 9:] = 0
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    mask[2, 2:] = 0
    pos = (torch.tensor([4, 6, 6]).unsqueeze(1) + torch.arange(5)).clamp(max=11)
    targets = torch.randint(0, 301, (3, 5))
    want, want_ent = reference(model, ids, att, pos, targets, mask, temperature)
    (want.sum() + 0.3 * want_ent.sum()).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got, got_ent = completion_logprobs(model, ids, att, pos, targets, mask, chunk_tokens=chunk, entropy=True, entropy_grad=True,
                                           temperature=temperature)
    (got.sum() + 0.3 * got_ent.sum()).backward()
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_ent, want_ent, atol=1e-5)
    assert (got[mask == 0] == 0).all()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[n], atol=1e-5), n
    model.zero_grad()


def test_entropy_carries_no_gradient_unless_asked(model):
    ids = torch.randint(0, 301, (2, 8))
    pos = (torch.tensor([3, 3]).unsqueeze(1) + torch.arange(4))
    targets, mask = torch.randint(0, 301, (2, 4)), torch.ones(2, 4)
    _, ent = completion_logprobs(model, ids, torch.ones_like(ids), pos, targets, mask, entropy=True, entropy_grad=False)
    assert not ent.requires_grad
    _, ent = completion_logprobs(model, ids, torch.ones_like(ids), pos, targets, mask, entropy=True, entropy_grad=True)
    assert ent.requires_grad


def _traces(groups: int, n: int, seed: int):
    import random

    import numpy as np

    from scratchpad.common.records import Trace, pack_ids, pack_logprobs

    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(301) for _ in range(rng.randint(2, 9))]
        for k in range(n):
            completion = [rng.randrange(301) for _ in range(rng.randint(1, 7))]
            out.append(Trace(trace_id=f"{g}:{k}", group_id=str(g), prompt_id=str(g), prompt="p", prompt_ids=pack_ids(prompt),
                             completion="c", completion_ids=pack_ids(completion), logprobs=pack_logprobs(np.zeros(len(completion))),
                             finish_reason="stop", policy_version=0, reference="1", reward=float(k % 2)))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("n,rows,min_width", [(4, slice(0, 12), 512), (4, slice(2, 9), 512), (8, slice(0, 24), 0)])
def test_shared_prompt_layout_gives_the_padded_layouts_values_and_gradients(model, attention, n, rows, min_width):
    """learner.share_prompts: each prompt computed once for its group's samples, every completion token's log p,
    entropy and the gradients they send back equal to the padded layout's, where each row carries its prompt. The
    cases: the whole batch; a slice that cuts two groups; packed rows capped at twice the longest padded row, so
    groups continue in a second row."""
    from scratchpad.learner.batch import positions, shared_prompt_layout, to_tensors

    model.config._attn_implementation = attention
    batch = to_tensors(_traces(3, n, seed=5), pad_id=0, device=torch.device("cpu"))
    width = int(batch["lengths"][rows].max())
    args = (batch["input_ids"][rows, :width], batch["attention"][rows, :width], positions(batch, rows, width),
            batch["targets"][rows], batch["mask"][rows])
    results = []
    for packed in (None, shared_prompt_layout(batch, rows, min_width)):
        model.zero_grad()
        logp, ent = completion_logprobs(model, *args, chunk_tokens=5, entropy=True, entropy_grad=True, packed=packed)
        (logp.sum() + 0.3 * ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    layout = shared_prompt_layout(batch, rows, min_width)
    distinct = len(set(batch["prompt_of"][rows].tolist()))
    if min_width:
        assert layout["input_ids"].shape[0] == distinct < rows.stop - rows.start  # one packed row per prompt
    else:
        assert distinct < layout["input_ids"].shape[0] < rows.stop - rows.start  # some groups take two rows
        assert layout["input_ids"].shape[1] <= 2 * int(batch["lengths"][rows].max())
    (want, want_ent, want_grads), (got, got_ent, got_grads) = results
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_ent, want_ent, atol=1e-5)
    assert (got[batch["mask"][rows] == 0] == 0).all()
    for n in want_grads:
        assert torch.allclose(got_grads[n], want_grads[n], atol=1e-5), n
    model.config._attn_implementation = "sdpa"
    model.zero_grad()
