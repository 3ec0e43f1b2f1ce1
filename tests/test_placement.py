"""Placement: the run's CPUs are reserved in one placement group before any actor starts; a request the cluster
cannot hold fails fast with one line that says what is missing, and never hangs."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchpad.common.config import load_config
from scratchpad.cluster.placement import PlacementError, check_fits, reserve, release, roles


def test_message_names_what_is_missing():
    cfg = load_config(None, ["rollout.num_engines=2", "rollout.cpus_per_engine=2", "reward.cpus_per_actor=1"])
    with pytest.raises(PlacementError) as info:
        check_fits(roles(cfg), {"CPU": 4.0}, {"CPU": 4.0})
    assert str(info.value) == ("placement: needs 6 CPUs for 2 rollout engines x 2 + 1 reward actor x 1 + 1 learner x 1; "
                               "the cluster has 4")


def test_gpus_and_single_nodes_are_checked():
    cfg = load_config(None, ["learner.num_gpus=1"])
    with pytest.raises(PlacementError, match="needs 1 GPUs for 1 learner x 1; the cluster has 0"):
        check_fits(roles(cfg), {"CPU": 8.0}, {"CPU": 8.0})
    cfg = load_config(None, ["rollout.cpus_per_engine=6"])
    with pytest.raises(PlacementError, match="one rollout engine needs 6 CPUs; the largest node has 4"):
        check_fits(roles(cfg), {"CPU": 8.0}, {"CPU": 4.0})
    cfg = load_config(None, ["rollout.num_engines=2", "run.placement_strategy=STRICT_PACK"])
    with pytest.raises(PlacementError, match="STRICT_PACK needs 3 CPUs on one node"):
        check_fits(roles(cfg), {"CPU": 4.0}, {"CPU": 2.0}, one_node=True)
    check_fits(roles(cfg), {"CPU": 4.0}, {"CPU": 2.0})  # PACK may spread over two nodes


@pytest.mark.integration
def test_reserve_on_a_real_cluster(ray_cluster):
    ray = ray_cluster
    # Fits: one bundle per role, reserved at once, given back on release.
    cfg = load_config(None, ["rollout.num_engines=2", "reward.cpus_per_actor=0.5"])
    group, index = reserve(cfg)
    assert index == {"rollout engine": [0, 1], "reward actor": [2], "learner": [3]}
    assert group.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 1.0}]
    release(group)

    # Never fits (the fixture's cluster has 4 CPUs): fails before any waiting.
    started = time.time()
    with pytest.raises(PlacementError, match="needs 6 CPUs .* the cluster has 4"):
        reserve(load_config(None, ["rollout.num_engines=2", "rollout.cpus_per_engine=2", "reward.cpus_per_actor=1"]))
    assert time.time() - started < 5

    # Fits in total, but another job holds the CPUs: a bounded wait, then one line.
    from ray.util.placement_group import placement_group, remove_placement_group
    holder = placement_group([{"CPU": 3.0}])
    ray.get(holder.ready(), timeout=30)
    try:
        started = time.time()
        with pytest.raises(PlacementError, match=r"waited 2s for 2 bundles .*free now: 1 CPUs"):
            reserve(load_config(None, ["run.placement_timeout_s=2"]))
        assert time.time() - started < 10
    finally:
        remove_placement_group(holder)
    group, _ = reserve(load_config(None, ["run.placement_timeout_s=30"]))  # the failed request left nothing reserved
    release(group)


@pytest.mark.integration
def test_train_that_cannot_fit_exits_2_with_one_line(tiny_model, cache_dir, tmp_path):
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "scratchpad.cluster.cli", "train", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run"),
         f"model.cache_dir={cache_dir}", "model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.num_layers=2",
         "model.tiny.intermediate_size=256", "model.tiny.warmstart_steps=150", "model.tiny.warmstart_direct_fraction=0", "task.min_len=3", "task.max_len=5",
         "rollout.num_engines=3", "run.num_cpus=2"],
        cwd=root, env={**os.environ, "SCRATCHPAD_CACHE": str(cache_dir)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("scratchpad: error: placement: needs 4 CPUs for 3 rollout engines x 1 + 1 learner x 1; "
                         "the cluster has 2"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
