"""Tasks, prompt formats and completion parsing: pure, fast."""
import json
import random

import pytest

from scratchpad.actors.formatting import parse_completion, target_completion
from scratchpad.actors.tasks import array_access, eval_set, read_jsonl, train_stream, worked_thought
from scratchpad.common.config import ConfigError, load_config


def test_array_access_answer_is_the_indexed_element():
    rng = random.Random(0)
    for _ in range(200):
        question, answer, meta = array_access(rng, 3, 10)
        values = question.split("[")[1].split("]")[0].split(",")
        assert 3 <= len(values) == meta["length"] <= 10
        assert values[meta["index"]] == answer


def test_worked_thought_ends_at_the_answer():
    thought = worked_thought("array_access", "A=[3,8,1,5] i=2")
    assert thought == "0:3 1:8 2:1"
    assert worked_thought("addition", "58+67") == "8+7+0=15 5+6+1=12"


@pytest.mark.parametrize("text, expected", [
    ("<think>0:3 1:8</think><answer>8</answer>", ("0:3 1:8", "8", True)),
    ("<think>x</think><answer> 8 </answer>\n", ("x", "8", True)),
    ("<answer>8</answer> and more", (None, "8", False)),
    ("<think>0:3 1:", (None, None, False)),
    ("<think>a</think><answer>1<answer>", ("a", None, False)),
])
def test_parse_completion(text, expected):
    assert parse_completion(text) == expected


def test_target_completion_round_trips_through_the_parser():
    text = target_completion("cot", "0:3", "3")
    assert parse_completion(text) == ("0:3", "3", True)
    assert parse_completion(target_completion("direct", "ignored", "3")) == (None, "3", True)


def test_eval_set_is_fixed_and_disjoint_from_training():
    cfg = load_config(None, ["task.eval_size=50"]).task
    first, second = eval_set(cfg), eval_set(cfg)
    assert first == second and len(first) == 50
    stream = train_stream(cfg)
    train_ids = {next(stream).prompt_id for _ in range(50)}
    assert not train_ids & {p.prompt_id for p in first}


def test_training_lengths_narrow_the_stream_not_the_held_out_set():
    cfg = load_config(None, ["task.min_len=3", "task.max_len=12", "task.train_min_len=6", "task.eval_size=300"]).task
    trained = {p.meta["length"] for p, _ in zip(train_stream(cfg), range(300))}
    assert trained == set(range(6, 13))
    assert {p.meta["length"] for p in eval_set(cfg)} == set(range(3, 13))
    assert eval_set(cfg) == eval_set(load_config(None, ["task.min_len=3", "task.max_len=12", "task.eval_size=300"]).task)
    with pytest.raises(ConfigError, match="task.train_min_len"):
        load_config(None, ["task.train_min_len=9", "task.train_max_len=7"])
    with pytest.raises(ConfigError, match="only read for a synthetic task"):
        load_config(None, ["task.name=jsonl", "task.train_path=x.jsonl", "task.train_min_len=6"])


def test_jsonl_loader(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "2+2", "answer": 4, "source": "x"}) + "\n\n" + json.dumps({"prompt": "3+3", "answer": "6"}) + "\n")
    rows = read_jsonl(path)
    assert [(r.text, r.answer) for r in rows] == [("2+2", "4"), ("3+3", "6")]
    assert rows[0].meta == {"source": "x"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no answer"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(bad)
