"""`scratchpad train` leaves no redis-server, Ray or vLLM process behind, also after Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_ctrl_c_stops_everything(tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.cache_dir={cache_dir}", "model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.num_layers=2",
        "model.tiny.intermediate_size=256", "model.tiny.warmstart_steps=150", "task.max_len=5", "task.eval_size=8",
        "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=32", "run.steps=100000", "run.num_cpus=2",
    ]
    env = {**os.environ, "SCRATCHPAD_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "scratchpad.cluster.cli", "train", "configs/quickstart.yaml",
                             "--run-dir", str(run_dir), *overrides],
                            cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        time.sleep(1)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [f"{c.pid} {c.name()}" for c in alive]
        assert "interrupted" in proc.stderr.read()
        assert all(json.loads(line)["step"] >= 1 for line in metrics.read_text().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
