"""A learner killed with SIGKILL loses nothing: the resumed run trains exactly what its checkpoint lacks, once."""
import json
import threading
import time

import psutil
import pytest

from conftest import small_config

pytestmark = pytest.mark.integration


def kill_learner_after(run_dir, step, done: threading.Event, timeout=300):
    trained = run_dir / "trained.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if trained.exists() and any(json.loads(line)["step"] == step for line in trained.read_text().splitlines()):
            # Only this session's processes (the Ray cluster the fixture started descends from us): never another run's.
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.name().startswith("ray::Learner"):
                        proc.kill()
                        done.set()
                except psutil.NoSuchProcess:
                    pass
            return
        time.sleep(0.02)


def test_sigkill_learner_then_resume(ray_cluster, tiny_model, cache_dir, tmp_path):
    from scratchpad.cluster.train import train

    # run.max_restarts=0: the run stops at the kill (within the run the learner would restart, tests/test_chaos.py)
    cfg = small_config(cache_dir, "run.steps=6", "run.checkpoint_every=3", "run.keep_checkpoints=5", "run.max_restarts=0",
                       "run.eval_every=0", "task.eval_size=8", "reward.format_weight=0.5")
    run = tmp_path / "run"
    killed = threading.Event()
    killer = threading.Thread(target=kill_learner_after, args=(run, 4, killed), daemon=True)
    killer.start()
    with pytest.raises(Exception):
        train(cfg, run, log=lambda *_: None)
    killer.join()
    assert killed.is_set(), "the learner was never killed"
    first = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first][:4] == [1, 2, 3, 4]
    lost_updates = [g for r in first if r["step"] > 3 for g in r["groups"]]  # trained, but no checkpoint holds them

    summary = train(cfg, run, log=lambda *_: None, resume=True)
    final = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5, 6]
    assert [r["policy_version"] for r in final] == [1, 2, 3, 4, 5, 6]
    ids = [g for r in final for g in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was trained twice"
    assert ids[: 3 * cfg.rollout.prompts_per_step] == [g for r in first if r["step"] <= 3 for g in r["groups"]]
    # What the checkpoint did not hold is trained again, first, and nothing of it is lost.
    assert final[3]["groups"] == lost_updates[: cfg.rollout.prompts_per_step]
    assert set(lost_updates) <= set(ids)
    assert summary["groups_produced"] == summary["groups_trained"] + summary["groups_dropped"] + summary["groups_in_flight"]
    assert summary["groups_trained"] == 6 * cfg.rollout.prompts_per_step


def test_redis_sigkill_mid_run(ray_cluster, tiny_model, cache_dir, tmp_path):
    """The embedded redis-server dies by SIGKILL mid-run; the watchdog restarts it on its AOF and the run finishes."""
    from scratchpad.cluster.train import train

    # appendfsync always: with everysec, up to a second of acks may be lost with the server (stated in the README).
    cfg = small_config(cache_dir, "run.steps=5", "run.eval_every=0", "task.eval_size=8", "buffer.appendfsync=always")
    run = tmp_path / "run"
    killed = threading.Event()

    def kill_redis():
        trained = run / "trained.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (trained.exists() and trained.read_text().count("\n") >= 2):
            time.sleep(0.02)
        port = next(line.split()[1] for line in (run / "redis" / "redis.conf").read_text().splitlines() if line.startswith("port "))
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.name().startswith("redis-server") and f":{port}" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.set()
            except psutil.NoSuchProcess:
                pass

    killer = threading.Thread(target=kill_redis, daemon=True)
    killer.start()
    summary = train(cfg, run, log=lambda *_: None)
    killer.join()
    assert killed.is_set()
    assert (run / "redis" / "redis.log").read_text().count("Ready to accept connections") >= 2
    assert summary["steps"] == 5 and summary["policy_version"] == 5
    assert summary["invariant_holds"] and summary["groups_trained"] == 5 * cfg.rollout.prompts_per_step
