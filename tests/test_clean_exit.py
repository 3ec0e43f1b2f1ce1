"""SIGTERM (as `ray job stop` sends) or Ctrl-C: a checkpoint is written, no redis-server, Ray or vLLM process
is left behind, and `scratchpad train --resume` reaches the step count."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_sigterm_checkpoints_stops_everything_and_resumes(tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.cache_dir={cache_dir}", "model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.num_layers=2",
        "model.tiny.intermediate_size=256", "model.tiny.warmstart_steps=150", "model.tiny.warmstart_direct_fraction=0", "task.min_len=3", "task.max_len=5", "task.eval_size=8",
        "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=32", "run.steps=8", "run.eval_every=0", "run.num_cpus=2",
    ]
    env = {**os.environ, "SCRATCHPAD_CACHE": str(cache_dir)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "scratchpad.cluster.cli", "train", "configs/quickstart.yaml",
                             "--run-dir", str(run_dir), *overrides],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the run produced no steps in time"
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(c.name() for c in children)
        assert "redis-server" in names and "raylet" in names and any("Rollout" in c.name() for c in children), names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        time.sleep(1)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [f"{c.pid} {c.name()}" for c in alive]
        assert "interrupted" in proc.stderr.read()
        checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
        assert checkpoints, "no checkpoint was written on SIGTERM"
        assert int(checkpoints[-1].name.split("-")[1]) >= 2
        assert "Stopped early after step" in (run_dir / "report.html").read_text()  # a graceful stop writes the report
    finally:
        if proc.poll() is None:
            proc.kill()

    resumed = subprocess.run([sys.executable, "-m", "scratchpad.cluster.cli", "train", "--resume", str(run_dir)],
                             cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["policy_version"] == 8 and summary["invariant_holds"]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert "Stopped early" not in (run_dir / "report.html").read_text()  # the finished run's report replaces it
