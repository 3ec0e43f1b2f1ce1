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
            for proc in psutil.process_iter(["name"]):
                if (proc.info["name"] or "").startswith("ray::Learner"):
                    proc.kill()
                    done.set()
            return
        time.sleep(0.02)


def test_sigkill_learner_then_resume(ray_cluster, tiny_model, cache_dir, tmp_path):
    from scratchpad.cluster.train import train

    cfg = small_config(cache_dir, "run.steps=6", "run.checkpoint_every=3", "run.keep_checkpoints=5",
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
