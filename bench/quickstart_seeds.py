"""The quickstart's claim: the whole pipeline (warm start included) over several seeds, each from an empty model cache.

    python bench/quickstart_seeds.py [--seeds 0 1 2] [--out runs/bench-quickstart] [--set key=value ...]

Each seed runs the README's train command, `scratchpad train configs/quickstart.yaml --run-dir DIR`, with
`model.tiny.seed`, `rollout.seed` and `learner.seed` set to the seed (the warm start's weights and data, the sampler,
the learner's RNG) and a fresh empty SCRATCHPAD_CACHE, so the model build is inside the time. The prompts and the
held-out set (task.seed) are the same for every seed, so the accuracies compare. Reports, per seed, held-out greedy
accuracy before and after (200 prompts), its 95% Wilson interval, the wall time with the build, and the share of greedy answers with a thought;
then the mean gain and its range. Run it from a fresh clone after the README's install. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 3), round(centre + half, 3))


def one_seed(seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"seed-{seed}"
    cache = tempfile.mkdtemp(prefix=f"qs-cache-{seed}-")
    cmd = ["scratchpad", "train", str(ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(run_dir),
           f"model.tiny.seed={seed}", f"rollout.seed={seed}", f"learner.seed={seed}", *extra]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SCRATCHPAD_CACHE": cache})
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    first, last = evals[0], evals[-1]
    n = first["prompts"]
    return {"seed": seed, "run_dir": str(run_dir), "wall_s_with_build": round(wall, 1), "prompts": n,
            "before": first["accuracy"], "after": last["accuracy"], "gain": round(last["accuracy"] - first["accuracy"], 3),
            "before_ci95": wilson(first["accuracy"] * n, n), "after_ci95": wilson(last["accuracy"] * n, n),
            "thought_rate": {"before": first.get("thought_rate"), "after": last.get("thought_rate")},
            "accuracy_by_step": {e["step"]: e["accuracy"] for e in evals}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-quickstart")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every seed (repeatable)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        row = one_seed(seed, out, args.set)
        rows.append(row)
        print(f"seed {seed}: {row['before']:.3f} -> {row['after']:.3f} ({row['gain']:+.3f}) in {row['wall_s_with_build']:.0f} s "
              f"with the build; by step {row['accuracy_by_step']}; thought rate {row['thought_rate']}", flush=True)
    gains = [r["gain"] for r in rows]
    print(json.dumps({"quickstart_mean_gain": round(sum(gains) / len(gains), 3), "gain_min": min(gains), "gain_max": max(gains),
                      "n_seeds": len(rows), "wall_s_max": max(r["wall_s_with_build"] for r in rows), "overrides": args.set,
                      "seeds": rows, "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
