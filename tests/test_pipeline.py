"""The whole pipeline on real Ray, vLLM, Redis and DeepSpeed for a few steps."""
import json

import psutil
import pytest
from safetensors.torch import load_file

from conftest import small_config

pytestmark = pytest.mark.integration


def redis_servers():
    """redis-server processes this test session started (other runs on the machine are none of our business)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("redis-server"):
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_train_end_to_end(ray_cluster, tiny_model, cache_dir, tmp_path, capsys):
    from scratchpad.cluster.train import train

    cfg = small_config(cache_dir, "run.steps=3", "run.eval_every=2", "learner.lr=3e-3", "reward.format_weight=0.5",
                       "run.checkpoint_every=1", "run.keep_checkpoints=2",
                       "rollout.chunks_per_engine=2")  # rewards score the first half while the engine samples the second
    servers_before = redis_servers()
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    run = tmp_path / "run"

    # Learning happened: parameters changed and policy versions advanced.
    initial = load_file(f"{tiny_model}/model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert all(r["logprob_gap"] < 1e-3 for r in rows), "sampler and learner disagree: weights did not reach the engine"

    # max_staleness 0 is strictly on-policy and trains what the synchronous loop trained: step s takes the next
    # prompts_per_step prompts of the stream, each sampled by the weights it is trained against.
    assert all(r["policy_lag_max"] == 0 and r["policy_lag_hist"][0] == r["groups_trained"] for r in rows)
    trained = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    p = cfg.rollout.prompts_per_step
    assert [[g.split("/")[0] for g in r["groups"]] for r in trained] == [
        [f"train-{cfg.task.seed}-{i}" for i in range(s * p, (s + 1) * p)] for s in range(3)]

    # Every produced group is accounted for.
    assert summary["groups_produced"] == summary["groups_trained"] + summary["groups_dropped"] + summary["groups_in_flight"]
    assert summary["groups_trained"] == 3 * cfg.rollout.prompts_per_step
    assert summary["invariant_holds"]

    # The run directory holds what a person needs.
    for name in ("config.yaml", "metrics.jsonl", "traces.jsonl", "summary.json", "curves.png", "final/config.json"):
        assert (run / name).exists(), name
    assert {"accuracy_before", "accuracy_after", "wall_seconds", "steps", "groups_produced", "groups_trained",
            "groups_dropped"} <= set(summary)
    assert [e["step"] for e in summary["evals"]] == [0, 2, 3]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "final")

    # Checkpoints: written atomically, only the newest two kept.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (run / "checkpoints" / "step-3" / "state").is_dir()

    # Nothing left behind.
    assert redis_servers() == servers_before

    # The counters survive in the run's Redis AOF: `scratchpad status` reads them back.
    from scratchpad.cluster.cli import main
    assert main(["status", str(run)]) == 0
    assert f"trained {summary['groups_trained']}" in capsys.readouterr().out
    assert redis_servers() == servers_before


def test_dynamic_sampling_trains_only_groups_with_a_signal(ray_cluster, tiny_model, cache_dir, tmp_path):
    """learner.filter_groups in the synchronous loop: groups whose rewards are all equal are dropped and counted,
    each step samples prompts_per_step x oversample prompts and refills the missing prompts until the batch is full,
    every trained group carries a reward spread, the books balance, and share_prompts trains through the whole
    pipeline with the sampler's log p."""
    from scratchpad.cluster.train import train

    cfg = small_config(cache_dir, "run.steps=3", "run.eval_every=0", "learner.filter_groups=true", "learner.share_prompts=true",
                       "rollout.prompts_per_step=2", "rollout.oversample=1.5",
                       "rollout.temperature=1.5", "reward.format_weight=0.5",  # some groups differ
                       "run.sample_traces=1000")  # every trace in traces.jsonl
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert all(r["groups_trained"] == 2 for r in rows)
    assert all(r["logprob_gap"] < 1e-3 for r in rows), "the packed learner and the sampler disagree"
    assert sum(r.get("dropped_filtered", 0) for r in rows) > 0, "no group was filtered: the test exercised no refill"
    traces = {}
    for line in (run / "traces.jsonl").read_text().splitlines():
        t = json.loads(line)
        traces.setdefault(t["trace_id"].split(":")[0], []).append(t["reward"])
    trained = [g for r in (json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()) for g in r["groups"]]
    assert set(trained) <= set(traces) and all(max(traces[g]) > min(traces[g]) for g in trained)
    assert summary["groups_produced"] == summary["groups_trained"] + summary["groups_dropped"] + summary["groups_in_flight"]
    assert summary["groups_trained"] == 6 and summary["invariant_holds"]
