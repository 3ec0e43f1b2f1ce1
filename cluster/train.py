"""`scratchpad train`: the main loop, as a recipe of named, timed phases.

Each step: fill (rollout actors sample, reward actors score and XADD, the learner reads until its batch is full) ->
train (one DeepSpeed step; production goes on meanwhile within the staleness bound) -> sync (publish the weights;
rollout actors load them between generate calls; the synchronous mode waits for them) -> checkpoint -> records.
One loop serves both modes: `learner.max_staleness: 0` is the synchronous loop (cluster/pipeline.py says why).
Evaluation is greedy on a held-out set, on its own actor, before, every `eval_every` steps, and after.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import ray

from scratchpad.actors.tasks import eval_set, train_stream
from scratchpad.cluster.held_out import Evaluations
from scratchpad.cluster.make_model import resolve_model
from scratchpad.cluster.preflight import fits_model, inspect_model
from scratchpad.cluster.pipeline import ACTOR_DIED, Production, Restarts, RestartBudget, RunHalted, StallError, get_or_stall, merge_stats
from scratchpad.cluster.progress import StepReporter, check_wandb
from scratchpad.cluster.report import write_outputs, write_report
from scratchpad.cluster.run import Cluster, run_identity
from scratchpad.common.config import ExperimentConfig, dump_config


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


def on_learners(cluster: Cluster, method: str, *args) -> list:
    """Call `method` on every learner rank at once (collective operations need all of them) and wait."""
    return get_or_stall([getattr(rank, method).remote(*args) for rank in cluster.learners], cluster.cfg.run.stall_timeout_s,
                        method, "the learner")


def merge_learned(parts: list[dict]) -> dict:
    """Each rank's loss is its share of the global loss, so losses and counts add up; other statistics are rank 0's."""
    merged = dict(parts[0])
    for key in ("loss", "value_loss", "tokens", "trained_sequences", "groups_trained", "groups_dropped"):
        if key in merged:
            merged[key] = sum(p[key] for p in parts)
    for key in {k for p in parts for k in p if k.startswith("dropped_")}:
        merged[key] = sum(p.get(key, 0) for p in parts)
    merged["reward_mean"] = sum(p["reward_mean"] for p in parts) / len(parts)
    merged["policy_lag_mean"] = sum(p["policy_lag_mean"] for p in parts) / len(parts)
    merged["policy_lag_max"] = max(p["policy_lag_max"] for p in parts)
    merged["policy_lag_hist"] = [sum(h) for h in zip(*(p["policy_lag_hist"] for p in parts))]
    merged["group_ids"] = [g for p in parts for g in p["group_ids"]]
    return merged


def fill(cluster: Cluster, production: Production) -> None:
    """Keep production going until every learner rank's share of the batch is full. A stop request ends the wait."""
    need = sum(on_learners(cluster, "fill_batch", 0))
    while need > 0:
        production.top_up()
        if production.idle():
            production.refill(need)
            production.top_up()
        production.poll(timeout=1.0)
        if cluster.stop_requested.is_set():
            raise KeyboardInterrupt("stop requested")
        production.check_stalled("generate" if production.generating else "reward")
        need = sum(on_learners(cluster, "fill_batch", 0))


def train_step(cluster: Cluster, production: Production) -> dict:
    """One step on every rank; rollout actors keep sampling within the staleness bound while it runs."""
    calls = [rank.train.remote() for rank in cluster.learners]
    started = time.time()
    while len(production.poll(timeout=1.0, extra=calls[:1])) == 0:
        production.top_up()
        if time.time() - started > cluster.cfg.run.stall_timeout_s:
            raise StallError(f"train: the learner made no progress for {time.time() - started:.0f} s "
                             f"(run.stall_timeout_s={cluster.cfg.run.stall_timeout_s:g})")
    return merge_learned(get_or_stall(calls, cluster.cfg.run.stall_timeout_s, "train", "the learner"))


def deliver(cluster: Cluster, production: Production) -> object | None:
    """The new weights into every rollout actor, by learner.weight_transport: one object-store put (returned, for an
    evaluation to reuse), or a broadcast in the weight group (None: the put a restart or an evaluation needs is made
    when it is needed)."""
    cfg = cluster.cfg
    if cfg.learner.weight_transport == "object_store":
        published = production.latest = cluster.publish_weights()
        sync_weights(cluster, published, wait=cfg.learner.max_staleness == 0, production=production)
        return published
    production.latest = None  # older than the learner now; a restarted engine gets a fresh put (Production.rollout_died)
    broadcast(cluster, production)
    return None


