"""The seeds' experiment: when does a scratchpad beat answering at once? Array access, lengths 3-10, direct against
scratchpad (cot) prompts, 0/1/3/5 worked examples in the prompt; greedy accuracy by length, and search (pass@8,
maj@8, best-of-8 by the answer checker) over 8 samples.

    python bench/seeds.py [NAME=]CHECKPOINT [...] --out runs/seeds [--config configs/quickstart.yaml]
        [--modes direct,cot] [--shots 0,1,3,5] [--samples 8] [--eval-size 200] [--set key=value ...]
    python bench/seeds.py --from runs/a/seeds.json [--from runs/b/seeds.json] --out runs/all   # tables and plots again

Each cell is one `scratchpad eval` (cluster/evaluate.py) with task.mode=MODE task.shots=SHOTS, all on one private
Ray cluster. Prompts that leave no room for rollout.max_new_tokens in the model's context are counted, not run.
Writes OUT/seeds.md (the tables), OUT/seeds.json, OUT/seeds-NAME.png and each cell's eval.json under OUT/NAME/
(--from reads those cells back, with their greedy.jsonl for the table split by whether the model thought).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from scratchpad.cluster.eval_stats import by_length

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [str(n) for n in range(3, 11)]


def cell(stat: dict | None) -> str:
    """accuracy (95% Wilson interval low-high, n)."""
    if not stat or not stat["n"]:
        return "-"
    return f"{stat['accuracy']:.2f} ({stat['low']:.2f}-{stat['high']:.2f}, {stat['n']})"


def run_cells(args, checkpoints: list[tuple[str, str]], shots: list[int], log) -> list[dict]:
    import ray

    from scratchpad.cluster.evaluate import eval_config, rerank_component, run_eval

    rows = []
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        for name, checkpoint in checkpoints:
            for mode in args.modes.split(","):
                for k in shots:
                    started = time.time()
                    overrides = ["task.name=array_access", "task.min_len=3", "task.max_len=10", f"task.mode={mode}",
                                 f"task.shots={k}", *args.set]
                    cfg, _ = eval_config(checkpoint, args.config, overrides, args.samples, args.eval_size)
                    out = Path(args.out) / name / f"{mode}-{k}shot"
                    result = run_eval(cfg, out, args.samples, [1, args.samples], rerank_component(cfg, None), log=log)
                    rows.append({**result, "name": name, "path": checkpoint, "mode": mode, "shots": k, "out": str(out)})
                    log(f"{name} {mode} {k}-shot: greedy {cell(result['metrics']['greedy']['overall'])}, "
                        f"{result['skipped']['count']} skipped, {time.time() - started:.0f}s")
    finally:
        ray.shutdown()
    return rows


def label(r: dict) -> str:
    return f"| {r['name']} | {r['mode']} | {r['shots']} | {r['max_new_tokens']} |"


def own_choice(rows: list[dict]) -> list[str]:
    """Greedy accuracy by length of the 0-shot cells, split by whether the completion wrote a <think> block: with no
    worked example the plain model's prompt is the bare question in both modes, so only the model decides to think."""
    lines = ["", "Greedy, 0 shots, split by the model's own choice (completion has a <think> block or not):", "",
             "| checkpoint | mode | shots | new tokens | completions | all | " + " | ".join(LENGTHS) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in LENGTHS) + " |"]
    for r in rows:
        if r["shots"] != 0 or r["mode"] != "cot" or not r["evaluated"]:
            continue
        greedy = [json.loads(line) for line in (Path(r["out"]) / "greedy.jsonl").read_text().splitlines()]
        for thinks, what in ((True, "with a scratchpad"), (False, "answer at once")):
            part = [g for g in greedy if (g["thought"] is not None) == thinks]
            stats = by_length([g["correct"] for g in part], [g["meta"]["length"] for g in part])
            lines.append(f"{label(r)} {what} | {cell(stats['overall'])} | " + " | ".join(cell(stats["by_length"].get(n)) for n in LENGTHS) + " |")
    return lines


