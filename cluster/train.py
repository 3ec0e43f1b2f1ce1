"""`scratchpad train`: the main loop, as a recipe of named, timed phases.

Each step: produce (rollout actors sample groups -> reward actors score and XADD
them) until the learner's batch is full -> train (one DeepSpeed step, ack) ->
sync (rollout actors load the new weights in place). Evaluation is greedy on a
held-out set, before, every `eval_every` steps, and after.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import ray

from scratchpad.actors.tasks import eval_set, train_stream
from scratchpad.common.config import ExperimentConfig, dump_config
from scratchpad.cluster.make_model import resolve_model
from scratchpad.cluster.progress import StepReporter, check_wandb
from scratchpad.cluster.report import write_outputs, write_report
from scratchpad.cluster.run import Cluster, run_identity
from scratchpad.rewards.scoring import is_correct


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        started = time.time()
        try:
            yield
        finally:
            self.seconds[name] += time.time() - started


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def dispatch_to_pool(cluster: Cluster, refs: list, method: str, *args) -> list:
    """Call `method` of the least-busy reward actor on each generated chunk, as soon as that chunk exists (the call
    takes the chunk's ObjectRef, which Ray resolves when generation finishes); returns the calls. At most
    reward.max_pending calls wait per actor: when every queue is full, dispatch waits for one to drain (backpressure)."""
    limit, pending, order = cluster.cfg.reward.max_pending, {i: [] for i in range(len(cluster.rewarders))}, []
    for ref in refs:
        while min(len(p) for p in pending.values()) >= limit:
            done, _ = ray.wait([r for p in pending.values() for r in p], num_returns=1, fetch_local=False)
            for p in pending.values():
                p[:] = [r for r in p if r not in done]
        actor = min(pending, key=lambda i: len(pending[i]))
        call = getattr(cluster.rewarders[actor], method).remote(ref, *args)
        pending[actor].append(call)
        order.append(call)
    return order


def score_in_pool(cluster: Cluster, refs: list, method: str, *args) -> list:
    return ray.get(dispatch_to_pool(cluster, refs, method, *args))


def generate_chunks(cluster: Cluster, prompts: list) -> list:
    """Each engine's share of `prompts` in rollout.chunks_per_engine generate calls, queued on the engine in order:
    the first chunk's groups can be scored while the engine samples the next."""
    chunks = cluster.cfg.rollout.chunks_per_engine
    calls = []
    for engine, share in zip(cluster.rollouts, _split(prompts, len(cluster.rollouts))):
        size = -(-len(share) // chunks) if share else 0
        calls += [engine.generate.remote(share[i : i + size]) for i in range(0, len(share), size or 1)]
    return calls


def produce(cluster: Cluster, prompts: list, timer: Timer, samples: int) -> dict:
    """Sample groups for `prompts` on every engine; reward actors score each chunk as it is generated and push it to
    Redis. `generate` times until the last chunk is sampled (scoring overlaps it), `reward` what scoring adds after."""
    with timer.phase("generate"):
        gen = generate_chunks(cluster, prompts)
        calls = dispatch_to_pool(cluster, gen, "score_and_push", samples)
        ray.wait(gen, num_returns=len(gen), fetch_local=False)
    with timer.phase("reward"):
        stats = ray.get(calls)
    weights = [s["traces"] for s in stats]
    merged = {k: sum(s[k] * w for s, w in zip(stats, weights)) / max(1, sum(weights)) for k in stats[0] if isinstance(stats[0][k], float)}
    merged |= {k: sum(s[k] for s in stats) for k in stats[0] if k.startswith("count_")}  # per-status counts add up
    merged["generated_tokens"] = sum(s["generated_tokens"] for s in stats)
    merged["samples"] = [t for s in stats for t in s["samples"]][:samples]  # each chunk offers `samples`
    return merged


def evaluate(cluster: Cluster, prompts: list) -> dict:
    """Greedy accuracy on held-out prompts, overall and by task length."""
    gen = [r.generate.remote(chunk, True) for r, chunk in zip(cluster.rollouts, _split(prompts, len(cluster.rollouts))) if chunk]
    groups = [g for part in score_in_pool(cluster, gen, "score") for g in part]
    by_len: dict[str, list[float]] = defaultdict(list)
    correct = []
    key = cluster.cfg.reward.accuracy_component()
    for g in groups:
        t = g.traces[0]
        correct.append(is_correct(t, key))
        by_len[str(t.meta.get("length", "all"))].append(correct[-1])
    return {
        "prompts": len(groups),
        "accuracy": sum(correct) / len(correct),
        "by_length": {k: sum(v) / len(v) for k, v in sorted(by_len.items(), key=lambda kv: (len(kv[0]), kv[0]))},
        "truncated": sum(g.traces[0].finish_reason == "length" for g in groups) / len(groups),
        "thought_rate": sum(g.traces[0].thought is not None for g in groups) / len(groups),
    }


def on_learners(cluster: Cluster, method: str, *args) -> list:
    """Call `method` on every learner rank at once (collective operations need all of them) and wait."""
    return ray.get([getattr(rank, method).remote(*args) for rank in cluster.learners])


def train_learners(cluster: Cluster) -> dict:
    """One step on every rank. Each rank's loss is its share of the global loss, so losses and counts add up;
    other statistics are rank 0's."""
    parts = on_learners(cluster, "train")
    merged = dict(parts[0])
    for key in ("loss", "value_loss", "tokens", "trained_sequences", "groups_trained", "groups_dropped"):
        if key not in merged:
            continue
        merged[key] = sum(p[key] for p in parts)
    for key in {k for p in parts for k in p if k.startswith("dropped_")}:
        merged[key] = sum(p.get(key, 0) for p in parts)
    merged["reward_mean"] = sum(p["reward_mean"] for p in parts) / len(parts)
    merged["policy_lag_mean"] = sum(p["policy_lag_mean"] for p in parts) / len(parts)
    merged["group_ids"] = [g for p in parts for g in p["group_ids"]]
    return merged


def sync_weights(cluster: Cluster) -> int:
    """One ray.put of the learner's weights (rank 0's return value), read by every rollout actor. Every rank is
    called: under ZeRO-3 gathering the weights is a collective."""
    published, *others = [rank.weights.remote() for rank in cluster.learners]
    versions = ray.get([r.update_weights.remote(published) for r in cluster.rollouts])
    ray.get(others)
    return min(versions)


class RunLog:
    """The run directory's append-only records. On resume, rows past the checkpoint are dropped (those steps are redone)."""

    FILES = ("metrics", "evals", "trained", "traces")

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.run_dir = run_dir
        if resume_step is not None:
            for name in self.FILES:
                path = run_dir / f"{name}.jsonl"
                rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step] if path.exists() else []
                path.write_text("".join(row + "\n" for row in rows))
        self.handles = {name: open(run_dir / f"{name}.jsonl", "a") for name in self.FILES}

    def write(self, name: str, row: dict) -> None:
        self.handles[name].write(json.dumps(row) + "\n")
        self.handles[name].flush()

    def read(self, name: str) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / f"{name}.jsonl").read_text().splitlines()]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    return (run_dir / "checkpoints" / f"step-{steps[-1]}", steps[-1]) if steps else None


