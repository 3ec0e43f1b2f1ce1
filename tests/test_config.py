"""The schema is the one source of truth: every YAML loads, every field is documented, mistakes get one line."""
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from scratchpad.common.config import ConfigError, ExperimentConfig, dump_config, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)


def _fields(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, prefix + name + ".")


def test_every_field_is_documented():
    missing = [name for name, field in _fields(ExperimentConfig) if not (field.description or "").strip()]
    assert not missing, f"undocumented config fields: {missing}"


def test_overrides_keep_types():
    cfg = load_config(None, ["learner.lr=3e-4", "run.steps=7", "reward.require_stop=false", "model.path=null"])
    assert cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.run.steps == 7 and cfg.reward.require_stop is False and cfg.model.path is None


@pytest.mark.parametrize("override, field", [
    ("learner.lr=-1", "learner.lr"),
    ("rollout.n=zero", "rollout.n"),
    ("learner.bogus=1", "learner.bogus"),
    ("task.min_len=9", "task.min_len"),
    ("buffer.redis_url=http://x", "buffer.redis_url"),
])
def test_mistakes_name_the_field(override, field):
    extra = ["task.max_len=4"] if field == "task.min_len" else []
    with pytest.raises(ConfigError) as info:
        load_config(None, [override, *extra])
    message = str(info.value)
    assert field in message and "\n" not in message


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0], ["run.steps=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_cli_reports_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "scratchpad.cluster.cli", "train", str(CONFIGS[0]), "learner.lr=-1", "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.lr" in lines[0] and "Traceback" not in result.stderr


def test_cli_dry_run_prints_resolved_config():
    result = subprocess.run([sys.executable, "-m", "scratchpad.cluster.cli", "train", str(CONFIGS[0]), "--dry-run", "run.steps=11"],
                            capture_output=True, text=True, check=True)
    assert "steps: 11" in result.stdout and "algorithm: grpo" in result.stdout


def test_base_config_is_read_first_and_overridden_section_by_section(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nlearner:\n  lr: 0.0005\n  kl_coef: 0.1\nrollout:\n  n: 4\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nname: child\nlearner:\n  kl_coef: 0.2\n")
    cfg = load_config(tmp_path / "child.yaml", ["rollout.n=6"])
    assert (cfg.name, cfg.learner.lr, cfg.learner.kl_coef, cfg.rollout.n) == ("child", 0.0005, 0.2, 6)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")
