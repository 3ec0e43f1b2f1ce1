"""Every algorithm config on the quickstart task, one after another: held-out accuracy before/after and wall time.

    python bench/algorithms.py --steps 100 --out /tmp/algos [--set key=value ...] [configs/ppo.yaml ...]

Each config runs through the CLI (`scratchpad train CONFIG --run-dir OUT/NAME run.steps=STEPS`), sharing the
tiny-model cache, so the model is built once. Prints a markdown table row per config, then a JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["quickstart", "dr_grpo", "rloo", "reinforce_pp", "dapo", "ppo", "online_dpo", "star", "tpo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config paths (default: every algorithm config)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/bench-algorithms")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every config (repeatable)")
    args = parser.parse_args()
    configs = args.configs or [str(ROOT / "configs" / f"{name}.yaml") for name in DEFAULT]
    extra = args.set
    rows = []
    print("| config | algorithm | accuracy before | accuracy after | gain | steps | groups trained / dropped | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for config in configs:
        name = Path(config).stem
        run_dir = Path(args.out) / f"{name}-{time.strftime('%H%M%S')}"
        cmd = ["scratchpad", "train", config, "--run-dir", str(run_dir), f"run.steps={args.steps}", "run.eval_every=0", *extra]
        started = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {name} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        algorithm = summary["algorithm"]
        row = {"config": name, "algorithm": algorithm, "before": summary["accuracy_before"], "after": summary["accuracy_after"],
               "steps": summary["steps"], "trained": summary["groups_trained"], "dropped": summary["groups_dropped"],
               "wall_s": round(time.time() - started, 1), "run_dir": str(run_dir)}
        rows.append(row)
        print(f"| {name} | {algorithm} | {row['before']:.3f} | {row['after']:.3f} | {row['after'] - row['before']:+.3f} | "
              f"{row['steps']} | {row['trained']} / {row['dropped']} | {row['wall_s'] / 60:.1f} min |", flush=True)
    print(json.dumps({"steps": args.steps, "rows": rows}))
    sys.exit(0 if len(rows) == len(configs) else 1)


if __name__ == "__main__":
    main()
