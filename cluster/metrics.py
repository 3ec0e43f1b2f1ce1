"""Step metrics as Ray gauges, so they reach each node's Prometheus endpoint and the Ray dashboard.

Every gauge is tagged with the run id; names start with `scratchpad_`. Ray exports
them about every 10 s. Only numeric fields of a step record are exported.
"""
from __future__ import annotations

import re

EXPORTED = (
    "reward", "accuracy", "format", "truncated", "thought_rate", "completion_tokens", "tokens_per_s", "step_seconds",
    "loss", "kl", "clip_frac", "logprob_gap", "grad_norm", "policy_lag_mean", "policy_version", "eval_accuracy",
)


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
        self.buffer = Gauge("scratchpad_buffer_groups", description="buffer counters: produced, trained, dropped, in_flight",
                            tag_keys=("run", "counter"))

    def record(self, row: dict, counters: dict | None = None) -> None:
        for name, gauge in self.gauges.items():
            if isinstance(row.get(name), (int, float)):
                gauge.set(float(row[name]), tags=self.tags)
        for key, value in row.items():
            match = re.fullmatch(r"time_(\w+)", key)
            if match:
                self.phase.set(float(value), tags={**self.tags, "phase": match.group(1)})
            match = re.fullmatch(r"count_(?:(\w+)_)?(ok|timeout|error|unparsable)", key)
            if match:
                self.statuses.set(float(value), tags={**self.tags, "component": match.group(1) or "all", "status": match.group(2)})
        for key in ("produced", "trained", "dropped", "in_flight"):
            if counters and key in counters:
                self.buffer.set(float(counters[key]), tags={**self.tags, "counter": key})
