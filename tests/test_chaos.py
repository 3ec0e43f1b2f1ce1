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


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_when(run_dir, step: int, title: str, record: dict, timeout=300, sig=signal.SIGKILL, stop: threading.Event | None = None):
    """After `step` is recorded, send `sig` (SIGKILL) to one process of this session whose title starts with `title`
    (Ray names an actor's process ray::Class and, while a method runs, ray::Class.method). A method call can be a few
    milliseconds long (scoring a chunk), so the actor's processes are found first and then only their titles are
    read, every half millisecond. Gives up when `stop` is set (the run ended) or at `timeout`."""
    trained = run_dir / "trained.jsonl"
    deadline = time.time() + timeout

    def ended() -> bool:
        return time.time() > deadline or (stop is not None and stop.is_set())

    while not (trained.exists() and any(json.loads(line)["step"] >= step for line in trained.read_text().splitlines())):
        if ended():
            return
        time.sleep(0.01)
    actor, pids, found_at = title.split(".")[0], [], 0.0
    while not ended():
        if time.time() - found_at > 0.5:  # the actor's processes (a restarted actor gets a new one)
            pids = [p.pid for p in psutil.Process().children(recursive=True) if _cmdline(p.pid).startswith(actor)]
            found_at = time.time()
        for pid in pids:
            if _cmdline(pid).startswith(title):
                os.kill(pid, sig)
                record.update(at=time.time(), pid=pid, title=title)
                return
        time.sleep(0.0005)


def chaos_run(cfg, run, step: int, title: str):
    from scratchpad.cluster.train import train

    record: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_when, args=(run, step, title, record), kwargs={"stop": stop}, daemon=True)
    killer.start()
    try:
        summary = train(cfg, run, log=lambda *_: None)
    finally:
        stop.set()
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


def test_rollout_actor_killed_during_a_weight_broadcast(ray_cluster, tiny_model, cache_dir, tmp_path):
    """learner.weight_transport collective: an engine dies inside the broadcast. The driver aborts the group, Ray
    restarts the engine, it takes the current weights from the object store, the group is rebuilt and the step's
    weights are sent again."""
    summary = chaos_run(_cfg(cache_dir, "learner.weight_transport=collective", "learner.weight_timeout_s=30"), tmp_path / "run", 2,
                        "ray::RolloutWorker.receive_weights")
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
