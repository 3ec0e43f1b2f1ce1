"""The learner's update does not depend on how it is cut: two DeepSpeed ranks make the same update as one on
the same batch, token-budget micro-batches the same as whole ones, and a resumed run's next step is the
uninterrupted run's next step (loss and weights)."""
import random
import time

import numpy as np
import pytest

from conftest import small_config

pytestmark = pytest.mark.integration


def synthetic_groups(tokenizer, count: int, n: int, seed: int, tag: str, version: int = 0,
                     prompt_len: tuple[int, int] = (4, 9), completion_len: tuple[int, int] = (3, 20)):
    """`count` groups of `n` traces with real token ids of varied lengths, mixed 0/1 rewards and sampler logprobs
    near the truth, so the ratio, clip, advantages and padding all take part (bench/learner_step.py uses it too)."""
    from scratchpad.common.records import Group, Trace, pack_ids, pack_logprobs

    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    groups = []
    for g in range(count):
        prompt = [tokenizer.bos_token_id] + [rng.choice(vocab) for _ in range(rng.randint(*prompt_len))]
        traces = []
        for k in range(n):
            completion = [rng.choice(vocab) for _ in range(rng.randint(*completion_len))] + [tokenizer.eos_token_id]
            traces.append(Trace(
                trace_id=f"{tag}{g}:{k}", group_id=f"{tag}{g}", prompt_id=f"p{g}", prompt="p", prompt_ids=pack_ids(prompt),
                completion="c", completion_ids=pack_ids(completion),
                logprobs=pack_logprobs(np.array([-3.7 + rng.uniform(-0.3, 0.3) for _ in completion])),
                finish_reason="stop", policy_version=version, reference="1", reward=float(rng.random() < 0.5) + 0.1 * k,
            ))
        groups.append(Group(group_id=f"{tag}{g}", prompt_id=f"p{g}", policy_version=version, traces=traces, created_at=time.time()))
    return groups


def _push(buffer, groups):
    buffer.put(groups)


def _learners(ray, cfg, model, address, ranks, resume_from=None):
    from scratchpad.common.buffer import free_port
    from scratchpad.cluster.run import actor_env
    from scratchpad.learner.learner import Learner

    port = free_port()
    remote = ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": actor_env(cfg)})
    return [remote.remote(cfg, model, address, rank, ranks, port, resume_from) for rank in range(ranks)]


def _step(ray, learners):
    assert sum(ray.get([rank.fill_batch.remote(500) for rank in learners])) == 0
    return ray.get([rank.train.remote() for rank in learners])


def _weights(ray, learner):
    from scratchpad.actors.engines import bucket_tensors

    return dict(bucket_tensors(ray.get(learner.weights.remote(True))[1]))


@pytest.mark.parametrize("algorithm", ["reinforce_pp", "dpo"])
def test_two_ranks_make_the_same_update_as_one(ray_cluster, tiny_model, cache_dir, tmp_path, algorithm):
    ray = ray_cluster
    from transformers import AutoTokenizer

    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    groups = synthetic_groups(tokenizer, 8, 4, seed=1, tag="g")
    # Adam eps well above the tiniest gradients: the first Adam step is g / (|g| + eps), which turns float32 summation
    # noise in near-zero gradients into full-size steps; with a larger eps the update follows the gradient sums compared here.
    common = ("rollout.prompts_per_step=8", f"learner.algorithm={algorithm}", "learner.lr=1e-3", "learner.kl_coef=0.05",
              "learner.adam_eps=1e-3")
    redis = EmbeddedRedis(tmp_path / "redis").start()
    actors = []
    try:
        results = {}
        # One rank, cut into token-budget micro-batches; two ranks, whole micro-batches of 64 rows.
        for ranks, extra in ((1, ("learner.micro_batch_tokens=120",)), (2, ())):
            cfg = small_config(cache_dir, *common, f"learner.ranks={ranks}", "learner.micro_batch_size=64", *extra)
            address = BufferAddress(redis.url, f"sp:ranks{ranks}:", 100000)
            RedisBuffer(address).ensure_group()
            _push(RedisBuffer(address), groups)
            learners = _learners(ray, cfg, tiny_model, address, ranks)
            actors += learners
            before = _weights(ray, learners[0])
            metrics = _step(ray, learners)
            assert sorted(g for m in metrics for g in m["group_ids"]) == sorted(g.group_id for g in groups)
            results[ranks] = (_weights(ray, learners[0]), sum(m["loss"] for m in metrics))  # each rank's share of the loss
            if ranks == 2:
                other = _weights(ray, learners[1])
                assert all(np.array_equal(other[k].numpy(), results[2][0][k].numpy()) for k in other)  # ranks agree
        one, two = results[1][0], results[2][0]
        moved = max(float((one[k] - before[k]).abs().max()) for k in one)
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert moved > 1e-6, "the step changed nothing; the comparison would be empty"
        assert diff < 1e-3 * moved, f"1 rank and 2 ranks differ by {diff:.2e} (the step moved weights by {moved:.2e})"
        assert abs(results[1][1] - results[2][1]) < 1e-5 * max(1.0, abs(results[1][1]))
    finally:
        for actor in actors:
            ray.kill(actor)
        redis.stop()


