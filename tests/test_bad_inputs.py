"""The bad-input catalogue: every mistake a user can make in a config, a model directory, a Redis URL, a dataset or
a resume gets ONE line (`scratchpad: error: ...` naming the field, file or value) and exit code 2, with no traceback,
before Ray starts; bad data rows under `task.max_bad_rows` are skipped and counted instead. Config-only cases use
`--dry-run`; the others run the real `train`, which must fail in preflight (cluster/preflight.py) within seconds.
docs/RELIABILITY.md lists each case with the wall time it cost."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchpad.common.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
PPO = str(ROOT / "configs" / "ppo.yaml")


def scratchpad(*args: str, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in a fresh interpreter, as a user runs it; (result, wall seconds)."""
    started = time.monotonic()
    env = {**os.environ, "SCRATCHPAD_CACHE": str(tmp_path / "cache"), **env}  # nothing is built by accident
    result = subprocess.run([sys.executable, "-m", "scratchpad.cluster.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=180)
    return result, time.monotonic() - started


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("scratchpad: error: ") and all(w in lines[0] for w in words), lines[0]
    return lines[0]


def train(tmp_path: Path, *args: str, **env: str) -> tuple[str, float]:
    """The real `train`, expected to stop in preflight with one line; (that line, wall seconds)."""
    result, seconds = scratchpad("train", *args, "--run-dir", str(tmp_path / "run"), tmp_path=tmp_path, **env)
    assert not (tmp_path / "run" / "run.json").exists(), "the run started: run.json is written once Redis is up"
    return assert_one_line(result), seconds


def write_lines(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


# ---- config only (--dry-run) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [
    (b"rollout: [1, 2\n", ["bad.yaml", "not valid YAML"]),
    (b"", ["bad.yaml", "empty config"]),
    (b"# only a comment\n", ["bad.yaml", "empty config"]),
    (b"name: caf\xe9\n", ["bad.yaml", "not UTF-8", "0xe9"]),
    (b"- a list\n", ["bad.yaml", "mapping of sections"]),
], ids=["malformed", "empty", "comments-only", "not-utf8", "not-a-mapping"])
def test_a_bad_config_file_is_named(tmp_path, content, words):
    (tmp_path / "bad.yaml").write_bytes(content)
    result, _ = scratchpad("train", str(tmp_path / "bad.yaml"), "--dry-run", tmp_path=tmp_path)
    assert_one_line(result, *words)


@pytest.mark.parametrize("overrides, words", [
    (["learner.bogus=1"], ["learner.bogus", "Extra inputs"]),
    (["rollout.n=zero"], ["rollout.n", "'zero'"]),
    (["learner.lr=-1"], ["learner.lr", "greater than 0"]),
    (["task.max_bad_rows=2"], ["task.max_bad_rows"]),
    (["reward.checker_memory_mib=1"], ["reward.checker_memory_mib"]),
    (["task.name=jsonl", "task.train_path=t.jsonl"], ["task.eval_path is required"]),
    (["rollout.max_new_tokens=5000"], ["rollout.max_new_tokens (5000)", "256 positions", "model.tiny.max_positions"]),
    (["buffer.maxlen=16", "run.checkpoint_every=5"], ["buffer.maxlen (16)", "80 groups", "run.checkpoint_every"]),
    (["buffer.maxlen=32", "learner.max_staleness=2"], ["buffer.maxlen (32)", "48 groups", "learner.max_staleness (2)"]),
    (["buffer.maxlen=32", "rollout.oversample=1.5", "run.checkpoint_every=2"], ["buffer.maxlen (32)", "48 groups", "rollout.oversample (1.5)"]),
], ids=["unknown-key", "wrong-type", "out-of-range", "bad-rows-range", "checker-memory-range", "jsonl-no-eval",
        "max-new-tokens-past-positions", "maxlen-below-checkpoint-window", "maxlen-below-staleness-window",
        "maxlen-below-oversampled-window"])
def test_a_config_mistake_names_the_field(tmp_path, overrides, words):
    result, _ = scratchpad("train", QUICKSTART, *overrides, "--dry-run", tmp_path=tmp_path)
    assert_one_line(result, *words)


# ---- models (preflight) --------------------------------------------------------------------------------------------

def char_model_dir(path: Path, positions: int) -> Path:
    """A model directory with a real config.json and the tiny model's tokenizer, and no weights (preflight reads none)."""
    from scratchpad.cluster.make_model import build_tokenizer

    path.mkdir()
    build_tokenizer().save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": positions, "vocab_size": 100,
                                                  "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
                                                  "intermediate_size": 128}))
    return path


