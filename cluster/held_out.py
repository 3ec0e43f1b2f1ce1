"""Greedy held-out evaluation during training, on its own actor, so the learner never waits for it.

`start(step, published)` queues the weights of step k and a greedy pass over the held-out prompts on the evaluation
actor (an extra rollout worker; with run.eval_actor false, rollout actor 0, and then the loop waits). A reward actor
of its own scores the result as soon as it exists (so evaluation never takes a training chunk's place in a queue); `collect` writes whatever has finished into evals.jsonl, TensorBoard and the
report, while training goes on.
"""
from __future__ import annotations

import time
from collections import defaultdict

import ray

from scratchpad.cluster.pipeline import ACTOR_DIED
from scratchpad.rewards.scoring import is_correct


def summarise(groups: list, accuracy_key: str | None) -> dict:
    """Greedy accuracy on held-out prompts, overall and by task length."""
    by_len: dict[str, list[float]] = defaultdict(list)
    correct = []
    for g in groups:
        t = g.traces[0]
        correct.append(is_correct(t, accuracy_key))
        by_len[str(t.meta.get("length", "all"))].append(correct[-1])
    n = max(1, len(groups))
    return {
        "prompts": len(groups),
        "accuracy": sum(correct) / n,
        "by_length": {k: sum(v) / len(v) for k, v in sorted(by_len.items(), key=lambda kv: (len(kv[0]), kv[0]))},
        "truncated": sum(g.traces[0].finish_reason == "length" for g in groups) / n,
        "thought_rate": sum(g.traces[0].thought is not None for g in groups) / n,
    }


class Evaluations:
    def __init__(self, cluster, held_out: list, runlog, report, started: float):
        self.cluster, self.held_out, self.runlog, self.report, self.started = cluster, held_out, runlog, report, started
        self.engine = cluster.evaluator if cluster.evaluator is not None else cluster.rollouts[0]
        self.pending: list[tuple] = []  # (step, scoring call, wall time it started, the weights it scores)
        self.latest: dict | None = None  # the newest finished evaluation, for the next step record

    def start(self, step: int, published=None) -> None:
        """Evaluate the weights of `step` (already held by the engine when `published` is None)."""
        if published is not None:
            self.engine.update_weights.remote(published)
        generated = self.engine.generate.remote(self.held_out, True)
        self.pending.append((step, self.cluster.eval_rewarder.score.remote(generated), time.time() - self.started, published))
        if self.cluster.evaluator is None:
            self.wait_all()

    def collect(self, timeout: float = 0.0) -> None:
        """Record every evaluation that has finished (waiting up to `timeout` for the oldest)."""
        while self.pending:
            step, call, began, published = self.pending[0]
            done, _ = ray.wait([call], timeout=timeout)
            if not done:
                return
            self.pending.pop(0)
            try:
                groups = ray.get(call, timeout=self.cluster.cfg.run.stall_timeout_s)  # finished: ray.wait said so
            except ACTOR_DIED:  # the evaluation's engine or scorer died; Ray restarts it and the evaluation runs again
                self.report.log(f"evaluation of step {step}: its actor died; evaluating again")
                self.start(step, published)
                continue
            result = summarise(groups, self.cluster.cfg.reward.accuracy_component())
            row = {"step": step, "wall": time.time() - self.started, "eval_started_wall": began, **result}
            self.runlog.write("evals", row)
            self.report.evaluation(step, result)
            self.report.log(f"held-out accuracy at step {step}: {result['accuracy']:.3f} ({result['prompts']} prompts)")
            self.latest = {"eval_accuracy": result["accuracy"], "eval_step": step}

    def wait_all(self) -> None:
        self.collect(timeout=self.cluster.cfg.run.stall_timeout_s)
        if self.pending:
            raise TimeoutError(f"evaluation of step {self.pending[0][0]} made no progress for {self.cluster.cfg.run.stall_timeout_s:g} s")

    def take_latest(self) -> dict:
        latest, self.latest = self.latest or {}, None
        return latest