def train(cfg: ExperimentConfig, run_dir: Path, log=print, resume: bool = False, live: bool | None = None) -> dict:
    """Run (or, with `resume`, continue from the newest checkpoint in run_dir) and return the summary.
    `live`: a rich progress bar instead of step lines (default: when stdout is a terminal)."""
    started = time.time()
    check_wandb(cfg)
    point = latest_checkpoint(run_dir) if resume else None
    first = point[1] + 1 if point else 1
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_path = resolve_model(cfg, log=log)
    stream, held_out = train_stream(cfg.task), eval_set(cfg.task)
    runlog = RunLog(run_dir, point[1] if point else None)
    report = None
    try:
        with Cluster(cfg, run_dir, model_path, resume_from=str(point[0]) if point else None) as cluster:
            report = StepReporter(cfg, run_dir, run_identity(run_dir, cfg.name)["run_id"], started, first, log, live)
            for _ in range(cluster.buffer.counters()["produced"] if point else 0):
                next(stream)  # prompts already sampled into the buffer are not sampled again
            if point:
                sync_weights(cluster)  # the engines start from the checkpoint's weights and version
                report.log(f"resumed at step {point[1]} from {point[0]}")
            else:
                before = evaluate(cluster, held_out)
                runlog.write("evals", {"step": 0, "wall": time.time() - started, **before})
                report.evaluation(0, before)
                report.log(f"cluster up in {time.time() - started:.1f}s; held-out accuracy at step 0: {before['accuracy']:.3f}")
            done = first - 1
            try:
                for step in range(first, cfg.run.steps + 1):
                    run_step(cfg, cluster, run_dir, runlog, report, stream, held_out, step, started)
                    done = step
                    if cluster.stop_requested.is_set():
                        raise KeyboardInterrupt("stop requested")
            except KeyboardInterrupt:
                # Keep what was learned, then unwind and stop everything. Only a learner whose version matches the
                # last recorded step is checkpointed, so the records and the checkpoint always agree on a resume.
                if ray.get(cluster.learner.policy_version.remote()) == done:
                    report.log(f"stopping: checkpoint at step {done}")
                    on_learners(cluster, "save_checkpoint", str(run_dir / "checkpoints"), cfg.run.keep_checkpoints)
                stopped_report(run_dir, cfg, runlog, done, report.log)
                raise
            after = evaluate(cluster, held_out)
            runlog.write("evals", {"step": cfg.run.steps, "wall": time.time() - started, **after})
            report.evaluation(cfg.run.steps, after)
            report.log(f"step {cfg.run.steps} held-out accuracy {after['accuracy']:.3f}")
            on_learners(cluster, "save_pretrained", str(run_dir / "final"))  # collective under ZeRO-3
            counters = cluster.buffer.counters()
    finally:
        runlog.close()
        if report is not None:
            report.close()
    return write_outputs(run_dir, cfg, runlog.read("metrics"), runlog.read("evals"), counters, time.time() - started)


