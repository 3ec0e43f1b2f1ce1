"""ZeRO stages 1, 2 and 3 make stage 0's update. PPO (critic, KL to the reference, two minibatches) on two DeepSpeed
ranks (gloo), the same synthetic batches at every stage. At stage 3 the persistence threshold is 0, so every
parameter of the policy, the critic and the reference is partitioned and weights() / save_pretrained() must gather.
Each stage also saves a checkpoint after its first step and a fresh learner resumed from it repeats the second step."""
import numpy as np
import pytest

from scratchpad.actors.engines import bucket_tensors
from conftest import small_config
from test_learner_equivalence import synthetic_groups

pytestmark = pytest.mark.integration

STAGES = (0, 1, 2, 3)


def _rank_actor(ray, cfg):
    from scratchpad.cluster.run import actor_env

    class Rank:
        """One learner rank that builds a fresh Learner per stage in the same process, so the gloo group is made once."""

        def __init__(self, model, rank, ranks, port):
            self.model, self.rank, self.ranks, self.port = model, rank, ranks, port
            self.learner = None

        def start(self, cfg, address, resume_from=None) -> int:
            """A new learner; returns how many policy parameter elements this rank holds (0 once ZeRO-3 partitions)."""
            from scratchpad.learner.learner import Learner

            self.learner = Learner(cfg, self.model, address, self.rank, self.ranks, self.port, resume_from)
            return sum(p.numel() for p in self.learner.engine.module.parameters())

        def step(self):
            assert self.learner.fill_batch(500) == 0
            metrics = self.learner.train()
            return metrics, {k: v.clone() for k, v in bucket_tensors(self.learner.weights(every_rank=True)[1])}

        def call(self, method, *args):
            return getattr(self.learner, method)(*args)

    # Defined here, not at module level: Ray pickles a local class by value, so workers need not import this file.
    return ray.remote(Rank).options(num_cpus=1, runtime_env={"env_vars": actor_env(cfg)})


def test_zero_stages_make_the_same_update(ray_cluster, tiny_model, cache_dir, tmp_path):
    ray = ray_cluster
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer, free_port

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first, second = synthetic_groups(tokenizer, 8, 4, seed=1, tag="a"), synthetic_groups(tokenizer, 8, 4, seed=2, tag="b")
    # adam_eps 1e-3 as in the rank test (docs/BENCHMARKS.md): ZeRO's reduce-scatter sums in another order than
    # the all-reduce, and Adam's first step would blow the last-bit differences of near-zero gradients up (measured
    # with eps 1e-8: stage 3 lands 1.5e-3 of the step away from stage 0; with 1e-3, 6e-5).
    common = ("rollout.prompts_per_step=8", "learner.ranks=2", "learner.algorithm=ppo", "learner.kl_coef=0.05",
              "learner.lr=1e-3", "learner.critic_lr=1e-3", "learner.adam_eps=1e-3", "learner.minibatches=2",
              "learner.micro_batch_size=64", "learner.max_staleness=10", "run.checkpoint_every=1",
              "learner.zero3_persistence_threshold=0")
    configs = {stage: small_config(cache_dir, *common, f"learner.zero_stage={stage}") for stage in STAGES}
    redis = EmbeddedRedis(tmp_path / "redis").start()
    remote = _rank_actor(ray, configs[0])
    port = free_port()
    ranks = [remote.remote(tiny_model, rank, 2, port) for rank in range(2)]

    def buffer(name, groups):
        address = BufferAddress(redis.url, f"sp:{name}:", 100000)
        RedisBuffer(address).ensure_group()
        RedisBuffer(address).put(groups)
        return address

    def step():
        (metrics, weights), (other_metrics, other) = ray.get([rank.step.remote() for rank in ranks])
        assert all(np.array_equal(weights[k].numpy(), other[k].numpy()) for k in weights)  # ranks agree
        return {**metrics, "loss": metrics["loss"] + other_metrics["loss"],
                "value_loss": metrics["value_loss"] + other_metrics["value_loss"]}, weights

    try:
        results, start = {}, None
        for stage in STAGES:
            cfg = configs[stage]
            address = buffer(f"stage{stage}", first)
            held = ray.get([rank.start.remote(cfg, address) for rank in ranks])
            assert (held == [0, 0]) == (stage == 3), f"stage {stage}: each rank holds {held} policy parameter elements"
            if stage == 0:
                start = {k: v.clone() for k, v in bucket_tensors(ray.get(ranks[0].call.remote("weights"))[1])}
            one = step()
            checkpoint = ray.get([rank.call.remote("save_checkpoint", str(tmp_path / f"ckpt{stage}"), 1) for rank in ranks])[0]
            RedisBuffer(address).put(second)
            two = step()
            if stage == 3:
                saved = ray.get([rank.call.remote("save_pretrained", str(tmp_path / "final")) for rank in ranks])[0]
                from_disk = AutoModelForCausalLM.from_pretrained(saved).state_dict()
                assert all(torch.equal(from_disk[k], two[1][k]) for k in two[1])
            ray.get([rank.start.remote(cfg, buffer(f"resumed{stage}", second), checkpoint) for rank in ranks])
            resumed = step()
            results[stage] = one, two, resumed

        for stage, (one, two, resumed) in results.items():
            base_one, base_two, _ = results[0]
            for (metrics, weights), (base_metrics, base_weights) in ((one, base_one), (two, base_two)):
                assert set(metrics) == set(base_metrics), f"stage {stage} reports other metrics"
                assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base_weights.items()}
                moved = max(float((base_weights[k] - start[k]).abs().max()) for k in start)
                diff = max(float((weights[k] - base_weights[k]).abs().max()) for k in weights)
                assert diff < 1e-3 * moved, f"stage {stage} differs from stage 0 by {diff:.2e} (step {moved:.2e})"
                # Global numbers only: which rank reads which groups varies, so rank 0's own statistics (kl, entropy) do.
                for key in ("loss", "value_loss", "grad_norm", "critic_grad_norm"):
                    assert metrics[key] == pytest.approx(base_metrics[key], rel=1e-5, abs=1e-7), (stage, key)
            assert two[0]["kl"] > 0, "the reference took no part"
            assert resumed[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-6, abs=1e-9)
            assert max(float((resumed[1][k] - two[1][k]).abs().max()) for k in two[1]) < 1e-7, f"stage {stage} resume"
    finally:
        for rank in ranks:
            ray.kill(rank)
        redis.stop()