def broadcast(cluster: Cluster, production: Production) -> None:
    """Learner rank 0 broadcasts its weights to every rollout actor, which loads them in place (synchronous mode). A
    member that died or did not come: abort the group, let Ray restart the dead, rebuild the group and send again,
    once; a second failure halts the run with one line."""
    from scratchpad.common.weight_group import abort

    cfg = cluster.cfg
    version = ray.get(cluster.learner.policy_version.remote(), timeout=cfg.run.stall_timeout_s)
    for attempt in (1, 2):
        if cluster.weight_group is None:
            cluster.form_weight_group()
        issued = time.time()
        sends = [rank.broadcast_weights.remote() for rank in cluster.learners]
        loads = [actor.receive_weights.remote(version) for actor in cluster.rollouts]
        try:
            get_or_stall([*sends, *loads], cfg.learner.weight_timeout_s + 30, "sync", "the weight group", "learner.weight_timeout_s")
            return
        except (*ACTOR_DIED, ray.exceptions.RayTaskError, StallError) as exc:
            failure = exc
        abort(*cluster.weight_group, f"a member failed: {type(failure).__name__}")
        cluster.weight_group = None
        ray.wait([*sends, *loads], num_returns=len(sends) + len(loads), timeout=cfg.learner.weight_timeout_s + 30)
        if learner_died(cluster):
            for ref in sends:
                ray.get(ref, timeout=0)  # raises the rank's death: run_steps restarts the learner from its checkpoint
            raise failure
        for engine, ref in enumerate(loads):
            try:
                ray.get(ref, timeout=0)
            except ACTOR_DIED:
                production.rollout_died(engine, issued)
            except Exception:  # noqa: BLE001 (the engine is alive; its receive failed with the group)
                pass
        if attempt == 2:
            cause = getattr(failure, "cause", None) or failure
            raise RunHalted(f"sync: the weight broadcast failed twice: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}")


def sync_weights(cluster: Cluster, published, wait: bool, production: Production | None = None) -> None:
    """Queue the new weights on every rollout actor (behind its current generate call); wait for them when `wait`.
    A rollout actor that died meanwhile is restarted by Ray and given them again."""
    issued = time.time()
    loads = [(r.update_weights.remote(published), i) for i, r in enumerate(cluster.rollouts)]
    for ref, engine in loads if wait else ():
        try:
            get_or_stall(ref, cluster.cfg.run.stall_timeout_s, "sync", f"rollout actor {engine}")
        except ACTOR_DIED:
            if production is None:
                raise
            production.latest = published
            ray.get(production.rollout_died(engine, issued).__ray_ready__.remote(), timeout=cluster.cfg.run.stall_timeout_s)  # after the load


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

    def rewind(self, step: int) -> None:
        """Drop the rows past `step` (a learner restarted from that checkpoint redoes them)."""
        self.close()
        self.__init__(self.run_dir, step)

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
    # Prompts with no room for rollout.max_new_tokens in the model's positions are left out (preflight counted them).
    built = cfg if cfg.model.path or not cfg.model.preset else cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"path": model_path, "preset": None})})
    keep = fits_model(cfg, inspect_model(built))
    stream, held_out = train_stream(cfg.task, keep), eval_set(cfg.task, keep)
    runlog = RunLog(run_dir, point[1] if point else None)
    report = None
    try:
        with Cluster(cfg, run_dir, model_path, resume_from=str(point[0]) if point else None) as cluster:
            report = StepReporter(cfg, run_dir, run_identity(run_dir, cfg.name)["run_id"], started, first, log, live)
            evals = Evaluations(cluster, held_out, runlog, report, started)
            for _ in range(cluster.buffer.counters()["produced"] if point else 0):
                next(stream)  # prompts already sampled into the buffer are not sampled again
            if point:
                sync_weights(cluster, cluster.publish_weights(), wait=True)  # the engines start from the checkpoint's weights and version
                report.log(f"resumed at step {point[1]} from {point[0]}")
            else:
                evals.start(0)
                report.log(f"cluster up in {time.time() - started:.1f}s")
            run_steps(cfg, cluster, run_dir, runlog, report, stream, evals, first)
            evals.start(cfg.run.steps, cluster.publish_weights())
            evals.wait_all()
            on_learners(cluster, "save_pretrained", str(run_dir / "final"))  # collective under ZeRO-3
            counters = cluster.buffer.counters()
    finally:
        runlog.close()
        if report is not None:
            report.close()
    return write_outputs(run_dir, cfg, runlog.read("metrics"), runlog.read("evals"), counters, time.time() - started)


def run_steps(cfg: ExperimentConfig, cluster: Cluster, run_dir: Path, runlog: RunLog, report: StepReporter, stream,
              evals: Evaluations, first: int) -> None:
    """Steps first..run.steps. A dead learner rank restarts from the newest checkpoint and redoes the steps after it.
    On a stop request, Ctrl-C or a halt (one line), keep what was learned, then unwind: only a learner whose version
    matches the last recorded step is checkpointed, so the records and the checkpoint agree on a resume."""
    restarts = Restarts(cfg)
    production = Production(cluster, stream, restarts)
    step = first
    try:
        while step <= cfg.run.steps:
            try:
                run_step(cfg, cluster, run_dir, runlog, report, production, evals, step)
            except ACTOR_DIED:
                if not learner_died(cluster):
                    raise
                step = restart_learner(cfg, cluster, run_dir, runlog, report, production, restarts)
                continue
            step += 1
            if cluster.stop_requested.is_set():
                raise KeyboardInterrupt("stop requested")
    except (KeyboardInterrupt, RunHalted) as exc:
        done = step - 1
        if isinstance(exc, RunHalted):
            report.log(f"halting: {exc}")
        # What is being generated is scored and pushed: the resumed run trains it. A stalled stage will not finish.
        production.drain(timeout=5.0 if isinstance(exc, StallError) else 60.0)
        if not learner_died(cluster) and ray.get(cluster.learner.policy_version.remote(), timeout=cfg.run.stall_timeout_s) == done:
            report.log(f"stopping: checkpoint at step {done}")
            on_learners(cluster, "save_checkpoint", str(run_dir / "checkpoints"), cfg.run.keep_checkpoints)
        stopped_report(run_dir, cfg, runlog, done, report.log)
        raise


