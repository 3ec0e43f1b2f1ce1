"""End-of-run outputs: summary.json, curves.png, and report.html (plots against step and wall time, accuracy by
length, sample traces), which a graceful stop writes too."""
from __future__ import annotations

import json
from pathlib import Path

from scratchpad.common.config import ExperimentConfig


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
    summary["report"] = write_report(run_dir, cfg.name, history, evals).name
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---- report.html: one self-contained page (PNGs inlined as base64) ---------------------------------------------

PANELS = (  # (title, [(metric key, label)])
    ("reward", [("reward", "train reward")]),
    ("accuracy", [("accuracy", "train accuracy (sampled)"), ("eval_accuracy", "held-out accuracy (greedy)")]),
    ("KL to the reference", [("kl", "KL")]),
    ("tokens/s (generation)", [("tokens_per_s", "tokens/s")]),
    ("loss", [("loss", "policy loss")]),
    ("step time by phase (s)", [("time_generate", "generate"), ("time_train", "train"), ("time_sync", "sync"),
                                ("time_reward", "reward"), ("time_checkpoint", "checkpoint")]),
)


def _png(fig) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _curves(history: list[dict], evals: list[dict], x: str) -> str:
    """The PANELS against `x` ("step" or "wall", in minutes), as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    scale = 60.0 if x == "wall" else 1.0
    for ax, (title, series) in zip(axes.flat, PANELS):
        drawn = 0
        for key, label in series:
            rows = evals if key == "eval_accuracy" else history
            field = "accuracy" if key == "eval_accuracy" else key
            points = [(r[x] / scale, r[field]) for r in rows if isinstance(r.get(field), (int, float)) and x in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o-" if key == "eval_accuracy" else "-", label=label, markersize=3)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not measured in this run" + (" (learner.kl_coef = 0)" if title.startswith("KL") else ""),
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("learner step" if x == "step" else "wall time (minutes)")
    fig.tight_layout()
    return _png(fig)


def _by_length(evals: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in ([evals[0], evals[-1]] if len(evals) > 1 else evals):
        lengths = list(e["by_length"])
        ax.plot(lengths, [e["by_length"][k] for k in lengths], "o-", label=f"step {e['step']}")
    ax.set_xlabel("array length")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _traces_html(traces: list[dict], per_step: int = 4) -> str:
    """Sampled traces of the first and last steps, thought and answer in their own cells; every string escaped."""
    from html import escape

    if not traces:
        return "<p>No traces were sampled (run.sample_traces = 0).</p>"
    steps = sorted({t["step"] for t in traces})
    shown = [t for s in dict.fromkeys([steps[0], steps[-1]]) for t in [t for t in traces if t["step"] == s][:per_step]]
    rows = "".join(
        f"<tr><td>{t['step']}</td><td><pre>{escape(str(t.get('prompt', '')))}</pre></td>"
        f"<td class=thought><pre>{escape(str(t.get('thought') or ''))}</pre></td>"
        f"<td class=answer><pre>{escape(str(t.get('answer') or ''))}</pre></td><td>{escape(str(t.get('reference', '')))}</td>"
        f"<td>{t.get('reward', 0.0):.2f}</td><td>{escape(str(t.get('status', '')))} / {escape(str(t.get('finish_reason', '')))}</td></tr>"
        for t in shown)
    return ("<table><tr><th>step</th><th>prompt</th><th>thought (never graded)</th><th>answer</th><th>reference</th>"
            f"<th>reward</th><th>status / finish</th></tr>{rows}</table>")


def write_report(run_dir: Path, name: str, history: list[dict], evals: list[dict], note: str = "") -> Path:
    """RUN_DIR/report.html from the run's records so far (also after a graceful stop)."""
    from html import escape

    traces_path = run_dir / "traces.jsonl"
    traces = [json.loads(line) for line in traces_path.read_text().splitlines()] if traces_path.exists() else []
    facts = [("steps", str(len(history))), ("wall time", f"{history[-1]['wall'] / 60:.1f} min" if history else "-")]
    if evals:
        facts.append(("held-out accuracy", f"{evals[0]['accuracy']:.3f} (step {evals[0]['step']}) -> "
                                           f"{evals[-1]['accuracy']:.3f} (step {evals[-1]['step']})"))
    if history:
        facts.append(("tokens/s (mean)", f"{sum(r['tokens_per_s'] for r in history) / len(history):.0f}"))
    parts = [f"<h1>{escape(name)}</h1>", f"<p>{escape(note)}</p>" if note else "",
             "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts) + "</table>"]
    if history:
        parts += ["<h2>Against learner step</h2>", f'<img alt="curves against step" src="data:image/png;base64,{_curves(history, evals, "step")}">',
                  "<h2>Against wall time</h2>", f'<img alt="curves against wall time" src="data:image/png;base64,{_curves(history, evals, "wall")}">']
    if evals:
        parts += ["<h2>Held-out accuracy by array length, first vs last evaluation</h2>",
                  f'<img alt="accuracy by length" src="data:image/png;base64,{_by_length(evals)}">']
    parts += ["<h2>Sample traces (first and last step)</h2>", _traces_html(traces)]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;margin:1em 0} "
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left} pre{margin:0;white-space:pre-wrap} "
             "td.thought{background:#f4f4f8;color:#555} td.answer{background:#eef8ee;font-weight:bold} img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(name)}: scratchpad report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = run_dir / "report.html"
    path.write_text(page)
    return path