def test_resumed_step_equals_uninterrupted_step(ray_cluster, tiny_model, cache_dir, tmp_path):
    """PPO, so the critic and its optimizer must come back too; two minibatches so the scheduler and Adam
    state of several optimizer steps matter. A linear decay over 2 learner steps: the second step's optimizer steps
    run at 0.625 x lr only if the scheduler came back and counts learner steps, not optimizer steps (by optimizer
    steps the second step would sit at the end of the decay, 0.25 x lr)."""
    ray = ray_cluster
    from transformers import AutoTokenizer

    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first, second = (synthetic_groups(tokenizer, 4, 4, seed=s, tag=t) for s, t in ((2, "a"), (3, "b")))
    cfg = small_config(cache_dir, "learner.algorithm=ppo", "learner.lr=1e-3", "learner.critic_lr=1e-3", "learner.minibatches=2",
                       "learner.lr_schedule=linear", "learner.min_lr_ratio=0.25", "run.steps=2", "learner.share_prompts=true",
                       "learner.max_staleness=10", "run.checkpoint_every=1")  # both batches are version 0
    redis = EmbeddedRedis(tmp_path / "redis").start()
    actors = []
    try:
        address = BufferAddress(redis.url, "sp:straight:", 100000)
        RedisBuffer(address).ensure_group()
        _push(RedisBuffer(address), first)
        [straight] = _learners(ray, cfg, tiny_model, address, 1)
        actors.append(straight)
        [first_step] = _step(ray, [straight])
        assert first_step["lr"] == pytest.approx(1e-3)
        checkpoint = ray.get(straight.save_checkpoint.remote(str(tmp_path / "checkpoints"), 2))
        _push(RedisBuffer(address), second)
        [expected] = _step(ray, [straight])
        expected_weights = _weights(ray, straight)
        ray.kill(straight)

        resumed_address = BufferAddress(redis.url, "sp:resumed:", 100000)
        RedisBuffer(resumed_address).ensure_group()
        _push(RedisBuffer(resumed_address), second)
        [resumed] = _learners(ray, cfg, tiny_model, resumed_address, 1, resume_from=checkpoint)
        actors.append(resumed)
        assert ray.get(resumed.policy_version.remote()) == 1
        [got] = _step(ray, [resumed])
        got_weights = _weights(ray, resumed)
        assert got["policy_version"] == expected["policy_version"] == 2
        assert got["lr"] == expected["lr"] == pytest.approx(0.625e-3)
        for key in ("loss", "value_loss", "grad_norm", "critic_grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
        assert max(float((got_weights[k] - expected_weights[k]).abs().max()) for k in got_weights) < 1e-7
    finally:
        for actor in actors:
            ray.kill(actor)
        redis.stop()


def test_lr_schedule_factors():
    from scratchpad.learner.engine import lr_factor

    assert [lr_factor(v, 2, "constant", 10, 0.0) for v in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    linear = [lr_factor(v, 0, "linear", 4, 0.1) for v in range(6)]
    assert linear == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    cosine = [lr_factor(v, 2, "cosine", 6, 0.0) for v in range(7)]
    assert cosine == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5), 0.0])


def test_policy_schedule_after_critic_warmup(cache_dir):
    """PPO's policy first steps after critic_warmup_steps: its warmup covers its own first steps and its decay still
    ends at run.steps (it used to count from its first step and end critic_warmup_steps late). Two minibatches: the
    scheduler's optimizer steps map to learner steps."""
    from scratchpad.learner.engine import schedule_factor

    cfg = small_config(cache_dir, "learner.algorithm=ppo", "learner.critic_warmup_steps=2", "learner.minibatches=2",
                       "learner.lr_schedule=linear", "learner.min_lr_ratio=0.25", "run.steps=6")
    policy = schedule_factor(cfg, 1, "linear", start=cfg.learner.critic_warmup_steps)
    # policy learner steps 0..3 are learner steps 2..5: warmup 1, then linear over the 3 steps left to run.steps
    assert [policy(s) for s in range(8)] == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.75, 0.75, 0.5, 0.5])
    assert schedule_factor(cfg, 0, "linear")(8) == pytest.approx(1 - 4 / 6 * 0.75)  # an engine stepping from step 0
