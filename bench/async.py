"""Asynchronous against synchronous mode on the quickstart: steps per second and held-out accuracy at equal steps.

    python bench/async.py [--steps 200] [--out runs/bench-async] [--set key=value ...]

Both runs go through the CLI one after the other, from the same cached warm-started model, prompts, held-out set,
reward and batch. The synchronous side gets its best placement: both cores for every phase (threads_per_actor 2,
nothing pinned). The asynchronous side samples one batch ahead (learner.max_staleness 1, TIS cap 2) with the
rollout engine on core 0 and the learner on core 1 (run.cores). Steps per second count from the start of the first
step to the end of the last (model build and cluster start-up excluded). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "sync": ["learner.max_staleness=0", "run.threads_per_actor=2"],
    "async": ["learner.max_staleness=1", "learner.tis_cap=2.0", "run.cores={rollout: [0], learner: [1]}", "run.threads_per_actor=1"],
}


def span(metrics: list[dict]) -> float:
    """Seconds from the start of the first step to the end of the last."""
    return metrics[-1]["wall"] - (metrics[0]["wall"] - metrics[0]["step_seconds"])


def run(mode: str, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{mode}-{time.strftime('%H%M%S')}"
    cmd = ["scratchpad", "train", str(ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(run_dir), f"run.steps={steps}",
           *MODES[mode], *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {e["step"]: e for e in map(json.loads, (run_dir / "evals.jsonl").read_text().splitlines())}
    phases = {k: sorted(r.get(k, 0.0) for r in metrics)[len(metrics) // 2] for k in ("time_fill", "time_train", "time_sync")}
    return {"mode": mode, "run_dir": str(run_dir), "steps": len(metrics), "span_s": round(span(metrics), 1),
            "steps_per_s": len(metrics) / span(metrics), "median_step_s": sorted(r["step_seconds"] for r in metrics)[len(metrics) // 2],
            "median_phase_s": phases, "lag_mean": sum(r["policy_lag_mean"] for r in metrics) / len(metrics),
            "dropped": sum(r["groups_dropped"] for r in metrics),
            "accuracy_by_step": {s: e["accuracy"] for s, e in sorted(evals.items())}, "eval_prompts": evals[0]["prompts"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/bench-async")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs (repeatable)")
    args = parser.parse_args()
    out = Path(args.out)
    subprocess.run(["scratchpad", "make-model", str(ROOT / "configs" / "quickstart.yaml")], check=True, capture_output=True)
    sides = {mode: run(mode, args.steps, out, args.set) for mode in MODES}
    for side in sides.values():
        print(f"{side['mode']}: {side['steps']} steps in {side['span_s']} s ({side['steps_per_s']:.3f} steps/s, median step "
              f"{side['median_step_s']:.2f} s, phases {side['median_phase_s']}), lag {side['lag_mean']:.2f}, dropped {side['dropped']}, "
              f"held-out accuracy {side['accuracy_by_step']}", flush=True)
    common = sorted(set(sides["sync"]["accuracy_by_step"]) & set(sides["async"]["accuracy_by_step"]))
    diffs = {s: sides["async"]["accuracy_by_step"][s] - sides["sync"]["accuracy_by_step"][s] for s in common}
    print(json.dumps({
        "async_vs_sync_steps_ratio": round(sides["async"]["steps_per_s"] / sides["sync"]["steps_per_s"], 3),
        "accuracy_diff_at_equal_steps": diffs, "final_accuracy": {m: s["accuracy_by_step"][max(s["accuracy_by_step"])] for m, s in sides.items()},
        "eval_prompts": sides["sync"]["eval_prompts"], "steps": args.steps, "sides": sides,
        "machine": f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
    }))


if __name__ == "__main__":
    main()
