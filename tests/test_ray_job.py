"""A run as a Ray job: `scratchpad submit` to a real `ray start --head` cluster with token authentication, the
job succeeds, its gauges reach the node's Prometheus endpoint, and report.html lands in the run directory.

The head is this test's own: loopback, free ports, its own temp dir and token, started with --block in a
session of its own and stopped by signalling that session only (never `ray stop`, which would stop every
cluster on the machine). Everything that talks to it runs through the CLI or plain HTTP, so the pytest
process's own Ray (the `ray_cluster` fixture) is never touched.
"""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from scratchpad.common.buffer import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "scratchpad.cluster.cli"]


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return found


@pytest.fixture
def ray_head():
    """A Ray head on loopback with token authentication; yields (dashboard URL, metrics URL, client env)."""
    temp = Path(tempfile.mkdtemp(prefix="sp-head-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    token = temp / "token"
    token.write_text(secrets.token_hex(16))
    ports = {name: free_port() for name in ("port", "dashboard-port", "metrics-export-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           # gauges reach the metrics agent every 2 s instead of 10 s, so a short job shows up in time
           "RAY_metrics_report_interval_ms": "2000",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         f"--temp-dir={temp / 'ray'}", "--disable-usage-stats", "--block", *(f"--{k}={v}" for k, v in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # the CLI must find the token on its own
    try:
        deadline = time.time() + 240
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray dashboard did not answer in 240 s"
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
                break
            except OSError:
                time.sleep(1)
        yield dashboard, f"http://127.0.0.1:{ports['metrics-export-port']}/metrics", client_env
    finally:
        # The head's own session (ray start, GCS, raylet, dashboard, workers) and its own temp dir: nothing in it needs
        # a graceful stop, and `ray start --block` takes ~30 s to stop on SIGTERM, so SIGKILL after a short grace.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        for proc in _session_processes(head.pid):
            try:
                proc.kill()
            except psutil.NoSuchProcess:  # it exited between the listing and the kill (the SIGTERM above reached it)
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _scrape(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""


@pytest.mark.integration
@pytest.mark.timeout(1800)  # setup may build the session's tiny model: 13 min on a loaded 2-core machine
def test_submit_runs_on_the_cluster_with_metrics_and_report(ray_head, tiny_model, cache_dir, tmp_path):
    dashboard, metrics_url, env = ray_head
    env = {**env, "SCRATCHPAD_CACHE": str(cache_dir)}
    run_dir = tmp_path / "run"
    submitted = _cli(["submit", "configs/quickstart.yaml", "--address", dashboard, "--run-dir", str(run_dir),
                      f"model.cache_dir={cache_dir}", "model.tiny.hidden_size=64", "model.tiny.num_heads=2",
                      "model.tiny.num_layers=2", "model.tiny.intermediate_size=256", "model.tiny.warmstart_steps=150", "model.tiny.warmstart_direct_fraction=0",
                      "task.min_len=3", "task.max_len=5", "task.eval_size=8", "rollout.prompts_per_step=2", "rollout.n=2",
                      "rollout.max_new_tokens=32", "run.steps=6", "run.eval_every=3", "run.sample_traces=2"], env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    assert f"dashboard: {dashboard}" in submitted.stdout

    # Poll the job and the node's Prometheus endpoint together: gauges exist only while the driver lives.
    seen: set[str] = set()
    status, deadline = "PENDING", time.time() + 420
    while status in ("PENDING", "RUNNING") and time.time() < deadline:
        # Ray 2.60 exports a custom gauge `scratchpad_x` as `ray_scratchpad_x`, and only while its process lives.
        seen |= set(re.findall(r"^(?:ray_)?(scratchpad_\w+)\{", _scrape(metrics_url), re.M))
        result = _cli(["status", job, "--address", dashboard], env, timeout=60)
        status = re.search(r"^status: (\w+)", result.stdout, re.M).group(1)
        time.sleep(2)
    logs = _cli(["logs", job, "--address", dashboard], env).stdout
    assert status == "SUCCEEDED", f"job {status}: {logs[-4000:]}"
    assert {"scratchpad_reward", "scratchpad_accuracy", "scratchpad_tokens_per_s", "scratchpad_loss",
            "scratchpad_phase_seconds", "scratchpad_buffer_groups", "scratchpad_reward_component"} <= seen, sorted(seen)

    # The driver ran on the cluster and wrote the run directory, report included.
    assert "step 6/6" in logs and "held-out accuracy" in logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["invariant_holds"] and summary["report"] == "report.html"
    report = (run_dir / "report.html").read_text()
    assert report.count('src="data:image/png;base64,') == 3  # against step, against wall time, by length
    assert "Against wall time" in report and "thought (never graded)" in report
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_unreachable_cluster_is_one_line(tmp_path):
    result = _cli(["status", "raysubmit_nothing", "--address", f"http://127.0.0.1:{free_port()}"], {**os.environ}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"scratchpad: error: cannot reach the Ray dashboard at "
                                                  f"{result.args[-1]} (set --address or $RAY_ADDRESS)"]


def test_submit_checks_the_config_before_contacting_anyone():
    result = _cli(["submit", "configs/quickstart.yaml", "learner.lr=-1", "--address", "http://127.0.0.1:9"], {**os.environ}, timeout=60)
    assert result.returncode == 2 and "learner.lr" in result.stderr and len(result.stderr.strip().splitlines()) == 1
