"""Production in flight: prompts go to rollout actors, each generated chunk straight to a reward actor that scores it
and pushes its groups to Redis. The one loop of cluster/train.py drives it in both modes.

The bound is `learner.max_staleness` k: at most prompts_per_step x rollout.oversample x (k + 1) groups may be issued
and not yet trained or dropped (a refill may issue past it). With k = 0 that is one batch, issued after the weights
of the last step were sent, so every group is sampled by the weights it is trained against (the synchronous loop).
With k > 0 the rollout actors sample the next batches with the weights they hold while the learner trains; new
weights are queued on each rollout actor behind its current generate call (Ray runs an actor's calls in order), so
they load between generate calls, in place.
Every wait has a timeout: a stage that makes no progress for `run.stall_timeout_s` is named, with its actor.
"""
from __future__ import annotations

import time

import ray

from scratchpad.common.config import ConfigError, issued_per_step


ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # the process behind a handle is gone


class RunHalted(ConfigError):
    """The run cannot go on (one line): it stops after checkpointing what it has learned."""


class StallError(RunHalted):
    """A stage made no progress within run.stall_timeout_s."""


def get_or_stall(refs, timeout: float, stage: str, who: str, field: str = "run.stall_timeout_s", each: bool = False):
    """ray.get of `refs`; past `timeout` seconds (the config's `field`), a StallError naming the stage and the actor
    instead of Ray's timeout. With `each`, the bound is on progress, not on the whole: the wait fails only when no
    ref finishes within `timeout` of the last one (a long evaluation of many calls that keep finishing is fine)."""
    refs = list(refs) if each else refs
    waiting = list(refs) if each else []
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=timeout)
        if not done:
            raise StallError(f"{stage}: {who} made no progress for {timeout:.0f} s ({field}={timeout:g}); "
                             f"{len(waiting)} of {len(refs)} calls unfinished")
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise StallError(f"{stage}: {who} made no progress for {timeout:.0f} s ({field}={timeout:g})") from None


class ScorerFailure(RunHalted):
    """Every trace of a chunk failed to score, or every group is being dropped: training on that would teach nothing."""


class RestartBudget(RunHalted):
    """A process kind died more than run.max_restarts times within run.restart_window_s."""


class Restarts:
    """Counts deaths per process kind in a sliding window; past the budget the run halts."""

    def __init__(self, cfg):
        self.limit, self.window = cfg.run.max_restarts, cfg.run.restart_window_s
        self.times: dict[str, list[float]] = {}
        self.log: list[dict] = []  # every recovery: kind, what, when (for metrics and docs/RELIABILITY.md)

    def record(self, kind: str, what: str) -> None:
        now = time.time()
        recent = [t for t in self.times.get(kind, []) if now - t < self.window] + [now]
        self.times[kind] = recent
        self.log.append({"kind": kind, "what": what, "at": now})
        if len(recent) > self.limit:
            raise RestartBudget(f"{what} died {len(recent)} times within {self.window:g} s (run.max_restarts={self.limit}); "
                                f"stopping with a resumable checkpoint")


