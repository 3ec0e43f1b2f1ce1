"""1,000 malformed entries mixed with good ones: every bad one is dead-lettered with a reason, every good one trained."""
import random

import msgspec
import pytest

from conftest import small_config

pytestmark = pytest.mark.integration


def test_malformed_entries_never_stop_the_learner(ray_cluster, tiny_model, cache_dir, tmp_path):
    ray = ray_cluster
    from scratchpad.actors.rollout import RolloutWorker
    from scratchpad.actors.tasks import train_stream
    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer, free_port
    from scratchpad.common.records import encode_group
    from scratchpad.cluster.run import actor_env
    from scratchpad.learner.learner import Learner

    cfg = small_config(cache_dir, "learner.max_staleness=10")  # all good groups are sampled at version 0
    redis = EmbeddedRedis(tmp_path / "redis").start()
    actors = []
    try:
        address = BufferAddress(redis.url, "sp:dead:", 100000)
        buffer = RedisBuffer(address)
        buffer.ensure_group()
        env = {"env_vars": actor_env(cfg)}
        rollout = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env=env).remote(cfg, tiny_model)
        learner = ray.remote(Learner).options(num_cpus=1, runtime_env=env).remote(cfg, tiny_model, address, 0, 1, free_port())
        actors = [rollout, learner]
        stream = train_stream(cfg.task)
        good = ray.get(rollout.generate.remote([next(stream) for _ in range(8 * cfg.rollout.prompts_per_step)]))
        for group in good:
            for k, trace in enumerate(group.traces):
                trace.reward = float(k % 2)
        stale = ray.get(rollout.generate.remote([next(stream)]))[0]
        stale.policy_version = -50  # older than max_staleness allows
        for trace in stale.traces:
            trace.policy_version, trace.reward = -50, 1.0
        rng = random.Random(0)
        valid = encode_group(good[0])
        bad_payloads = [
            lambda: rng.randbytes(rng.randint(0, 200)),  # not msgpack
            lambda: msgspec.msgpack.encode({"group_id": "x"}),  # missing fields
            lambda: valid[: rng.randint(1, len(valid) - 1)],  # truncated
            lambda: msgspec.msgpack.encode({**msgspec.to_builtins(good[0]), "traces": []}),  # empty group
        ]
        good_payloads = [encode_group(g) for g in good[:-1]] + [encode_group(stale)]
        entries = [("g", p) for p in good_payloads] + [("g", rng.choice(bad_payloads)()) for _ in range(990)] + [("x", b"no g field")] * 10
        rng.shuffle(entries)
        entries.append(("g", encode_group(good[-1])))  # a good one last, so the learner reads the whole stream
        pipe = buffer.client.pipeline()
        for field, payload in entries:
            pipe.xadd(buffer.stream, {field: payload})
        pipe.hincrby(buffer.counters_key, "produced", len(entries))
        pipe.execute()

        trained = []
        for _ in range(8):
            assert ray.get(learner.fill_batch.remote(200)) == 0
            trained += ray.get(learner.train.remote())["group_ids"]
        assert sorted(trained) == sorted(g.group_id for g in good)
        dead = buffer.client.xrange(buffer.dead)
        assert len(dead) == 1000 and all(fields[b"reason"] for _, fields in dead)
        counters = buffer.counters()
        assert counters["dropped_by_reason"] == {"invalid": 1000, "stale": 1}
        assert counters["trained"] == len(good) and counters["invariant_holds"] and counters["in_flight"] == 0
    finally:
        for actor in actors:
            ray.kill(actor)
        redis.stop()
