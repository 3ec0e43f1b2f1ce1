"""`scratchpad eval`: a checkpoint's held-out accuracy, greedy and with search (pass@k, maj@k, best-of-N).

It runs on the training engines: rollout actors (vLLM, `RolloutWorker`) generate and reward actors
(`RewardWorker.score`, no Redis) score, on the Ray cluster already initialised or a private local one it starts and
stops. The statistics are in cluster/eval_stats.py. Prompts that leave no room for `rollout.max_new_tokens` in the
model's context are counted and skipped, never sent to the engine.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import ray

from scratchpad.actors.rollout import RolloutWorker
from scratchpad.actors.tasks import eval_set
from scratchpad.cluster import eval_stats
from scratchpad.cluster.pipeline import get_or_stall
from scratchpad.cluster.run import actor_env
from scratchpad.common.config import ConfigError, ExperimentConfig, load_config
from scratchpad.common.records import Group, Prompt
from scratchpad.rewards.scoring import is_correct

DEFAULT_KS = (1, 4, 8)


class EvalWorker(RolloutWorker):
    """A rollout worker that also says how many tokens each prompt takes, as its engine will see it."""

    def __init__(self, cfg: ExperimentConfig, model_path: str, index: int = 0):
        super().__init__(cfg, model_path, index)
        self.context = self._max_model_len(model_path)

    def prompt_tokens(self, prompts: list[Prompt]) -> tuple[list[int], int]:
        """(tokens of each formatted prompt, the engine's context length in tokens)."""
        counts = [len(self.tokenizer(self.format(p), add_special_tokens=not self.chat)["input_ids"]) for p in prompts]
        return counts, self.context


def resolve_checkpoint(checkpoint: str) -> tuple[Path, Path | None, Path | None]:
    """(model directory, default config, default output directory) for a run directory (its final/ and config.yaml),
    a run's final/ (its run's config.yaml), or any Hugging Face checkpoint directory (built-in defaults)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"eval: no such checkpoint {checkpoint}")
    if (path / "config.json").exists():
        run = path.parent if (path.parent / "config.yaml").exists() else None
        return path, (run / "config.yaml" if run else None), (run / "eval" if run else None)
    if (path / "config.yaml").exists():
        if not (path / "final" / "config.json").exists():
            raise ConfigError(f"eval: {checkpoint} is a run directory without a final model ({path / 'final'}): the run has not finished")
        return path / "final", path / "config.yaml", path / "eval"
    raise ConfigError(f"eval: {checkpoint} is neither a Hugging Face checkpoint (no config.json) nor a run directory (no config.yaml)")


def parse_ks(text: str | None, samples: int) -> list[int]:
    """--k as a sorted list; by default 1, 4, 8 up to `samples`, and `samples` itself (best-of-N over all)."""
    if samples == 0:
        if text is not None:
            raise ConfigError(f"eval: --k {text} needs --samples above 0 (0 is greedy only)")
        return []
    if text is None:
        return sorted({k for k in DEFAULT_KS if k <= samples} | {samples})
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"eval: --k {text!r}: expected comma-separated integers, e.g. 1,4,8") from None
    bad = [k for k in ks if not 1 <= k <= samples]
    if not ks or bad:
        raise ConfigError(f"eval: --k {text}: each k must lie in 1..--samples ({samples})")
    return ks


def eval_config(checkpoint: str, config: str | None, overrides: list[str], samples: int, eval_size: int | None) -> tuple[ExperimentConfig, Path | None]:
    """The resolved config (model.path set to the checkpoint, rollout.n to `samples`) and the default output dir."""
    model, default_config, default_out = resolve_checkpoint(checkpoint)
    cfg = load_config(config or default_config, overrides)
    if samples < 0:
        raise ConfigError(f"eval: --samples must be 0 (greedy only) or more (got {samples})")
    # The checkpoint is the model: the preset it was built from and the cold start it had are history, not to redo.
    cfg.model.preset, cfg.coldstart.steps = None, 0
    cfg.model.path = str(model.resolve())  # validate_assignment checks each field's bounds
    if samples:
        cfg.rollout.n = samples
    if eval_size is not None:
        if eval_size < 1:
            raise ConfigError(f"eval: --eval-size must be at least 1 (got {eval_size})")
        cfg.task.eval_size = eval_size
    return cfg, default_out


def rerank_component(cfg: ExperimentConfig, name: str | None) -> str:
    """The component best-of-N picks by: `name`, or the first answer checker."""
    names = [c.name for c in cfg.reward.resolved_components()]
    if name is None:
        name = cfg.reward.accuracy_component()
        if name is None:
            raise ConfigError(f"eval: no answer checker among reward.components ({', '.join(names)}); name one with --rerank")
    if name not in names:
        raise ConfigError(f"eval: --rerank {name}: no such reward component (have: {', '.join(names)})")
    return name


@contextmanager
def eval_actors(cfg: ExperimentConfig):
    """Rollout and reward actors (and a judge's engine actor, if a component needs one) for `cfg`; Ray is started
    (a private local cluster, or run.ray_address / $RAY_ADDRESS) only if none is initialised, and then stopped."""
    started_ray, actors = False, []
    if not ray.is_initialized():
        address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=False)
            started_ray = True
    try:
        from scratchpad.actors.judge_engine import JudgeEngine
        from scratchpad.rewards.scoring import RewardWorker

        env, path = {"env_vars": actor_env(cfg)}, cfg.model.path
        rollouts = [ray.remote(EvalWorker).options(num_cpus=cfg.rollout.cpus_per_engine, num_gpus=cfg.rollout.gpus_per_engine,
                                                   runtime_env=env).remote(cfg, path, i) for i in range(cfg.rollout.num_engines)]
        actors += rollouts
        judges = {c.name: ray.remote(JudgeEngine).options(num_cpus=c.num_cpus, num_gpus=c.num_gpus, runtime_env=env).remote(
            c, path, cfg.model.dtype, 0, cfg.run.threads_per_actor) for c in cfg.reward.resolved_components() if c.kind == "judge"}
        actors += judges.values()
        # Other model components (likelihood, reward model) load inside each reward actor.
        rewarders = [ray.remote(RewardWorker).options(num_cpus=cfg.reward.cpus_per_actor, runtime_env=env).remote(
            cfg.reward, None, cfg.rollout.max_new_tokens, judges, path) for _ in range(cfg.reward.num_actors)]
        actors += rewarders
        get_or_stall([a.__ray_ready__.remote() for a in actors], cfg.run.startup_timeout_s, "eval",
                     "start-up: the engine and reward actors", "run.startup_timeout_s", each=True)
        yield SimpleNamespace(rollouts=rollouts, rewarders=rewarders, stall_s=cfg.run.stall_timeout_s)
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead: nothing left to stop
                pass
        if started_ray:
            ray.shutdown()


def generate_and_score(actors, prompts: list[Prompt], greedy: bool, chunks: int) -> list[Group]:
    """Every prompt through the engines (`chunks` calls per engine) and the reward actors; each chunk is scored as soon
    as it is generated (the reward call takes the generate call's ObjectRef)."""
    calls = []
    for e, engine in enumerate(actors.rollouts):
        share = prompts[e :: len(actors.rollouts)]
        size = max(1, -(-len(share) // chunks))
        calls += [engine.generate.remote(share[i : i + size], greedy) for i in range(0, len(share), size)]
    scored = [actors.rewarders[i % len(actors.rewarders)].score.remote(ref) for i, ref in enumerate(calls)]
    return [g for part in get_or_stall(scored, actors.stall_s, "eval", "generate and score", each=True) for g in part]


def fitting_prompts(actors, prompts: list[Prompt], max_new_tokens: int) -> tuple[list[Prompt], dict]:
    """The prompts whose tokens plus max_new_tokens fit the model's context, and a count of the others by length."""
    counts, context = ray.get(actors.rollouts[0].prompt_tokens.remote(prompts), timeout=actors.stall_s)
    fits = [p for p, n in zip(prompts, counts) if n + max_new_tokens <= context]
    skipped = Counter(str(p.meta.get("length", "all")) for p, n in zip(prompts, counts) if n + max_new_tokens > context)
    return fits, {"count": len(prompts) - len(fits), "by_length": dict(skipped), "context_tokens": context,
                  "max_new_tokens": max_new_tokens, "prompt_tokens_max": max(counts, default=0),
                  "prompt_tokens_min": min(counts, default=0)}


def summarise(greedy: list[Group], sampled: list[Group], accuracy_key: str | None, rerank: str, ks: list[int]) -> dict:
    """Every metric as {"overall": {accuracy, n, low, high}, "by_length": {length: ...}}, plus greedy diagnostics."""
    first = [g.traces[0] for g in greedy]
    lengths = [t.meta.get("length", "all") for t in first]
    metrics = {"greedy": eval_stats.by_length([is_correct(t, accuracy_key) for t in first], lengths)}
    rows = [{"correct": [is_correct(t, accuracy_key) for t in g.traces], "answers": [t.answer for t in g.traces],
             "scores": [t.components.get(rerank, 0.0) for t in g.traces]} for g in sampled]
    sampled_lengths = [g.traces[0].meta.get("length", "all") for g in sampled]
    if ks:  # also when no prompt fits: every metric is then there, with n = 0
        for name, values in eval_stats.sampled_metrics(rows, ks).items():
            metrics[name] = eval_stats.by_length(values, sampled_lengths)
    share = lambda items, test: sum(map(test, items)) / len(items) if items else None  # noqa: E731
    traces = [t for g in sampled for t in g.traces]
    return {"metrics": metrics, "diagnostics": {
        "greedy_thought_rate": share(first, lambda t: t.thought is not None),
        "greedy_truncated": share(first, lambda t: t.finish_reason == "length"),
        "greedy_completion_tokens": share(first, lambda t: t.num_tokens),
        "sampled_thought_rate": share(traces, lambda t: t.thought is not None),
        "sampled_truncated": share(traces, lambda t: t.finish_reason == "length"),
        "statuses": {s: sum(t.status == s for t in first + traces) for s in {t.status for t in first + traces}},
    }}


def plot(result: dict, path: Path) -> Path:
    """Accuracy by length with 95% interval bars: greedy, and at the largest k pass@k, maj@k and best@k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, k = result["metrics"], max(result["ks"], default=None)
    names = ["greedy"] + ([f"pass@{k}", f"maj@{k}", f"best@{k}"] if k else [])
    keys = sorted({key for name in names for key in metrics[name]["by_length"]}, key=eval_stats.length_order)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, name in enumerate(names):
        rows = [metrics[name]["by_length"].get(key) for key in keys]
        xs = [i + (j - (len(names) - 1) / 2) * 0.12 for i, r in enumerate(rows) if r]
        ys = [r["accuracy"] for r in rows if r]
        err = [[y - r["low"] for y, r in zip(ys, filter(None, rows))], [r["high"] - y for y, r in zip(ys, filter(None, rows))]]
        overall = metrics[name]["overall"]
        shown = f"best-of-{k} by {result['rerank']}" if name == f"best@{k}" else name
        label = f"{shown} ({overall['accuracy']:.3f}, n={overall['n']})" if overall["n"] else f"{shown} (no prompts)"
        if xs:
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_xlabel("task length (meta['length'])")
    ax.set_ylabel("held-out accuracy (95% Wilson interval)")
    ax.set_ylim(-0.02, 1.02)
    skipped = result["skipped"]["count"]
    ax.set_title(f"{Path(result['checkpoint']).name}: {result['task']['name']} {result['task']['mode']}"
                 + (f", {skipped} prompts too long skipped" if skipped else ""), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_eval(cfg: ExperimentConfig, out: Path, samples: int, ks: list[int], rerank: str, log=print) -> dict:
    """Evaluate cfg.model.path on cfg's held-out set; writes OUT/eval.json, OUT/eval.png and OUT/greedy.jsonl."""
    started = time.time()
    prompts = eval_set(cfg.task)
    key = cfg.reward.accuracy_component()
    with eval_actors(cfg) as actors:
        fits, skipped = fitting_prompts(actors, prompts, cfg.rollout.max_new_tokens)
        if skipped["count"]:
            log(f"eval: {skipped['count']} of {len(prompts)} prompts leave no room for {cfg.rollout.max_new_tokens} new tokens "
                f"in the {skipped['context_tokens']}-token context; skipped")
        chunks = cfg.rollout.chunks_per_engine
        greedy = generate_and_score(actors, fits, True, chunks) if fits else []
        sampled = generate_and_score(actors, fits, False, chunks) if fits and samples else []
    result = {
        "checkpoint": cfg.model.path, "task": cfg.task.model_dump(), "prompts": len(prompts), "evaluated": len(fits),
        "skipped": skipped, "samples": samples, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
        "ks": ks, "rerank": rerank, "accuracy_component": key, "max_new_tokens": cfg.rollout.max_new_tokens,
        **summarise(greedy, sampled, key, rerank, ks if samples else []), "seconds": round(time.time() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "greedy.jsonl", "w") as handle:
        for g in greedy:
            t = g.traces[0]
            handle.write(json.dumps({"prompt": t.prompt, "completion": t.completion, "thought": t.thought, "answer": t.answer,
                                     "reference": t.reference, "correct": is_correct(t, key), "meta": t.meta}) + "\n")
    plot(result, out / "eval.png")
    return result


def format_result(result: dict) -> str:
    """One line per metric: overall accuracy, its n and 95% interval."""
    lines = []
    for name, m in result["metrics"].items():
        o = m["overall"]
        value = f"{o['accuracy']:.3f} [{o['low']:.3f}, {o['high']:.3f}]" if o["n"] else "-"
        lines.append(f"{name:>9}: {value} (n={o['n']})")
    return "\n".join(lines)