def tables(rows: list[dict], samples: int) -> str:
    """Markdown: overall (greedy and search) by checkpoint x mode x shots x budget, greedy and pass@N by length, and the
    0-shot greedy split by whether the model thought."""
    k = samples
    lines = [f"Cells: accuracy (95% Wilson interval, n prompts). Search is over {k} samples at the config's temperature; "
             f"best-of-{k} is reranked by the answer checker. new tokens: rollout.max_new_tokens.", "",
             f"| checkpoint | mode | shots | new tokens | evaluated / skipped (too long) | greedy | pass@1 | pass@{k} | maj@{k} | best-of-{k} | greedy think rate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r["metrics"]
        get = lambda name: cell(m[name]["overall"]) if name in m else "-"  # noqa: E731
        think = r["diagnostics"]["greedy_thought_rate"]
        lines.append(f"{label(r)} {r['evaluated']} / {r['skipped']['count']} | {get('greedy')} | {get('pass@1')} | "
                     f"{get(f'pass@{k}')} | {get(f'maj@{k}')} | {get(f'best@{k}')} | {'-' if think is None else f'{think:.2f}'} |")
    for metric, title in (("greedy", "Greedy accuracy by array length"), (f"pass@{k}", f"pass@{k} by array length")):
        lines += ["", f"{title}:", "", "| checkpoint | mode | shots | new tokens | " + " | ".join(LENGTHS) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in LENGTHS) + " |"]
        for r in rows:
            if r["evaluated"]:
                by = r["metrics"][metric]["by_length"]
                lines.append(f"{label(r)} " + " | ".join(cell(by.get(n)) for n in LENGTHS) + " |")
    return "\n".join(lines + own_choice(rows)) + "\n"


def legend(r: dict) -> str:
    prompt = "0 shots (either mode)" if r["shots"] == 0 else f"{r['mode']}, {r['shots']} shots"
    return f"{prompt}, {r['max_new_tokens']} new tokens"


def plot(rows: list[dict], name: str, samples: int, path: Path) -> None:
    """Greedy (left) and pass@N (right) accuracy by length, one line per mode x shots x budget, 95% interval bars.
    0-shot cot is left out: its prompt is 0-shot direct's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    mine = [r for r in rows if r["name"] == name and r["evaluated"] and not (r["shots"] == 0 and r["mode"] == "cot")]
    for ax, metric in zip(axes, ("greedy", f"pass@{samples}")):
        for j, r in enumerate(mine):
            by = r["metrics"][metric]["by_length"]
            pts = [(i + (j - (len(mine) - 1) / 2) * 0.06, by[n]) for i, n in enumerate(LENGTHS) if n in by]
            ys = [st["accuracy"] for _, st in pts]
            err = [[y - st["low"] for y, (_, st) in zip(ys, pts)], [st["high"] - y for y, (_, st) in zip(ys, pts)]]
            ax.errorbar([x for x, _ in pts], ys, yerr=err, fmt="o-" if r["mode"] == "cot" else "s--", capsize=2,
                        label=legend(r))
        ax.set_xticks(range(len(LENGTHS)), LENGTHS)
        ax.set_xlabel("array length")
        ax.set_title(f"{name}: {metric}")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("held-out accuracy (95% Wilson interval)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="[NAME=]PATH: a run directory, RUN_DIR/final or any HF checkpoint")
    parser.add_argument("--from", dest="sources", action="append", default=[], metavar="SEEDS_JSON",
                        help="also tabulate the cells of an earlier run's seeds.json (repeatable; no checkpoint: tables only)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"), help="YAML experiment every cell starts from")
    parser.add_argument("--modes", default="direct,cot")
    parser.add_argument("--shots", default="0,1,3,5")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every cell (repeatable)")
    args = parser.parse_args()
    if not args.checkpoints and not args.sources:
        parser.error("give a CHECKPOINT or --from SEEDS_JSON")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` unwinds too: the private Ray cluster is stopped
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    checkpoints = [tuple(c.split("=", 1)) if "=" in c else (Path(c).name, c) for c in args.checkpoints]
    rows = [row for source in args.sources for row in json.loads(Path(source).read_text())["rows"]]
    if checkpoints:
        rows += run_cells(args, checkpoints, [int(s) for s in args.shots.split(",")], log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text(tables(rows, args.samples))
    (out / "seeds.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1) + "\n")
    for name in dict.fromkeys(r["name"] for r in rows):
        plot(rows, name, args.samples, out / f"seeds-{name}.png")
    print((out / "seeds.md").read_text())


if __name__ == "__main__":
    main()
