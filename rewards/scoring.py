"""The scorer a reward actor hosts: a weighted sum of named components, one result per trace.

Only the parsed answer is checked; the thought is never graded (the likelihood
component conditions on it, to reward thoughts that make the reference likelier).
Every component returns, per trace, a value and a status ("ok", "timeout",
"error", "unparsable"); a trace's status is the worst of its components', its
reward the weighted sum of their values (a failed component counts 0). Answer
checks run in killable worker processes (rewards/sandbox.py); model components
(likelihood, reward model, the judge's engine) call a model that usually lives in its own Ray actor.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

from scratchpad.common.config import CHECKER_KINDS, MODEL_KINDS, RewardConfig
from scratchpad.common.records import Group, Trace
from scratchpad.rewards import checkers
from scratchpad.rewards.sandbox import CheckerPool, Outcome

STATUSES = ("ok", "unparsable", "timeout", "error")  # in rising severity: a trace takes its worst component's


class Result(NamedTuple):
    """One trace's score."""

    reward: float  # sum of weight * value over components
    components: dict[str, float]  # component name -> value before weighting (0 when its status is not ok)
    status: str  # the worst component status
    error: str | None  # "name: message" for every component that was not ok
    statuses: dict[str, str]  # component name -> its status


def overlong_penalty(tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft overlong penalty: 0 up to max - cache, linear to -1 at max, -1 beyond."""
    start = max_tokens - cache_tokens
    if tokens <= start:
        return 0.0
    return max(-1.0, (start - tokens) / cache_tokens)


def centre_by_group(values: list[float], group_ids: list[str], ok: list[bool]) -> list[float]:
    """Each value minus the mean of the ok values in its group (Quiet-STaR's baseline)."""
    sums: dict[str, list[float]] = {}
    for v, g, good in zip(values, group_ids, ok):
        if good:
            sums.setdefault(g, []).append(v)
    return [v - sum(sums[g]) / len(sums[g]) if good else 0.0 for v, g, good in zip(values, group_ids, ok)]


def _call(model: Any, items: list[dict], timeout: float) -> list[float]:
    """A model scorer in this process, or one in its own Ray actor (a handle), waited for at most `timeout` seconds."""
    if hasattr(model.score, "remote"):
        import ray

        return ray.get(model.score.remote(items), timeout=timeout)
    return model.score(items)


class Scorer:
    """Scores a batch of traces with the configured components: `score_traces(traces)` -> one Result per trace."""

    def __init__(self, cfg: RewardConfig, max_new_tokens: int = 96, models: dict[str, Any] | None = None,
                 policy_path: str | None = None, buffer_address=None):
        self.cfg, self.max_new_tokens = cfg, max_new_tokens
        self.components = cfg.resolved_components()
        self.models = dict(models or {})
        self.judges = {}
        for c in self.components:
            if c.kind == "judge":
                if c.name not in self.models:
                    raise ValueError(f"reward component {c.name}: a judge needs its engine (cluster/run.py starts one)")
                from scratchpad.rewards.judge import Judge

                # One per scorer: its local verdict cache lives on; with the run's Redis, a shared tier behind it.
                shared = Judge.shared_cache(buffer_address, c) if buffer_address is not None else None
                self.judges[c.name] = Judge(c, self.models[c.name], shared)
            elif c.kind in MODEL_KINDS and c.name not in self.models:
                from scratchpad.rewards.models import load_model_scorer

                self.models[c.name] = load_model_scorer(c, policy_path)
        kinds = {c.kind for c in self.components}
        # Workers import the checkers (and math-verify) before they say ready, so no check's deadline pays for it.
        warm = sorted({checkers.CHECKERS[k].__module__ for k in kinds if k in CHECKER_KINDS}) + (["math_verify"] if "math" in kinds else [])
        self.pool = CheckerPool.for_config(cfg, warm).wait_ready() if kinds & set(CHECKER_KINDS) else None

    def _checker(self, c, traces: list[Trace]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(traces)
        jobs, where = [], []
        fn, options = checkers.CHECKERS[c.kind], checkers.options_of(c)
        for i, t in enumerate(traces):
            if t.answer is None:
                outcomes[i] = Outcome("unparsable", 0.0, checkers.NO_ANSWER)
            elif self.cfg.require_stop and not t.closed:
                outcomes[i] = Outcome("ok", 0.0, None)  # answered but kept writing: not rewarded, or the policy drifts to never stopping
            else:
                jobs.append((fn, (t.answer, t.reference), options))
                where.append(i)
        for i, o in zip(where, self.pool.run(jobs)):
            outcomes[i] = Outcome(o.status, 1.0 if o.status == "ok" and o.value else 0.0, o.error)
        return outcomes  # type: ignore[return-value]

    def _model(self, c, traces: list[Trace]) -> list[Outcome]:
        if c.kind == "likelihood":
            items = [{"prompt": t.prompt, "thought": t.thought or "", "reference": t.reference} for t in traces]
            wanted = list(range(len(traces)))
        else:  # reward_model: reads the question (not the templated prompt) and the answer, never the thought
            wanted = [i for i, t in enumerate(traces) if t.answer is not None]
            items = [{"prompt": traces[i].question or traces[i].prompt, "answer": traces[i].answer} for i in wanted]
        outcomes = [Outcome("unparsable", 0.0, checkers.NO_ANSWER)] * len(traces)
        try:
            values = _call(self.models[c.name], items, c.timeout_s) if items else []
        except Exception as exc:  # the model's actor failed: every trace it should have scored says so
            return [Outcome("error", 0.0, f"{type(exc).__name__}: {exc}"[:500])] * len(traces)
        for i, v in zip(wanted, values):
            outcomes[i] = Outcome("ok", float(v), None)
        if c.kind == "likelihood" and c.centre:
            ok = [o.status == "ok" for o in outcomes]
            centred = centre_by_group([o.value for o in outcomes], [t.group_id for t in traces], ok)
            outcomes = [Outcome(o.status, v, o.error) for o, v in zip(outcomes, centred)]
        return outcomes

    def _component(self, c, traces: list[Trace]) -> list[Outcome]:
        if c.kind in CHECKER_KINDS:
            return self._checker(c, traces)
        if c.kind == "judge":
            try:
                return self.judges[c.name].score(traces)
            except Exception as exc:  # the judge's engine actor failed: every trace it should have judged says so
                return [Outcome("error", 0.0, f"{type(exc).__name__}: {exc}"[:500])] * len(traces)
        if c.kind in MODEL_KINDS:
            return self._model(c, traces)
        if c.kind == "format":
            return [Outcome("ok", float(t.answer is not None and t.closed and (t.thought is not None or not c.require_thought)), None)
                    for t in traces]
        if c.kind == "overlong":
            limit = c.max_tokens or self.max_new_tokens
            return [Outcome("ok", overlong_penalty(t.num_tokens, limit, c.cache_tokens), None) for t in traces]
        raise ValueError(f"unknown component kind {c.kind!r}")

    def score_traces(self, traces: list[Trace]) -> list[Result]:
        """The scorer interface: a batch of traces in, one Result per trace out (traces are not modified)."""
        per_component = {c.name: self._component(c, traces) for c in self.components}
        results = []
        for i in range(len(traces)):
            outs = {name: outcomes[i] for name, outcomes in per_component.items()}
            values = {name: (o.value if o.status == "ok" else 0.0) for name, o in outs.items()}
            status = max((o.status for o in outs.values()), key=STATUSES.index, default="ok")
            errors = [f"{name}: {o.error}" for name, o in outs.items() if o.status != "ok" and o.error]
            results.append(Result(
                reward=sum(c.weight * values[c.name] for c in self.components),
                components=values, status=status, error="; ".join(errors)[:1000] or None,
                statuses={name: o.status for name, o in outs.items()},
            ))
        return results

    def score(self, groups: list[Group]) -> list[Result]:
        """Score every trace of `groups` in one batch and write reward, components, status and error into them."""
        traces = [t for g in groups for t in g.traces]
        results = self.score_traces(traces)
        for t, r in zip(traces, results):
            t.reward, t.components, t.status, t.error = r.reward, r.components, r.status, r.error
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class RewardWorker:
    """What a reward actor hosts: score groups, then either push them to the buffer or return them."""

    def __init__(self, cfg: RewardConfig, buffer_address=None, max_new_tokens: int = 96, models: dict | None = None,
                 policy_path: str | None = None):
        from scratchpad.common.buffer import RedisBuffer

        self.scorer = Scorer(cfg, max_new_tokens, models, policy_path, buffer_address)
        self.accuracy_key = cfg.accuracy_component()
        self.buffer = RedisBuffer(buffer_address) if buffer_address is not None else None

    def score_and_push(self, groups: list[Group], samples: int = 0) -> dict:
        """Score, XADD every group; return reward stats and `samples` traces for the driver's logs."""
        started = time.time()
        results = self.scorer.score(groups)
        self.buffer.put(groups)
        traces = [t for g in groups for t in g.traces]
        return summarise(groups, results, self.accuracy_key) | {
            "reward_seconds": time.time() - started,
            "traces": len(traces),
            "generated_tokens": sum(t.num_tokens for t in traces),
            "samples": [_readable(t) for t in traces[:: max(1, len(traces) // samples)][:samples]] if samples else [],
        }

    def score(self, groups: list[Group]) -> list[Group]:
        """Score without pushing (evaluation)."""
        self.scorer.score(groups)
        return groups


def _readable(t: Trace) -> dict:
    return {"trace_id": t.trace_id, "prompt": t.prompt, "question": t.question, "thought": t.thought, "answer": t.answer,
            "reference": t.reference, "reward": t.reward, "components": t.components, "status": t.status,
            "error": t.error, "finish_reason": t.finish_reason, "policy_version": t.policy_version, "completion": t.completion}


def is_correct(trace: Trace, accuracy_key: str | None) -> float:
    """The answer checker's verdict, or a normalised exact match when no checker is configured (likelihood-only runs)."""
    if accuracy_key is not None:
        return trace.components.get(accuracy_key, 0.0)
    return float(trace.answer is not None and trace.closed and checkers.exact(trace.answer, trace.reference))


def summarise(groups: list[Group], results: list[Result], accuracy_key: str | None) -> dict:
    """Step stats: means as floats (averaged across calls), `count_*` as ints (summed across calls).

    count_<status> counts traces by their overall status; count_<component>_<status> by each component's."""
    traces = [t for g in groups for t in g.traces]
    n = max(1, len(traces))
    stats: dict = {
        "reward": sum(r.reward for r in results) / n,
        "accuracy": sum(is_correct(t, accuracy_key) for t in traces) / n,
        "format": sum(t.answer is not None and t.closed for t in traces) / n,
        "truncated": sum(t.finish_reason == "length" for t in traces) / n,
        "thought_rate": sum(t.thought is not None for t in traces) / n,
        "completion_tokens": sum(t.num_tokens for t in traces) / n,
    }
    names = list(results[0].components) if results else []
    for name in names:
        stats[f"component_{name}"] = sum(r.components[name] for r in results) / n
    for status in STATUSES:
        stats[f"status_{status}"] = sum(r.status == status for r in results) / n
        stats[f"count_{status}"] = sum(r.status == status for r in results)
        for name in names:
            stats[f"count_{name}_{status}"] = sum(r.statuses[name] == status for r in results)
    return stats