def test_a_missing_or_incomplete_model_directory_is_named(tmp_path):
    line, seconds = train(tmp_path, QUICKSTART, "model.path=/nonexistent")
    assert "model.path: /nonexistent: no such model directory" in line and seconds < 30
    (tmp_path / "empty").mkdir()
    line, _ = train(tmp_path, QUICKSTART, f"model.path={tmp_path / 'empty'}")
    assert "has no config.json" in line
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text('{"model_type": "llama"}')
    line, _ = train(tmp_path, QUICKSTART, f"model.path={tmp_path / 'no-tokenizer'}")
    assert "has no tokenizer" in line
    line, seconds = train(tmp_path, QUICKSTART, "model.path=no-such-org/no-such-model", HF_HUB_OFFLINE="1")
    assert "no-such-org/no-such-model: no such local directory, not in the Hugging Face cache" in line and seconds < 30
    spec = json.dumps({"name": "rm", "kind": "reward_model", "model_path": str(tmp_path / "no-rm")})
    line, _ = train(tmp_path, QUICKSTART, f"reward.components=[{spec}]")
    assert "reward.components rm: model_path" in line and "no such model directory" in line


def test_max_new_tokens_past_a_real_models_positions_names_both_numbers(tmp_path):
    model = char_model_dir(tmp_path / "model", positions=64)
    line, _ = train(tmp_path, QUICKSTART, f"model.path={model}", "rollout.max_new_tokens=80")
    assert "rollout.max_new_tokens (80)" in line and "64 positions" in line and "max_position_embeddings" in line


# ---- Redis (preflight) ---------------------------------------------------------------------------------------------

def test_an_unreachable_redis_fails_in_seconds(tmp_path):
    from scratchpad.common.buffer import free_port

    port = free_port()  # nothing listens there
    line, seconds = train(tmp_path, QUICKSTART, f"buffer.redis_url=redis://127.0.0.1:{port}/0")
    assert f"buffer.redis_url: redis://127.0.0.1:{port}/0: cannot connect" in line
    assert seconds < 20, f"{seconds:.1f}s: the run's client retried instead of failing at once"


def test_a_wrong_redis_password_is_one_line_without_the_password(tmp_path):
    from scratchpad.common.buffer import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        line, seconds = train(tmp_path, QUICKSTART, f"buffer.redis_url=redis://:not-{server.password}@127.0.0.1:{server.port}/0")
        assert "refused the credentials" in line and server.password not in line and ":***@" in line and seconds < 20
    finally:
        server.stop()


# ---- datasets (preflight; skipped rows counted) ----------------------------------------------------------------------

GOOD = [{"prompt": f"A=[{i},2] i=0", "answer": i} for i in range(10)]
BAD = [b"{not json", {"prompt": "no answer"}, {"prompt": ["a list"], "answer": "1"}, {"prompt": "x", "answer": None},
       b'{"prompt": "caf\xe9", "answer": "1"}', b"[1, 2]", {"prompt": "  ", "answer": "1"}]


def jsonl_task(train_path: Path, eval_path: Path, *extra: str) -> list[str]:
    return [QUICKSTART, "task.name=jsonl", f"task.train_path={train_path}", f"task.eval_path={eval_path}", *extra]


def test_too_many_bad_rows_fail_with_the_file_the_count_and_the_first(tmp_path):
    held_out = write_lines(tmp_path / "eval.jsonl", GOOD)
    data = write_lines(tmp_path / "train.jsonl", GOOD + BAD)
    line, _ = train(tmp_path, *jsonl_task(data, held_out))
    assert f"task.train_path: {data}:11:" in line and "not JSON" in line and "7 of 17 lines bad" in line and "task.max_bad_rows" in line
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 4 + b"\n" + b"\xff\xfe\n")
    line, _ = train(tmp_path, *jsonl_task(binary, held_out))
    assert f"{binary}:1: not UTF-8 (byte 0x80 at column 1)" in line and "2 of 2 lines bad" in line
    line, _ = train(tmp_path, *jsonl_task(tmp_path / "missing.jsonl", held_out))
    assert "task.train_path: cannot read" in line and "missing.jsonl" in line and "No such file" in line


def test_bad_rows_under_the_threshold_are_skipped_and_counted(tmp_path):
    from scratchpad.actors.tasks import eval_set, train_stream
    from scratchpad.cluster.preflight import preflight

    data = write_lines(tmp_path / "train.jsonl", GOOD * 10 + BAD)  # 7 bad of 107 lines
    cfg = load_config(None, jsonl_task(data, write_lines(tmp_path / "eval.jsonl", GOOD), "task.max_bad_rows=0.1")[1:])
    notes = preflight(cfg, tmp_path / "run", resume=False)
    counts = json.loads((tmp_path / "run" / "preflight.json").read_text())["prompts"]["task.train_path"]
    assert (counts["lines"], counts["bad_lines"], counts["prompts"]) == (107, 7, 100) and counts["first_bad"].startswith("line 101: ")
    assert len(notes) == 1 and "skipped 7 bad of 107 lines" in notes[0]
    stream = train_stream(cfg.task)
    seen = {next(stream).text for _ in range(200)}
    assert seen == {row["prompt"] for row in GOOD} and len(eval_set(cfg.task)) == 10


