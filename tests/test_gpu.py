"""The GPU path: a learner step on the device, and vLLM on the GPU matching HF after an update at bf16 tolerance.
Skipped without CUDA (bench/gpu_check.sh runs these on a one-GPU machine)."""
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_learner_step_on_device(tiny_model, cache_dir, tmp_path):
    from conftest import small_config
    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer, free_port
    from scratchpad.learner.learner import Learner
    from test_learner_equivalence import synthetic_groups

    cfg = small_config(cache_dir, "learner.num_gpus=1", "model.dtype=bfloat16", "learner.kl_coef=0.05")
    redis = EmbeddedRedis(tmp_path / "redis").start()
    try:
        address = BufferAddress(redis.url, "sp:gpu:", 1000)
        learner = Learner(cfg, tiny_model, address, 0, 1, free_port())
        assert next(learner.engine.module.parameters()).device.type == "cuda"
        assert next(learner.reference.parameters()).device.type == "cuda"
        before = {n: p.detach().float().clone() for n, p in learner.engine.module.named_parameters()}
        RedisBuffer(address).put(synthetic_groups(learner.tokenizer, cfg.rollout.prompts_per_step, cfg.rollout.n, 0, "g"))
        assert learner.fill_batch(500) == 0
        metrics = learner.train()
        assert metrics["policy_version"] == 1 and metrics["grad_norm"] > 0
        moved = max((p.detach().float() - before[n]).abs().max().item() for n, p in learner.engine.module.named_parameters())
        assert moved > 0
        version, buckets = learner.weights()
        assert version == 1 and buckets and buckets[0].dtype == "bfloat16"
    finally:
        redis.stop()


def test_vllm_matches_hf_after_update_bf16(tiny_model, tmp_path):
    """Weights loaded in place into vLLM on the GPU: its sampled-token logprobs match HF's teacher-forced ones at bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scratchpad.actors.engines import VLLMEngine, bucket_tensors
    from scratchpad.learner.publish import buckets_of

    tok = AutoTokenizer.from_pretrained(tiny_model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # an "update"
    engine = VLLMEngine(tiny_model, "bfloat16", 0, 1.0, 256, True, True, 0.3)
    engine.load_weights(bucket_tensors(buckets_of(list(hf.state_dict().items()), 2**26)))
    prompts = [tok(f"A=[{i},{i + 1},3] i=1\n")["input_ids"] for i in range(8)]
    samples = engine.generate(prompts, 1, 0.0, 1.0, 24)
    gaps = []
    for prompt, [s] in zip(prompts, samples):
        ids = torch.tensor([prompt + s.token_ids]).cuda()
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits.float(), -1)[0, len(prompt) - 1 : -1]
        teacher = logp.gather(-1, torch.tensor(s.token_ids).cuda().unsqueeze(-1)).squeeze(-1)
        gaps.append((teacher.cpu() - torch.tensor(s.logprobs)).abs().mean().item())
    assert max(gaps) < 0.1, gaps


def _nccl_member(rank: int, port: int, queue) -> None:
    import torch

    from scratchpad.common.weight_group import BucketLayout, WeightGroup

    torch.cuda.set_device(rank)
    members = ["learner rank 0", "rollout actor 0"]
    try:
        group = WeightGroup("127.0.0.1", port, rank, members, "nccl", 60)
        layout = group.share_layout([BucketLayout(["w"], [[4096]], "bfloat16", 8192)] if rank == 0 else None)
        torch.manual_seed(0)
        sent = torch.randn(4096, device="cuda").to(torch.bfloat16)
        buffer = sent.view(torch.uint8).clone() if rank == 0 else torch.empty(layout[0].nbytes, dtype=torch.uint8, device="cuda")
        group.broadcast([buffer], 1)
        queue.put((rank, bool(torch.equal(buffer.view(torch.bfloat16), sent))))
    except Exception as exc:  # noqa: BLE001 (reported to the test)
        queue.put((rank, f"{type(exc).__name__}: {exc}"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the learner and the engine on different GPUs")
def test_nccl_weight_group_broadcast():
    """learner.weight_transport collective over NCCL: a bf16 bucket from GPU 0 arrives bit for bit on GPU 1."""
    import multiprocessing

    from scratchpad.common.buffer import free_port

    context = multiprocessing.get_context("spawn")
    queue, port = context.Queue(), free_port()
    members = [context.Process(target=_nccl_member, args=(rank, port, queue)) for rank in (0, 1)]
    for p in members:
        p.start()
    results = dict(queue.get(timeout=120) for _ in members)
    for p in members:
        p.join(30)
    assert results == {0: True, 1: True}, results
