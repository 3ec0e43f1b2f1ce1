"""Answer checkers, the killable sandbox, the DAPO length penalty and the weighted composition of components."""
import os
import time

import pytest

from scratchpad.common.config import ConfigError, load_config
from scratchpad.common.records import Group
from scratchpad.rewards import checkers
from scratchpad.rewards.sandbox import CheckerPool
from scratchpad.rewards.scoring import Scorer, centre_by_group, overlong_penalty, summarise
from test_records_and_scoring import make_trace


# ---- checkers (pure) ------------------------------------------------------------------------

@pytest.mark.parametrize("answer, reference", [
    ("0.5", r"\frac{1}{2}"),
    (r"\boxed{2}", "2"),
    (r"$\frac{3}{4}$", "0.75"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("(0,1]", "(0,1]"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("x=3", "3"),
])
def test_math_verify_finds_equivalences_string_match_misses(answer, reference):
    assert checkers.math_equal(answer, reference)
    if answer != reference:
        assert not checkers.exact(answer, reference)


@pytest.mark.parametrize("answer, reference", [("[0,1)", "(0,1]"), (r"\{1,2,3\}", r"\{1,2\}"), ("3", "2"), ("0.51", r"\frac{1}{2}")])
def test_math_verify_rejects_what_differs(answer, reference):
    assert not checkers.math_equal(answer, reference)


def test_math_verify_failures_are_errors_not_wrong_answers():
    # math-verify logs a comparison that raised and returns False; here it is an error the trace's status reports.
    with pytest.raises(RuntimeError, match="math-verify failed comparing.*nan or zoo"):
        checkers.math_equal("1", r"\frac{1}{0}")
    assert checkers.math_equal("2", r"\frac{4}{2}") and not checkers.math_equal("3", r"\frac{4}{2}")  # no false alarms


def test_numeric_choice_exact():
    assert checkers.numeric("1,000.0", "1000") and checkers.numeric("50%", "50") and checkers.numeric("2/4", "0.5")
    assert checkers.numeric("3.1416", "3.14159", rel_tol=1e-4) and not checkers.numeric("3.1416", "3.14159", rel_tol=1e-6)
    assert checkers.choice("(b)", "B") and checkers.choice("Answer: B", "B") and checkers.choice("B) 42", "B")
    assert not checkers.choice("C", "B")
    assert checkers.exact("  Paris ", "paris") and not checkers.exact("Paris.", "paris")
    for check, answer, reference in [(checkers.numeric, "many", "3"), (checkers.choice, "none of them", "A"), (checkers.math_equal, "", "1")]:
        with pytest.raises(checkers.Unparsable):
            check(answer, reference)
    with pytest.raises(ValueError):  # a bad reference is the data's fault: status error, not unparsable
        checkers.numeric("3", "three")


def test_overlong_penalty_is_dapos_soft_ramp():
    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 90, 100, 130)] == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_centre_by_group_skips_failed_traces():
    assert centre_by_group([1.0, 3.0, 5.0, 9.0], ["a", "a", "b", "b"], [True, True, True, False]) == [-1.0, 1.0, 0.0, 0.0]


# ---- the sandbox: hard timeouts in killable worker processes --------------------------------

def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def pid() -> int:
    return os.getpid()


def broken() -> None:
    raise RuntimeError("checker bug")


def test_a_check_that_overruns_is_killed_and_the_pool_goes_on():
    pool = CheckerPool(2, timeout_s=0.5, warm=[__name__]).wait_ready()  # workers import this module before they say ready
    try:
        before = {w.proc.pid for w in pool.workers}
        started = time.monotonic()
        out = pool.run([(sleepy, (30,), {}), (sleepy, (0.01,), {})])
        elapsed = time.monotonic() - started
        assert out[0].status == "timeout" and out[0].value is None and "killed" in out[0].error
        assert out[1] == ("ok", "woke", None)
        assert elapsed < 0.5 + 0.5
        assert pool.replaced == 1 and len(before & {w.proc.pid for w in pool.workers}) == 1 and len(pool.workers) == 1
        # The run goes on: the next batch is scored, on the replacement too, and errors are reported, not raised.
        out = pool.run([(sleepy, (0.01,), {}), (broken, (), {}), (sleepy, (0.01,), {}), (pid, (), {})])
        assert [o.status for o in out] == ["ok", "error", "ok", "ok"] and "checker bug" in out[1].error
        assert len(pool.workers) == 2 and not before >= {w.proc.pid for w in pool.workers}  # the pool is whole again
    finally:
        pool.close()


