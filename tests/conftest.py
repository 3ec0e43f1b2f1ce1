"""Shared fixtures: one private Ray cluster, one tiny model and one model cache per test session.

Every server a fixture starts listens on loopback, on a free port, and is
stopped by the fixture that started it (never by a pattern match on names).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["SCRATCHPAD_CACHE"] = str(path)
    return path


def small_config(cache_dir: Path, *overrides: str):
    """A config sized for tests: a smaller tiny model, short warm start, few prompts."""
    from scratchpad.common.config import load_config

    return load_config(None, [
        "name=test",
        f"model.cache_dir={cache_dir}",
        "model.tiny.hidden_size=64",
        "model.tiny.num_heads=2",
        "model.tiny.num_layers=2",
        "model.tiny.intermediate_size=256",
        "model.tiny.warmstart_steps=150",
        "task.max_len=5",
        "task.eval_size=24",
        "rollout.prompts_per_step=4",
        "rollout.n=4",
        "rollout.max_new_tokens=80",
        "learner.lr=1e-3",
        "learner.micro_batch_size=8",
        *overrides,
    ])


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> str:
    """The tiny model for tests, built once per session (a real LlamaForCausalLM with a real tokenizer)."""
    from scratchpad.cluster.make_model import make_model

    return str(make_model(small_config(cache_dir), log=lambda *_: None))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A private local Ray cluster for the whole session, stopped at the end."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()
