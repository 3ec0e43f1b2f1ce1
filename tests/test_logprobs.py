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
