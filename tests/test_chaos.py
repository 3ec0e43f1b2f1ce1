"""A process killed with SIGKILL mid-run costs seconds, not the run: the same command finishes, its books balance and
no group is trained twice. One test per process kind; each prints the wall time its kill cost (docs/RELIABILITY.md)."""
import json
import os
import signal
import statistics
import threading
import time

import psutil
import pytest

from conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def kill_when(run_dir, step: int, title: str, record: dict, timeout=300, sig=signal.SIGKILL):
    """After `step` is recorded, send `sig` (SIGKILL) to one process of this session whose title starts with `title`
    (Ray names an actor's process ray::Class and, while a method runs, ray::Class.method)."""
    trained = run_dir / "trained.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if trained.exists() and any(json.loads(line)["step"] >= step for line in trained.read_text().splitlines()):
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.name().startswith(title) or " ".join(proc.cmdline()).startswith(title):
                        proc.send_signal(sig)
                        record.update(at=time.time(), pid=proc.pid, title=title)
                        return
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.01)


def chaos_run(cfg, run, step: int, title: str):
    from scratchpad.cluster.train import train

    record: dict = {}
    killer = threading.Thread(target=kill_when, args=(run, step, title, record), daemon=True)
    killer.start()
    summary = train(cfg, run, log=lambda *_: None)
    killer.join()
    assert record, f"no {title} process was killed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trained] == list(range(1, cfg.run.steps + 1)), "every step recorded once"
    ids = [g for r in trained for g in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was trained twice"
    assert summary["invariant_holds"]
    assert summary["groups_produced"] == summary["groups_trained"] + summary["groups_dropped"] + summary["groups_in_flight"]
    # What the kill cost: the training span beyond steps x the median step (restart, reissued or redone work).
    median = statistics.median(r["step_seconds"] for r in rows)
    span = rows[-1]["wall"] - (rows[0]["wall"] - rows[0]["step_seconds"])
    cost = span - len(rows) * median
    print(f"chaos: {title} killed after step {step}: cost {cost:.1f} s (median step {median:.2f} s)")
    assert cost <= 60, f"the kill cost {cost:.0f} s"
    return summary


def _cfg(cache_dir, *extra):
    return small_config(cache_dir, "run.steps=6", "run.eval_every=0", "run.eval_actor=false", "task.eval_size=8",
                        "reward.format_weight=0.5", "run.checkpoint_every=2", "run.keep_checkpoints=3", *extra)


@pytest.mark.parametrize("staleness", [0, 1])
def test_rollout_actor_killed(ray_cluster, tiny_model, cache_dir, tmp_path, staleness):
    """Ray restarts the rollout actor; it loads the newest weights and its unfinished prompts are sampled again."""
    summary = chaos_run(_cfg(cache_dir, f"learner.max_staleness={staleness}"), tmp_path / "run", 2, "ray::RolloutWorker.generate")
    assert summary["groups_trained"] == 6 * 4


@pytest.mark.parametrize("staleness", [0, 1])
def test_reward_actor_killed(ray_cluster, tiny_model, cache_dir, tmp_path, staleness):
    """Ray restarts the reward actor and the chunk it held is scored again."""
    summary = chaos_run(_cfg(cache_dir, f"learner.max_staleness={staleness}"), tmp_path / "run", 2, "ray::RewardWorker.score_and_push")
    assert summary["groups_trained"] == 6 * 4


@pytest.mark.parametrize("staleness", [0, 1])
def test_learner_killed_restarts_from_checkpoint(ray_cluster, tiny_model, cache_dir, tmp_path, staleness):
    """The driver restarts the learner from the newest checkpoint; it replays exactly the pending entries."""
    summary = chaos_run(_cfg(cache_dir, f"learner.max_staleness={staleness}"), tmp_path / "run", 3, "ray::Learner")
    assert summary["groups_trained"] >= 6 * 4


def test_a_hung_rollout_actor_is_named_and_the_run_stops_resumable(ray_cluster, tiny_model, cache_dir, tmp_path):
    """SIGSTOP freezes the rollout actor (a hang, not a death: Ray sees nothing wrong). The stall watchdog names the
    stage and the actor, the run stops with a checkpoint, and a resume finishes it with the books balanced."""
    from scratchpad.cluster.pipeline import StallError
    from scratchpad.cluster.train import train

    cfg, run = _cfg(cache_dir, "run.stall_timeout_s=10", "run.checkpoint_every=1"), tmp_path / "run"
    frozen: dict = {}
    thread = threading.Thread(target=kill_when, args=(run, 1, "ray::RolloutWorker", frozen), kwargs={"sig": signal.SIGSTOP}, daemon=True)
    thread.start()
    try:
        with pytest.raises(StallError, match=r"^(generate|sync): rollout actor 0 made no progress for \d+ s \(run.stall_timeout_s=10\)"):
            train(cfg, run, log=lambda *_: None)
    finally:
        thread.join()
        if frozen:  # teardown killed it; make sure nothing stays stopped either way
            try:
                os.kill(frozen["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen, "no rollout actor was frozen"
    done = [json.loads(line)["step"] for line in (run / "trained.jsonl").read_text().splitlines()]
    assert done and (run / "checkpoints" / f"step-{done[-1]}").is_dir(), "the stop checkpointed the last recorded step"
    summary = train(cfg, run, resume=True, log=lambda *_: None)
    trained = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trained] == list(range(1, cfg.run.steps + 1))
    ids = [g for r in trained for g in r["groups"]]
    assert len(ids) == len(set(ids)) and summary["invariant_holds"]
