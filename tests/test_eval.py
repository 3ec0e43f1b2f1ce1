"""`scratchpad eval`: its statistics against hand-computed values, and one run on real Ray and vLLM."""
import json
import math
from fractions import Fraction

import pytest

from scratchpad.cluster.cli import main
from scratchpad.cluster.eval_stats import best_of_correct, by_length, majority_correct, pass_at_k, sampled_metrics, wilson
from scratchpad.cluster.evaluate import parse_ks, resolve_checkpoint
from scratchpad.common.config import ConfigError


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0  # every subset of 8 holds the correct one
    assert pass_at_k(8, 4, 5) == 1.0  # n - c < k
    assert pass_at_k(4, 2, 3) == pytest.approx(1.0)  # C(2,3) = 0


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    exact = 1 - Fraction(math.comb(1990, 500), math.comb(2000, 500))
    assert pass_at_k(2000, 10, 500) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_normalises_and_breaks_ties_by_first_occurrence():
    answers = ["3", "5", " 5 ", "3", None, "5"]
    correct = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # the reference is 3
    assert majority_correct(answers, correct, 1) == 1.0
    assert majority_correct(answers, correct, 3) == 0.0  # 5 has two votes, 3 one
    assert majority_correct(answers, correct, 4) == 1.0  # 2-2: 3 came first
    assert majority_correct(answers, correct, 5) == 1.0  # the missing answer does not vote
    assert majority_correct(answers, correct, 6) == 0.0  # 5 wins 3-2
    assert majority_correct(["B", "b", "a"], [0.0, 0.0, 1.0], 3) == 0.0  # case is normalised: b has two votes
    assert majority_correct([None, None], [0.0, 0.0], 2) == 0.0
    # The voted answer is right when one sample that gave it passed (the others wrote past </answer>).
    assert majority_correct(["7", "7", "2"], [0.0, 1.0, 0.0], 3) == 1.0


def test_best_of_n_takes_the_verifiers_choice():
    verifier = [0.2, 0.9, 0.9, 0.1]
    correct = [1.0, 0.0, 1.0, 1.0]
    assert best_of_correct(verifier, correct, 1) == 1.0  # only sample 0
    assert best_of_correct(verifier, correct, 4) == 0.0  # sample 1: the first of the two 0.9s, and wrong
    assert best_of_correct([0.0, 0.0, 1.0], [0.0, 0.0, 1.0], 3) == 1.0


def test_sampled_metrics_per_prompt():
    rows = [{"correct": [1.0, 0.0, 0.0, 0.0], "answers": ["1", "2", "2", "3"], "scores": [0.0, 1.0, 0.0, 0.0]},
            {"correct": [0.0, 0.0, 0.0, 0.0], "answers": ["4", "4", None, "5"], "scores": [0.0, 0.0, 0.0, 0.0]}]
    out = sampled_metrics(rows, [4, 2, 1])
    assert out["pass@1"] == [0.25, 0.0]
    assert out["pass@2"] == [pytest.approx(0.5), 0.0]  # 1 - C(3,2)/C(4,2)
    assert out["pass@4"] == [1.0, 0.0]
    assert out["maj@4"] == [0.0, 0.0]  # "2" wins the first prompt
    assert out["best@4"] == [0.0, 0.0] and out["best@1"] == [1.0, 0.0]  # the reranker prefers the wrong sample 1


def test_wilson_interval_known_values():
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-4)  # z^2 / (n + z^2)
    low, high = wilson(81, 263)  # Newcombe (1998), example (a), method 3: 0.2553 to 0.3662
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson(1, 10)
    assert (round(low, 4), round(high, 4)) == (0.0179, 0.4042)
    assert wilson(0, 0) == (0.0, 1.0)


