"""Answer checking and the reward actor's scorer.

Only the parsed answer is checked; the thought is never read. Each trace gets a
reward, its named components and a status ("ok", "timeout", "error",
"unparsable"). A checker that raises or overruns marks its trace and the run
goes on. Checks run in a worker thread with a deadline; one that overruns is
abandoned (its thread cannot be killed; issue 4 moves checks to a killable
worker process).
"""
from __future__ import annotations

import concurrent.futures as futures
import time

from scratchpad.cluster.config import RewardConfig
from scratchpad.cluster.records import Group, Trace


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match(answer: str, reference: str) -> bool:
    """Normalised exact match (case, surrounding and repeated whitespace ignored)."""
    return normalise(answer) == normalise(reference)


CHECKERS = {"exact": exact_match}


class Scorer:
    """Scores whole groups: correctness of the answer plus an optional format term."""

    def __init__(self, cfg: RewardConfig, checker: str = "exact"):
        self.cfg = cfg
        self.check = CHECKERS[checker]
        self.pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="checker")

    def score_trace(self, trace: Trace) -> Trace:
        formatted = trace.answer is not None and trace.closed
        components = {"format": 1.0 if formatted else 0.0, "correct": 0.0}
        if trace.answer is None:
            trace.status = "unparsable"
        elif self.cfg.require_stop and not trace.closed:
            trace.status = "ok"  # answered but kept writing: not rewarded, or the policy drifts to never stopping
        else:
            job = self.pool.submit(self.check, trace.answer, trace.reference)
            try:
                components["correct"] = 1.0 if job.result(timeout=self.cfg.timeout_s) else 0.0
                trace.status = "ok"
            except futures.TimeoutError:
                trace.status, trace.error = "timeout", f"checker exceeded {self.cfg.timeout_s}s"
            except Exception as exc:  # a broken checker marks its trace; the run goes on
                trace.status, trace.error = "error", f"{type(exc).__name__}: {exc}"[:500]
        trace.components = components
        trace.reward = self.cfg.correct_weight * components["correct"] + self.cfg.format_weight * components["format"]
        return trace

    def score(self, groups: list[Group]) -> list[Group]:
        for group in groups:
            for trace in group.traces:
                self.score_trace(trace)
        return groups


class RewardWorker:
    """What a reward actor hosts: score groups, then either push them to the buffer or return them."""

    def __init__(self, cfg: RewardConfig, buffer_address=None):
        from scratchpad.cluster.buffer import RedisBuffer

        self.scorer = Scorer(cfg)
        self.buffer = RedisBuffer(buffer_address) if buffer_address is not None else None

    def score_and_push(self, groups: list[Group], samples: int = 0) -> dict:
        """Score, XADD every group; return reward stats and `samples` traces for the driver's logs."""
        started = time.time()
        self.scorer.score(groups)
        self.buffer.put(groups)
        traces = [t for g in groups for t in g.traces]
        return summarise(groups) | {
            "reward_seconds": time.time() - started,
            "traces": len(traces),
            "generated_tokens": sum(t.num_tokens for t in traces),
            "samples": [_readable(t) for t in traces[:: max(1, len(traces) // samples)][:samples]] if samples else [],
        }

    def score(self, groups: list[Group]) -> list[Group]:
        """Score without pushing (evaluation)."""
        return self.scorer.score(groups)


def _readable(t: Trace) -> dict:
    return {"trace_id": t.trace_id, "prompt": t.prompt, "thought": t.thought, "answer": t.answer,
            "reference": t.reference, "reward": t.reward, "status": t.status, "finish_reason": t.finish_reason,
            "policy_version": t.policy_version, "completion": t.completion}


def summarise(groups: list[Group]) -> dict[str, float]:
    traces = [t for g in groups for t in g.traces]
    n = max(1, len(traces))
    stats = {
        "reward": sum(t.reward or 0.0 for t in traces) / n,
        "accuracy": sum(t.components.get("correct", 0.0) for t in traces) / n,
        "format": sum(t.components.get("format", 0.0) for t in traces) / n,
        "truncated": sum(t.finish_reason == "length" for t in traces) / n,
        "thought_rate": sum(t.thought is not None for t in traces) / n,
        "completion_tokens": sum(t.num_tokens for t in traces) / n,
    }
    for status in ("timeout", "error", "unparsable"):
        stats[f"status_{status}"] = sum(t.status == status for t in traces) / n
    return stats