class Production:
    """Generate -> score -> push calls in flight, per rollout actor, one generate call at a time per actor."""

    def __init__(self, cluster, stream, restarts: Restarts):
        self.cluster, self.cfg, self.stream, self.restarts = cluster, cluster.cfg, stream, restarts
        self.latest = None  # the newest published weights: a restarted rollout actor loads them before it samples
        r = self.cfg.rollout
        self.chunk = max(1, -(-issued_per_step(r) // (r.num_engines * r.chunks_per_engine)))
        self.generating: dict = {}  # generate ref -> engine index
        self.scoring: dict = {}  # score ref -> (engine index, prompts, generate ref, reward actor index, issued at)
        self.outstanding = 0  # groups issued and not yet trained or dropped
        self.backlog: list = []  # prompts owed to the learner (a refill), served before fresh ones
        self.stats: list[dict] = []  # what each finished scoring call returned, since the last step
        self.last_progress = time.time()
        self.pending_rewarders: dict[int, list] = {i: [] for i in range(len(cluster.rewarders))}
        self.refilled = 0  # prompts issued to refill batches since the last step (bounded)
        self.back_since: dict[tuple, float] = {}  # (kind, index) -> when a restarted actor was last seen alive again

    def budget(self) -> int:
        return issued_per_step(self.cfg.rollout) * (self.cfg.learner.max_staleness + 1)

    def top_up(self, allow_fresh: bool = True) -> None:
        """Give every idle rollout actor its next chunk while the staleness budget (or a refill) allows."""
        busy = set(self.generating.values())
        for engine in range(len(self.cluster.rollouts)):
            if engine in busy:
                continue
            room = self.budget() - self.outstanding
            take = min(self.chunk, len(self.backlog) + (max(0, room) if allow_fresh else 0))
            if take <= 0:
                continue
            if min(len(p) for p in self.pending_rewarders.values()) >= self.cfg.reward.max_pending:
                return  # every reward actor's queue is full: wait for one to drain (backpressure)
            prompts = [self.backlog.pop(0) if self.backlog else next(self.stream) for _ in range(take)]
            self._issue(engine, prompts)

    def idle(self) -> bool:
        return not self.generating and not self.scoring

    def refill(self, missing: int) -> None:
        """Nothing is in flight and the learner's batch still lacks `missing` groups (some were dropped): owe it that
        many fresh prompts, past the staleness budget. Bounded, so a run whose every group is dropped stops. (Owing a
        whole chunk instead was measured on SmolLM2 with filter_groups: no shorter fill, 198 of 1038 groups dropped as
        stale; this CPU's decoder costs by the sequence. `rollout.oversample` is the knob for decoders that do not.)"""
        self.refilled += missing
        if self.refilled > self.cfg.rollout.prompts_per_step * self.cfg.run.max_refill_batches:
            raise ScorerFailure(f"refill: {self.refilled} extra prompts sampled for one batch and it is still not full: every "
                                f"group is being dropped (dropped_* in metrics.jsonl; run.max_refill_batches={self.cfg.run.max_refill_batches})")
        self.backlog += [next(self.stream) for _ in range(missing)]

    def _issue(self, engine: int, prompts: list) -> None:
        gen = self.cluster.rollouts[engine].generate.remote(prompts)
        self.generating[gen] = engine
        self._score(engine, prompts, gen)
        self.outstanding += len(prompts)

    def _score(self, engine: int, prompts: list, gen, issued: float | None = None) -> None:
        rewarder = min(range(len(self.cluster.rewarders)), key=lambda i: len(self.pending_rewarders[i]))
        call = self.cluster.rewarders[rewarder].score_and_push.remote(gen, self.cfg.run.sample_traces)
        self.pending_rewarders[rewarder].append(call)
        self.scoring[call] = (engine, prompts, gen, rewarder, issued or time.time())

    def _recover(self, engine: int, prompts: list, gen, rewarder: int, issued: float) -> None:
        """A chunk's rollout or reward actor died (Ray restarts it). A dead rollout actor's prompts are sampled again
        under the same prompt ids, after it loads the newest weights; a dead reward actor's chunk is scored again.
        A call issued before the actor was last seen back counts toward no new death (one death fails several calls)."""
        try:
            ray.get(gen, timeout=self.cfg.run.stall_timeout_s)
        except ACTOR_DIED:
            actor = self.rollout_died(engine, issued)
            gen = actor.generate.remote(prompts)
            self.generating[gen] = engine
            issued = time.time()
        else:
            if issued >= self.back_since.get(("reward", rewarder), 0.0):
                self.restarts.record("reward", f"reward actor {rewarder}")
                self._await_back(self.cluster.rewarders[rewarder], ("reward", rewarder))
                self.cluster.pin_roles(("reward",))
        self._score(engine, prompts, gen, issued)

    def rollout_died(self, engine: int, issued: float):
        """A call issued at `issued` to rollout actor `engine` failed because its process died: count the death (once),
        wait for Ray to restart it, and give it the newest weights before anything else. Returns its handle."""
        actor = self.cluster.rollouts[engine]
        if issued >= self.back_since.get(("rollout", engine), 0.0):
            self.restarts.record("rollout", f"rollout actor {engine}")
            self._await_back(actor, ("rollout", engine))
            if self.latest is None and self.cfg.learner.weight_transport == "collective":
                # The restarted engine is outside the weight group: it gets the current weights through the object
                # store now, and the group is rebuilt before the next broadcast.
                self.cluster.weight_group = None
                self.latest = self.cluster.publish_weights()
            if self.latest is not None:
                actor.update_weights.remote(self.latest)
            self.cluster.pin_roles(("rollout",))  # the restarted process starts unpinned
        return actor

    def _await_back(self, actor, key: tuple) -> None:
        """Wait until Ray has restarted `actor` (bounded by run.stall_timeout_s)."""
        deadline = time.time() + self.cfg.run.stall_timeout_s
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=max(1.0, deadline - time.time()))
                self.back_since[key] = time.time()
                return
            except ACTOR_DIED:
                if time.time() > deadline:
                    raise StallError(f"restart: {key[0]} actor {key[1]} did not come back within {self.cfg.run.stall_timeout_s:g} s") from None
                time.sleep(0.5)

    def poll(self, timeout: float, extra: list = ()) -> list:
        """Wait up to `timeout` for any production call or one of `extra`; collect finished scoring calls. Returns the
        `extra` refs that are done."""
        refs = [*self.generating, *self.scoring, *extra]
        if not refs:
            return []
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        done_set = set(done)
        for ref in [r for r in self.generating if r in done_set]:
            self.generating.pop(ref)
            self.last_progress = time.time()
        for ref in [r for r in self.scoring if r in done_set]:
            for pending in self.pending_rewarders.values():
                if ref in pending:
                    pending.remove(ref)
            engine, prompts, gen, rewarder, issued = self.scoring.pop(ref)
            try:
                stat = ray.get(ref, timeout=self.cfg.run.stall_timeout_s)
            except ACTOR_DIED:
                self._recover(engine, prompts, gen, rewarder, issued)
                continue
            if stat["traces"] and stat.get("count_error", 0) == stat["traces"]:
                raise ScorerFailure(f"reward: all {stat['traces']} traces of a chunk failed to score (status error: a dead "
                                    f"judge or reward model?); nothing is trained on those zeros")
            self.stats.append(stat)
            self.last_progress = time.time()
        return [r for r in extra if r in done_set]

    def check_stalled(self, stage: str) -> None:
        idle = time.time() - self.last_progress
        if idle <= self.cfg.run.stall_timeout_s:
            return
        engines = sorted({e for e in self.generating.values()} | {chunk[0] for chunk in self.scoring.values()})
        who = f"rollout actor {engines[0]}" if self.generating else (f"reward actor scoring rollout actor {engines[0]}'s chunk" if engines else "the learner")
        raise StallError(f"{stage}: {who} made no progress for {idle:.0f} s (run.stall_timeout_s={self.cfg.run.stall_timeout_s:g})")

    def settle(self, trained: int, dropped: int) -> list[dict]:
        """A step consumed `trained + dropped` groups: free their budget and hand over the step's scoring stats."""
        self.outstanding -= trained + dropped
        self.refilled = 0
        stats, self.stats = self.stats, []
        return stats

    def drain(self, timeout: float) -> None:
        """Wait for every call in flight (a clean stop: what is generated is scored and pushed, never lost)."""
        deadline = time.time() + timeout
        while (self.generating or self.scoring) and time.time() < deadline:
            self.poll(min(5.0, max(0.1, deadline - time.time())))


def merge_stats(stats: list[dict], samples: int) -> dict:
    """One step's reward statistics from its scoring calls: means weighted by traces, counts summed."""
    if not stats:
        return {}
    weights = [s["traces"] for s in stats]
    merged = {k: sum(s[k] * w for s, w in zip(stats, weights)) / max(1, sum(weights)) for k in stats[0] if isinstance(stats[0][k], float)}
    merged |= {k: sum(s.get(k, 0) for s in stats) for k in stats[0] if k.startswith("count_")}
    merged["generated_tokens"] = sum(s["generated_tokens"] for s in stats)
    merged["samples"] = [t for s in stats for t in s["samples"]][:samples]
    return merged