def test_by_length_orders_lengths_numerically():
    stats = by_length([1.0, 0.0, 1.0, 1.0], [10, 9, 10, 3])
    assert list(stats["by_length"]) == ["3", "9", "10"]
    assert stats["by_length"]["10"]["n"] == 2 and stats["overall"]["accuracy"] == 0.75
    assert by_length([], [])["overall"] == {"accuracy": None, "n": 0, "low": 0.0, "high": 1.0}


def test_nothing_fits_still_reports_every_metric(tmp_path):
    from scratchpad.cluster.evaluate import plot, summarise

    summary = summarise([], [], "correct", "correct", [1, 8])
    assert set(summary["metrics"]) == {"greedy", "pass@1", "maj@1", "best@1", "pass@8", "maj@8", "best@8"}
    assert all(m["overall"]["n"] == 0 and m["by_length"] == {} for m in summary["metrics"].values())
    result = {**summary, "ks": [1, 8], "rerank": "correct", "skipped": {"count": 5}, "checkpoint": "/m/tiny",
              "task": {"name": "array_access", "mode": "cot"}}
    assert plot(result, tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_and_k_resolution(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    with pytest.raises(ConfigError, match="has not finished"):
        resolve_checkpoint(str(run))
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(run)) == (run / "final", run / "config.yaml", run / "eval")
    assert resolve_checkpoint(str(run / "final")) == (run / "final", run / "config.yaml", run / "eval")
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_checkpoint(str(tmp_path / "missing"))
    assert parse_ks(None, 8) == [1, 4, 8] and parse_ks(None, 6) == [1, 4, 6] and parse_ks(None, 0) == []
    assert parse_ks("8,1", 8) == [1, 8]
    with pytest.raises(ConfigError, match="needs --samples"):
        parse_ks("1", 0)
    with pytest.raises(ConfigError, match="1..--samples"):
        parse_ks("16", 8)


def test_user_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # the component name is checked before any model loads
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert main(["eval", str(tmp_path / "model"), "--rerank", "verifier"]) == 2
    assert main(["eval", str(tmp_path / "model"), "--samples", "4", "--k", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scratchpad: error: eval: no such checkpoint {tmp_path / 'nowhere'}",
                   "scratchpad: error: eval: --rerank verifier: no such reward component (have: correct, format)",
                   "scratchpad: error: eval: --k 8: each k must lie in 1..--samples (4)"]


@pytest.mark.integration
def test_eval_end_to_end(ray_cluster, tiny_model, tmp_path, capsys):
    # 236 new tokens leave room in the 256-token context for prompts of arrays up to 5 long (2 x length + 9 tokens):
    # the longer ones must be counted as skipped, not sent to vLLM.
    out = tmp_path / "eval"
    code = main(["eval", tiny_model, "--out", str(out), "--eval-size", "10", "--samples", "3", "--k", "1,3",
                 "task.max_len=7", "rollout.max_new_tokens=236", "reward.checker_workers=1"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["metrics"]) == {"greedy", "pass@1", "pass@3", "maj@1", "maj@3", "best@1", "best@3"}
    evaluated, skipped = result["evaluated"], result["skipped"]
    assert evaluated + skipped["count"] == result["prompts"] == 10 and evaluated > 0 and skipped["count"] > 0
    assert set(skipped["by_length"]) <= {"6", "7"} and skipped["context_tokens"] == 256
    for name, metric in result["metrics"].items():
        assert metric["overall"]["n"] == evaluated, name
        assert set(metric["by_length"]) <= {"3", "4", "5"}, name
        assert sum(m["n"] for m in metric["by_length"].values()) == evaluated
        o = metric["overall"]
        assert 0 <= o["low"] <= o["accuracy"] <= o["high"] <= 1
    # Reranked by the answer checker itself over all n samples, best-of-n is pass@n.
    assert result["metrics"]["best@3"]["overall"]["accuracy"] == pytest.approx(result["metrics"]["pass@3"]["overall"]["accuracy"])
    assert len((out / "greedy.jsonl").read_text().splitlines()) == evaluated
    assert "greedy:" in capsys.readouterr().out