def test_scorer_timeout_marks_the_trace_within_deadline(monkeypatch):
    monkeypatch.setitem(checkers.CHECKERS, "exact", slow_exact)
    scorer = Scorer(load_config(None, ["reward.timeout_s=0.4", "reward.checker_workers=2"]).reward)
    try:
        slow, quick = make_trace(answer="slow"), make_trace(k=1)
        started = time.monotonic()
        results = scorer.score([Group("g1", "p", 0, [slow, quick])])
        assert time.monotonic() - started < 0.4 + 0.5
        assert (slow.status, slow.reward, results[0].statuses["correct"]) == ("timeout", 0.0, "timeout")
        assert (quick.status, quick.reward) == ("ok", 1.0)
        again = make_trace(k=2)
        scorer.score([Group("g2", "p", 0, [again])])
        assert (again.status, again.reward) == ("ok", 1.0)
    finally:
        scorer.close()


def slow_exact(answer: str, reference: str) -> bool:
    if answer == "slow":
        time.sleep(30)
    return checkers.exact(answer, reference)


# ---- composition ----------------------------------------------------------------------------

def test_yaml_composition_is_a_weighted_sum_with_per_component_metrics(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "rollout: {max_new_tokens: 12}\n"
        "reward:\n"
        "  components:\n"
        "    - {name: answer, kind: math, weight: 2.0}\n"
        "    - {name: length, kind: overlong, weight: 0.5, max_tokens: 10, cache_tokens: 4}\n"
    )
    cfg = load_config(path)
    assert cfg.reward.accuracy_component() == "answer"
    scorer = Scorer(cfg.reward, cfg.rollout.max_new_tokens)
    try:
        right_short = make_trace(answer=r"\frac{1}{2}", reference="0.5")
        right_long = make_trace(answer="0.5", reference=r"\frac{1}{2}", k=1)
        right_long.completion_ids = right_long.completion_ids * 4  # 8 tokens: two past the ramp's start of 10 - 4
        wrong = make_trace(answer="3", reference="0.5", k=2)
        missing = make_trace(answer=None, closed=False, k=3)
        groups = [Group("g1", "p", 0, [right_short, right_long, wrong, missing])]
        results = scorer.score(groups)
    finally:
        scorer.close()
    assert [t.reward for t in groups[0].traces] == pytest.approx([2.0, 2.0 + 0.5 * -0.5, 0.0, 0.0])
    assert right_long.components == pytest.approx({"answer": 1.0, "length": -0.5})
    assert [t.status for t in groups[0].traces] == ["ok", "ok", "ok", "unparsable"]
    stats = summarise(groups, results, "answer")
    assert stats["component_answer"] == pytest.approx(0.5) and stats["component_length"] == pytest.approx(-0.125)
    assert stats["accuracy"] == pytest.approx(0.5) and stats["reward"] == pytest.approx((2 + 1.75) / 4)
    assert (stats["count_ok"], stats["count_unparsable"], stats["count_timeout"], stats["count_error"]) == (3, 1, 0, 0)
    assert (stats["count_answer_unparsable"], stats["count_length_ok"]) == (1, 4)


def test_default_components_keep_the_quickstart_meaning():
    cfg = load_config("configs/quickstart.yaml")
    assert [(c.name, c.kind, c.weight) for c in cfg.reward.resolved_components()] == [("correct", "exact", 1.0), ("format", "format", 0.0)]


@pytest.mark.parametrize("override, words", [
    ("reward.components=[{name: a, kind: math, weight: 500}]", "reward.components.0.math.weight"),
    ("reward.components=[{name: a, kind: oracle}]", "reward.components.0: Input tag 'oracle'"),
    ("reward.components=[{name: a, kind: exact}, {name: a, kind: format}]", "'a' is used twice"),
    ("reward.components=[{name: l, kind: overlong, cache_tokens: 96}]", "cache_tokens (96) must be below max_tokens (96)"),
    ("reward.components=[{name: rm, kind: reward_model}]", "reward.components.0.reward_model.model_path"),
])
def test_component_mistakes_get_one_line(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("args, words", [
    (["train_path=PAIRS", "output_dir=OUT", "steps=0"], "steps: Input should be greater than or equal to 1"),
    (["train_path=PAIRS", "output_dir=OUT", "bogus=1"], "bogus: Extra inputs are not permitted"),
    (["steps=10"], "train_path: Field required"),
    (["train_path=PAIRS", "output_dir=OUT"], "PAIRS:2: expected a JSON object with prompt, chosen and rejected"),
    (["train_path=/no/such.jsonl", "output_dir=OUT"], "train_path: no such file /no/such.jsonl"),
])
def test_train_rm_mistakes_get_one_line_and_exit_2(tmp_path, args, words):
    import subprocess
    import sys

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    args = [a.replace("PAIRS", str(pairs)).replace("OUT", str(tmp_path / "rm")) for a in args]
    words = words.replace("PAIRS", str(pairs))
    result = subprocess.run([sys.executable, "-m", "scratchpad.cluster.cli", "train-rm", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_every_component_field_is_documented():
    import typing

    from scratchpad.common import config

    kinds = typing.get_args(typing.get_args(config.Component)[0])
    assert len(kinds) == 9
    missing = [f"{cls.__name__}.{name}" for cls in (*kinds, config.RewardModelTrainConfig)
               for name, field in cls.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"undocumented fields: {missing}"