def stopped_report(run_dir: Path, cfg: ExperimentConfig, runlog: RunLog, done: int, log) -> None:
    """report.html for a run stopped early. A report that cannot be drawn must not turn a clean stop into a crash."""
    try:
        write_report(run_dir, cfg.name, runlog.read("metrics"), runlog.read("evals"),
                     note=f"Stopped early after step {done} of {cfg.run.steps}; continue with scratchpad train --resume {run_dir}")
    except Exception as exc:  # noqa: BLE001 (reported, and the stop goes on)
        log(f"report.html not written: {type(exc).__name__}: {exc}")


def run_step(cfg: ExperimentConfig, cluster: Cluster, run_dir: Path, runlog: RunLog, report: StepReporter, stream,
             held_out: list, step: int, started: float) -> None:
    """One step: produce until the learner's batch is full -> train -> sync -> checkpoint -> records."""
    timer, step_started = Timer(), time.time()
    produced = []
    with timer.phase("fill"):  # a resumed learner first re-trains what its checkpoint lacks
        need = sum(on_learners(cluster, "fill_batch", 1))
    while need > 0:
        produced.append(produce(cluster, [next(stream) for _ in range(need)], timer, cfg.run.sample_traces))
        with timer.phase("fill"):  # produce() returns after its XADDs: read what is there, never wait on an empty stream
            need = sum(on_learners(cluster, "fill_batch", 0))
    with timer.phase("train"):
        learned = train_learners(cluster)
    with timer.phase("sync"):
        sync_weights(cluster)
    if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
        with timer.phase("checkpoint"):
            on_learners(cluster, "save_checkpoint", str(run_dir / "checkpoints"), cfg.run.keep_checkpoints)
    runlog.write("trained", {"step": step, "policy_version": learned["policy_version"], "groups": learned.pop("group_ids")})
    record = step_record(step, started, step_started, timer, produced, learned)
    for t in (produced[0]["samples"] if produced else []):
        runlog.write("traces", {"step": step, **t})
    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
        result = evaluate(cluster, held_out)
        runlog.write("evals", {"step": step, "wall": time.time() - started, **result})
        report.evaluation(step, result)
        record["eval_accuracy"] = result["accuracy"]
    runlog.write("metrics", record)
    cluster.metrics.record(record, cluster.buffer.counters())
    report.step(record, format_step(record, cfg.run.steps))


def step_record(step: int, started: float, step_started: float, timer: Timer, produced: list[dict], learned: dict) -> dict:
    first = produced[0] if produced else {}
    gen_seconds = timer.seconds["generate"]
    return {
        "step": step,
        "wall": time.time() - started,
        "step_seconds": time.time() - step_started,
        **{k: v for k, v in first.items() if isinstance(v, float)},
        **{k: sum(p[k] for p in produced) for k in first if k.startswith("count_")},  # every status of the step, counted
        "tokens_per_s": sum(p["generated_tokens"] for p in produced) / max(gen_seconds, 1e-9),
        **{f"time_{k}": v for k, v in timer.seconds.items()},
        **learned,
    }


def format_step(r: dict, steps: int) -> str:
    return (f"step {r['step']}/{steps} reward {r.get('reward', float('nan')):.3f} acc {r.get('accuracy', float('nan')):.3f} loss {r['loss']:+.4f} "
            f"tok/s {r['tokens_per_s']:.0f} step {r['step_seconds']:.2f}s"
            + (f" held-out {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else ""))

