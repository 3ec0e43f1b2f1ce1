"""End-of-run outputs: summary.json and a PNG of reward and held-out accuracy against step."""
from __future__ import annotations

import json
from pathlib import Path

from scratchpad.cluster.config import ExperimentConfig


def plot(run_dir: Path, history: list[dict], evals: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    left.plot(steps, [r.get("reward", float("nan")) for r in history], label="train reward", color="tab:blue", alpha=0.6)
    left.plot(steps, [r.get("accuracy", float("nan")) for r in history], label="train accuracy (sampled)", color="tab:orange", alpha=0.6)
    left.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="held-out accuracy (greedy)", color="tab:green")
    left.set_xlabel("learner step")
    left.set_ylim(-0.02, 1.02)
    left.legend(loc="lower right")
    left.set_title("reward and accuracy")
    for e in (evals[0], evals[-1]):
        lengths = list(e["by_length"])
        right.plot(lengths, [e["by_length"][k] for k in lengths], "o-", label=f"step {e['step']}")
    right.set_xlabel("array length")
    right.set_ylabel("held-out accuracy")
    right.set_ylim(-0.02, 1.02)
    right.legend()
    right.set_title("accuracy by length, before and after")
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(run_dir: Path, cfg: ExperimentConfig, history: list[dict], evals: list[dict], counters: dict, wall: float) -> dict:
    summary = {
        "name": cfg.name,
        "algorithm": cfg.learner.algorithm,
        "accuracy_before": evals[0]["accuracy"],
        "accuracy_after": evals[-1]["accuracy"],
        "accuracy_gain": evals[-1]["accuracy"] - evals[0]["accuracy"],
        "accuracy_by_length_before": evals[0]["by_length"],
        "accuracy_by_length_after": evals[-1]["by_length"],
        "thought_rate_before": evals[0]["thought_rate"],
        "thought_rate_after": evals[-1]["thought_rate"],
        "eval_prompts": evals[0]["prompts"],
        "wall_seconds": round(wall, 1),
        "steps": len(history),
        "policy_version": history[-1]["policy_version"] if history else 0,
        "groups_produced": counters["produced"],
        "groups_trained": counters["trained"],
        "groups_dropped": counters["dropped"],
        "groups_dropped_by_reason": counters["dropped_by_reason"],
        "groups_in_flight": counters["in_flight"],
        "invariant_holds": counters["invariant_holds"],
        "evals": evals,
    }
    if history:
        summary["plot"] = plot(run_dir, history, evals).name
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
