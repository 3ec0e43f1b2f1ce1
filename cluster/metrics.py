"""Step metrics as Ray gauges, so they reach each node's Prometheus endpoint and the Ray dashboard.

Every gauge is tagged with the run id; names start with `scratchpad_` (Ray 2.60's Prometheus endpoint shows
them as `ray_scratchpad_*`). Ray exports them about every 10 s, and only while the driver lives. Only numeric fields of a step record are exported.
"""
from __future__ import annotations

import re

EXPORTED = (
    "reward", "accuracy", "format", "truncated", "thought_rate", "completion_tokens", "tokens_per_s", "step_seconds",
    "loss", "kl", "clip_frac", "ratio_mean", "logprob_gap", "grad_norm", "policy_lag_mean", "policy_version",
    "eval_accuracy", "learner_seconds", "groups_trained", "groups_dropped", "entropy", "value_loss", "margin", "nll",
    "policy_lag_max", "tis_weight", "tis_truncated",
)
BUFFER = ("produced", "trained", "dropped", "in_flight", "stream_length", "dead_letters")


class RayMetrics:
    def __init__(self, run_id: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run_id}
        self.gauges = {
            name: Gauge(f"scratchpad_{name}", description=f"scratchpad step metric {name}", tag_keys=("run",))
            for name in EXPORTED
        }
        self.phase = Gauge("scratchpad_phase_seconds", description="seconds per step by phase", tag_keys=("run", "phase"))
        self.statuses = Gauge("scratchpad_reward_traces", description="traces per step by reward status, overall (component 'all') and per component",
                              tag_keys=("run", "component", "status"))
        self.component = Gauge("scratchpad_reward_component", description="mean of each reward component over a step's traces",
                               tag_keys=("run", "component"))
        self.status = Gauge("scratchpad_reward_status", description="share of a step's traces whose check ended in timeout, "
                            "error or unparsable", tag_keys=("run", "status"))
        self.buffer = Gauge("scratchpad_buffer_groups", description="buffer counters: produced, trained, dropped, in_flight "
                            "(the learner's lag), stream_length (depth), dead_letters", tag_keys=("run", "counter"))
        self.dropped = Gauge("scratchpad_dropped_groups", description="groups dropped so far, by reason", tag_keys=("run", "reason"))

    def record(self, row: dict, counters: dict | None = None) -> None:
        for name, gauge in self.gauges.items():
            if isinstance(row.get(name), (int, float)):
                gauge.set(float(row[name]), tags=self.tags)
        for key, value in row.items():
            phase = re.fullmatch(r"time_(\w+)", key)
            status = re.fullmatch(r"status_(\w+)", key)
            count = re.fullmatch(r"count_(?:(\w+)_)?(ok|timeout|error|unparsable)", key)
            component = re.fullmatch(r"component_(\w+)", key)
            if phase:
                self.phase.set(float(value), tags={**self.tags, "phase": phase.group(1)})
            elif status:
                self.status.set(float(value), tags={**self.tags, "status": status.group(1)})
            elif count:
                self.statuses.set(float(value), tags={**self.tags, "component": count.group(1) or "all", "status": count.group(2)})
            elif component and isinstance(value, (int, float)):
                self.component.set(float(value), tags={**self.tags, "component": component.group(1)})
        for key in BUFFER:
            if counters and key in counters:
                self.buffer.set(float(counters[key]), tags={**self.tags, "counter": key})
        for reason, count in ((counters or {}).get("dropped_by_reason") or {}).items():
            self.dropped.set(float(count), tags={**self.tags, "reason": reason})
