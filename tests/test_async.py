"""Asynchronous mode (learner.max_staleness > 0): rollout actors sample ahead with the weights they hold while the
learner trains; the bound, the stale drops, the off-policy correction, the books and crash recovery."""
import json
import threading

import pytest

from conftest import small_config
from test_resume import kill_learner_after

pytestmark = pytest.mark.integration


def _rows(run, name):
    return [json.loads(line) for line in (run / f"{name}.jsonl").read_text().splitlines()]


def test_stale_groups_are_dropped_and_counted(tmp_path, cache_dir):
    """A group more than max_staleness versions old is dropped as stale, and the drop is counted when acknowledged."""
    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer
    from scratchpad.common.records import Group
    from scratchpad.learner.batch import BatchAssembler
    from test_records_and_scoring import make_trace

    cfg = small_config(cache_dir, "learner.max_staleness=1", "rollout.n=2", "rollout.prompts_per_step=4")
    redis = EmbeddedRedis(tmp_path / "redis").start()
    try:
        buf = RedisBuffer(BufferAddress(redis.url, "sp:stale:", 1000))
        buf.ensure_group()
        versions = [0, 1, 2, 3, 3, 2]  # the learner holds version 3: 0 and 1 are too old
        groups = [Group(group_id=f"g{i}", prompt_id=f"p{i}", policy_version=v, traces=[make_trace(group=f"g{i}", k=k) for k in range(2)])
                  for i, v in enumerate(versions)]
        for g in groups:
            for k, t in enumerate(g.traces):
                t.reward = float(k)
        buf.put(groups)
        assembler = BatchAssembler(cfg, buf, "learner-0", 4)
        assert assembler.fill(version=3, block_ms=100) == 0
        entries, dropped_ids, dropped = assembler.take()
        assert [g.policy_version for _, g in entries] == [2, 3, 3, 2]
        assert dropped == {"stale": 2}
        buf.ack([i for i, _ in entries] + dropped_ids, trained=4, dropped=dropped)
        c = buf.counters()
        assert (c["trained"], c["dropped"], c["in_flight"], c["invariant_holds"]) == (4, 2, 0, True)
    finally:
        redis.stop()


def test_async_run_overlaps_and_balances(ray_cluster, tiny_model, cache_dir, tmp_path):
    """Two cores split between the roles; the engines sample one batch ahead (lag 1) under TIS; every group is
    accounted for; evaluations run while the learner steps."""
    from scratchpad.cluster.train import train

    cfg = small_config(cache_dir, "run.steps=5", "run.eval_every=1", "task.eval_size=16", "learner.max_staleness=1",
                       "learner.tis_cap=2.0", "reward.format_weight=0.5", "run.cores={rollout: [0], learner: [1]}")
    run = tmp_path / "run"
    summary = train(cfg, run, log=lambda *_: None)
    rows = _rows(run, "metrics")
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["policy_lag_max"] <= 1 for r in rows)
    assert sum(r["policy_lag_hist"][1] for r in rows) > 0, "no group was sampled ahead: nothing overlapped"
    assert all(0 < r["tis_weight"] <= 2.0 and "logprob_gap" in r for r in rows)
    assert summary["invariant_holds"]
    assert summary["groups_produced"] == summary["groups_trained"] + summary["groups_dropped"] + summary["groups_in_flight"]
    assert summary["groups_trained"] == 5 * cfg.rollout.prompts_per_step
    ids = [g for r in _rows(run, "trained") for g in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was trained twice"
    # Periodic evaluation no longer stops training: some learner step ran while an evaluation was in progress.
    evals = [e for e in _rows(run, "evals") if 0 < e["step"] < cfg.run.steps]
    steps = [(r["wall"] - r["time_train"] - r.get("time_sync", 0), r["wall"] - r.get("time_sync", 0)) for r in rows]
    assert any(lo < e["wall"] and e["eval_started_wall"] < hi for e in evals for lo, hi in steps), (evals, steps)


def test_async_sigkill_learner_then_resume(ray_cluster, tiny_model, cache_dir, tmp_path):
    """The learner dies by SIGKILL mid-run in asynchronous mode: the resumed run trains exactly what its checkpoint
    lacks, once, and groups sampled ahead of the crash are trained or dropped, never lost."""
    from scratchpad.cluster.train import train

    cfg = small_config(cache_dir, "run.steps=6", "run.checkpoint_every=3", "run.keep_checkpoints=5", "run.eval_every=0",
                       "task.eval_size=8", "reward.format_weight=0.5", "learner.max_staleness=1", "run.max_restarts=0")
    run = tmp_path / "run"
    killed = threading.Event()
    killer = threading.Thread(target=kill_learner_after, args=(run, 4, killed), daemon=True)
    killer.start()
    with pytest.raises(Exception):
        train(cfg, run, log=lambda *_: None)
    killer.join()
    assert killed.is_set(), "the learner was never killed"
    first = _rows(run, "trained")
    lost_updates = [g for r in first if r["step"] > 3 for g in r["groups"]]
    summary = train(cfg, run, log=lambda *_: None, resume=True)
    final = _rows(run, "trained")
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5, 6]
    ids = [g for r in final for g in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was trained twice"
    assert set(lost_updates) <= set(ids), "an update the checkpoint lacked was not trained again"
    assert summary["invariant_holds"]
    assert summary["groups_produced"] == summary["groups_trained"] + summary["groups_dropped"] + summary["groups_in_flight"]