# ---- prompts longer than the model's positions ---------------------------------------------------------------------

def test_prompts_too_long_are_counted_and_left_out_or_one_line_when_all_are(tmp_path):
    from scratchpad.actors.tasks import eval_set, train_stream
    from scratchpad.cluster.preflight import fits_model, inspect_model, preflight

    short, long = {"prompt": "A=[1,2] i=0", "answer": "1"}, {"prompt": "A=[" + ",".join("7" * 40) + "] i=3", "answer": "7"}
    held_out = write_lines(tmp_path / "eval.jsonl", [short])
    small = ["model.tiny.max_positions=64", "rollout.max_new_tokens=32"]  # room for 32 prompt tokens (BOS and newline included)
    line, _ = train(tmp_path, *jsonl_task(write_lines(tmp_path / "long.jsonl", [long] * 3), held_out, *small))
    assert "every prompt in" in line and "long.jsonl is too long" in line and "leave 32" in line and "shortest is 89 tokens" in line
    cfg = load_config(None, jsonl_task(write_lines(tmp_path / "mixed.jsonl", [short, long, short]), held_out, *small)[1:])
    notes = preflight(cfg, tmp_path / "run", resume=False)
    assert notes == ["task.train_path: 1 of 3 prompts leave no room for rollout.max_new_tokens in the model's positions and are left out"]
    keep = fits_model(cfg, inspect_model(cfg))
    stream = train_stream(cfg.task, keep)
    assert {next(stream).text for _ in range(10)} == {short["prompt"]} and [p.text for p in eval_set(cfg.task, keep)] == [short["prompt"]]


# ---- resuming from a checkpoint another config wrote --------------------------------------------------------------

def test_resume_with_a_config_of_another_shape_names_the_fields(tmp_path):
    from scratchpad.cluster.preflight import FINGERPRINT, check_fingerprint, fingerprint

    run = tmp_path / "run"
    cfg = load_config(QUICKSTART)
    (run / "checkpoints" / "step-3").mkdir(parents=True)  # what the learner writes; preflight reads none of it
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "checkpoints" / FINGERPRINT).write_text(json.dumps(fingerprint(cfg)))
    check_fingerprint(load_config(run / "config.yaml", ["run.steps=300", "learner.lr=5e-5"]), run)  # same shape: fine
    result, _ = scratchpad("train", PPO, "--resume", str(run), tmp_path=tmp_path)
    assert_one_line(result, f"--resume {run}", "learner.algorithm ('grpo' -> 'ppo')", "critic (False -> True)")
    result, _ = scratchpad("train", "--resume", str(run), "learner.zero_stage=2", "learner.ranks=2", tmp_path=tmp_path)
    assert_one_line(result, "learner.ranks (1 -> 2)", "learner.zero_stage (0 -> 2)")
    with pytest.raises(ConfigError, match=r"model.preset \(None -> 'smollm2-135m-instruct'\)"):
        check_fingerprint(load_config(run / "config.yaml", ["model.preset=smollm2-135m-instruct"]), run)
    with pytest.raises(ConfigError, match=r"coldstart.steps \(None -> 20\)"):  # another cold start is another reference policy
        check_fingerprint(load_config(run / "config.yaml", ["coldstart.steps=20"]), run)
    (run / "checkpoints" / FINGERPRINT).unlink()  # a run from before fingerprints: its config.yaml stands in
    result, _ = scratchpad("train", "--resume", str(run), "model.tiny.hidden_size=256", tmp_path=tmp_path)
    assert_one_line(result, "model.tiny.hidden_size (128 -> 256)")


# ---- judge replies that parse to nothing ---------------------------------------------------------------------------

@pytest.mark.parametrize("reply", ["", "I cannot rate this.", "Score: eleven", "Score: 11", "Score: -3", "Score:", "\x00\xff"])
def test_a_judge_reply_that_parses_to_nothing_is_unparsable_never_a_crash(reply):
    from scratchpad.rewards.judge import Judge

    for pattern in (r"Score:\s*(-?\d+(?:\.\d+)?)", r"Score:\s*(\d+)?", r"Score:\s*(\S+)"):  # the default, an optional group, anything
        spec = json.dumps({"name": "judge", "kind": "judge", "score_pattern": pattern, "winner_pattern": r"Winner:\s*([AB])?"})
        judge = Judge(load_config(None, [f"reward.components=[{spec}]"]).reward.components[0], engine=None)
        assert judge._parse_score(reply) is None and judge._parse_winner(reply.replace("Score", "Winner")) is None
