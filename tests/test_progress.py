"""Where step records go besides metrics.jsonl: plain lines or a live rich bar, and TensorBoard event files."""
import io

from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scratchpad.common.config import ConfigError, load_config
from scratchpad.cluster.progress import StepReporter, check_wandb

RECORD = {"step": 1, "wall": 12.5, "reward": 0.5, "accuracy": 0.25, "tokens_per_s": 900.0, "loss": 0.01, "time_train": 1.5}


def test_plain_lines_and_tensorboard(tmp_path):
    lines = []
    cfg = load_config(None, ["run.steps=2"])
    reporter = StepReporter(cfg, tmp_path, "run-1", started=1000.0, first=1, log=lines.append, live=False)
    reporter.log("cluster up")
    reporter.step(RECORD, "step 1/2 reward 0.500")
    reporter.step({**RECORD, "step": 2, "wall": 20.0, "reward": 0.75}, "step 2/2 reward 0.750")
    reporter.evaluation(2, {"accuracy": 0.4, "by_length": {"3": 0.5}, "wall": 21.0})
    reporter.close()
    assert lines == ["cluster up", "step 1/2 reward 0.500", "step 2/2 reward 0.750"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    reward = events.Scalars("train/reward")
    assert [(e.step, e.value, e.wall_time) for e in reward] == [(1, 0.5, 1012.5), (2, 0.75, 1020.0)]
    assert {"time/train", "eval/accuracy", "eval/accuracy_len_3"} <= set(events.Tags()["scalars"])


def test_live_bar_on_a_terminal(tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    reporter = StepReporter(load_config(None, ["run.steps=4", "name=demo"]), tmp_path, "run-1", 0.0, 1, log=None,
                            live=True, console=console)
    reporter.log("cluster up")
    reporter.step(RECORD, "unused: the bar shows the step")
    reporter.close()
    text = screen.getvalue()
    assert "cluster up" in text and "demo" in text and "1/4" in text and "reward 0.500" in text and "acc 0.250" in text


def test_wandb_must_be_installed_when_asked_for():
    try:
        import wandb  # noqa: F401
    except ImportError:
        cfg = load_config(None, ["run.wandb=true"])
        try:
            check_wandb(cfg)
        except ConfigError as err:
            assert "run.wandb" in str(err)
        else:
            raise AssertionError("run.wandb=true without wandb installed must be a ConfigError")
    check_wandb(load_config(None, []))  # off by default: never required