def learner_died(cluster: Cluster) -> bool:
    """Whether some learner rank's process is gone (rather than a rollout or reward actor's)."""
    for rank in cluster.learners:
        try:
            ray.get(rank.policy_version.remote(), timeout=30)
        except (*ACTOR_DIED, ray.exceptions.GetTimeoutError):
            return True
    return False


def restart_learner(cfg: ExperimentConfig, cluster: Cluster, run_dir: Path, runlog: RunLog, report: StepReporter,
                    production: Production, restarts: Restarts) -> int:
    """Start every learner rank again from the newest checkpoint; it replays exactly the entries that checkpoint
    lacks. Returns the step to redo next."""
    point = latest_checkpoint(run_dir)
    restarts.record("learner", "a learner rank")
    if point is None:
        raise RestartBudget("a learner rank died and there is no checkpoint to restart it from (set run.checkpoint_every)")
    started = time.time()
    cluster.restart_learners(str(point[0]))
    production.outstanding += sum(len(r["groups"]) for r in runlog.read("trained") if r["step"] > point[1])  # trained again
    runlog.rewind(point[1])
    cluster.weight_group = None  # the new ranks join a new group
    deliver(cluster, production)
    report.log(f"a learner rank died: restarted from {point[0]} in {time.time() - started:.1f}s; redoing steps after {point[1]}")
    return point[1] + 1


def stopped_report(run_dir: Path, cfg: ExperimentConfig, runlog: RunLog, done: int, log) -> None:
    """report.html for a run stopped early. A report that cannot be drawn must not turn a clean stop into a crash."""
    try:
        write_report(run_dir, cfg.name, runlog.read("metrics"), runlog.read("evals"),
                     note=f"Stopped early after step {done} of {cfg.run.steps}; continue with scratchpad train --resume {run_dir}")
    except Exception as exc:  # noqa: BLE001 (reported, and the stop goes on)
        log(f"report.html not written: {type(exc).__name__}: {exc}")


def run_step(cfg: ExperimentConfig, cluster: Cluster, run_dir: Path, runlog: RunLog, report: StepReporter,
             production: Production, evals: Evaluations, step: int) -> None:
    """One step: fill -> train -> sync -> checkpoint -> records (and an evaluation started, never waited for)."""
    timer, step_started = Timer(), time.time()
    with timer.phase("fill"):  # a resumed learner first re-trains what its checkpoint lacks
        fill(cluster, production)
    with timer.phase("train"):
        learned = train_step(cluster, production)
    with timer.phase("sync"):
        published = deliver(cluster, production)
    if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
        with timer.phase("checkpoint"):
            on_learners(cluster, "save_checkpoint", str(run_dir / "checkpoints"), cfg.run.keep_checkpoints)
    produced = merge_stats(production.settle(learned["groups_trained"], learned["groups_dropped"]), cfg.run.sample_traces)
    runlog.write("trained", {"step": step, "policy_version": learned["policy_version"], "groups": learned.pop("group_ids")})
    for t in produced.pop("samples", []):
        runlog.write("traces", {"step": step, **t})
    elapsed = time.time() - step_started
    record = {"step": step, "wall": time.time() - evals.started, "step_seconds": elapsed, **produced,
              "tokens_per_s": produced.get("generated_tokens", 0) / max(elapsed, 1e-9),
              **{f"time_{k}": v for k, v in timer.seconds.items()}, **learned}
    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
        evals.start(step, published if published is not None or cluster.evaluator is None else cluster.publish_weights())
    evals.collect()
    record |= evals.take_latest()  # an evaluation that finished during this step: eval_step says which weights it scored
    runlog.write("metrics", record)
    cluster.metrics.record(record, cluster.buffer.counters())
    report.step(record, format_step(record, cfg.run.steps))


def format_step(r: dict, steps: int) -> str:
    return (f"step {r['step']}/{steps} reward {r.get('reward', float('nan')):.3f} acc {r.get('accuracy', float('nan')):.3f} loss {r['loss']:+.4f} "
            f"tok/s {r['tokens_per_s']:.0f} lag {r['policy_lag_mean']:.2f} step {r['step_seconds']:.2f}s"
            + (f" held-out {r['eval_accuracy']:.3f} (step {r['eval_step']})" if "eval_accuracy" in r else ""))
