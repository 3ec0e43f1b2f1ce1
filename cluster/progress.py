"""Where each step's record goes besides metrics.jsonl: the terminal, TensorBoard, Weights & Biases, Ray's gauges.

On a terminal (stdout is a TTY) a live `rich` progress bar shows step, reward and accuracy, with log lines
printed above it; anywhere else (a Ray job, a pipe, a file) each step is one plain line.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from scratchpad.common.config import ConfigError, ExperimentConfig, dump_config


def check_wandb(cfg: ExperimentConfig) -> None:
    """run.wandb asks for a package that is not a dependency: say so before anything starts."""
    if cfg.run.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("run.wandb is true but the wandb package is not installed (pip install wandb)") from None


def _tag(key: str) -> str:
    if key.startswith("time_"):
        return f"time/{key[5:]}"
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    return f"train/{key}"


class StepReporter:
    """One per run: `log` lines, `step` records, `evaluation` results, then `close`."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, run_id: str, started: float, first: int, log=print,
                 live: bool | None = None, console=None):
        from torch.utils.tensorboard import SummaryWriter

        self.steps, self.started, self.log_line = cfg.run.steps, started, log
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first if first > 1 else None)
        self.wandb = None
        if cfg.run.wandb:
            import wandb
            import yaml

            self.wandb = wandb.init(project=cfg.run.wandb_project, name=run_id, id=run_id, resume="allow", dir=str(run_dir),
                                    config=yaml.safe_load(dump_config(cfg)))
        self.progress = None
        if live if live is not None else sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task(cfg.name, total=cfg.run.steps, completed=first - 1, stats="")
            self.progress.start()

    def log(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            self.log_line(line)

    def step(self, record: dict, line: str) -> None:
        wall = self.started + record["wall"]
        for key, value in record.items():
            if key not in ("step", "wall") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(_tag(key), value, record["step"], walltime=wall)
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({_tag(k): v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=record["step"])
        if self.progress is not None:
            stats = (f"reward {record.get('reward', float('nan')):.3f}  acc {record.get('accuracy', float('nan')):.3f}  "
                     f"tok/s {record['tokens_per_s']:.0f}" + (f"  held-out {record['eval_accuracy']:.3f}" if "eval_accuracy" in record else ""))
            self.progress.update(self.task, completed=record["step"], stats=stats)
        else:
            self.log_line(line)

    def evaluation(self, step: int, result: dict) -> None:
        wall = self.started + result.get("wall", time.time() - self.started)
        self.tensorboard.add_scalar("eval/accuracy", result["accuracy"], step, walltime=wall)
        for length, value in result["by_length"].items():
            self.tensorboard.add_scalar(f"eval/accuracy_len_{length}", value, step, walltime=wall)
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({"eval/accuracy": result["accuracy"]}, step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
