"""The LLM judge on the warm-started tiny model (HF engine, in process): it reads only instruction and response,
scores are parsed and scaled, unparsable replies are retried a bounded number of times, verdicts are cached.

The tiny model cannot follow a judging instruction, but it answers array-access prompts: a template that makes the
response an array element turns it into a judge whose verdict we can predict."""
import json

import pytest

from scratchpad.common.config import load_config
from scratchpad.actors.judge_engine import JudgeEngine
from scratchpad.common.records import Group
from scratchpad.rewards.scoring import Scorer
from test_records_and_scoring import make_trace

SECRET = "0:7 1:7 SECRET-THOUGHT"


def judge_scorer(tiny_model, buffer_address=None, engine=None, **fields):
    spec = {"name": "judge", "kind": "judge", "engine": "hf", "model_path": tiny_model, **fields}
    cfg = load_config(None, [f"reward.components=[{json.dumps(spec)}]"]).reward  # JSON is YAML: the same path as a config file
    engine = engine or JudgeEngine(cfg.components[0], tiny_model)
    return Scorer(cfg, models={"judge": engine}, buffer_address=buffer_address)


def traces_for(answers, group="g1"):
    out = []
    for k, answer in enumerate(answers):
        t = make_trace(answer=answer, group=group, k=k)
        t.thought = SECRET
        out.append(t)
    return out


def test_pointwise_judge_sees_no_thought_parses_scales_and_caches(tiny_model):
    scorer = judge_scorer(tiny_model, template="A=[{response},{response},{response}] i=1\n",
                          score_pattern=r"<answer>(\d)</answer>", score_min=0, score_max=9, max_new_tokens=40)
    judge = scorer.judges["judge"]
    traces = traces_for(["7", "2", "9", None])
    results = scorer.score([Group("g1", "p", 0, traces)])
    assert judge.seen and all("SECRET" not in text for text in judge.seen)  # the judge never reads the thought
    assert [r.status for r in results] == ["ok", "ok", "ok", "unparsable"]
    assert [t.reward for t in traces[:3]] == pytest.approx([7 / 9, 2 / 9, 1.0])
    asked = judge.asked
    again = traces_for(["7", "2", "9"], group="g2")
    scorer.score([Group("g2", "p", 0, again)])
    assert judge.asked == asked, "the same judge prompts were asked again instead of read from the cache"
    assert [t.reward for t in again] == pytest.approx([7 / 9, 2 / 9, 1.0])


def test_unparsable_verdicts_are_retried_a_bounded_number_of_times(tiny_model):
    scorer = judge_scorer(tiny_model, template="A=[{response},4] i=0\n", score_pattern=r"Score: (\d+)", max_retries=2,
                          max_new_tokens=24)
    judge = scorer.judges["judge"]
    traces = traces_for(["3", "5", "5"])
    results = scorer.score([Group("g1", "p", 0, traces)])
    assert [r.status for r in results] == ["unparsable"] * 3 and all("after 2 retries" in r.error for r in results)
    assert judge.asked == 2 * 3  # two distinct prompts ("3" and "5"), each asked once and retried twice
    assert not judge.cache  # an unparsable reply is never cached


def test_pairwise_judge_asks_both_orders_so_position_bias_cancels(tiny_model):
    # A judge that always prefers the first response: the "a" of the "<answer>" tag it always writes reads as "A".
    scorer = judge_scorer(tiny_model, mode="pairwise", pairwise_template="A=[{response_a},{response_b}] i=0\n",
                          winner_pattern="<(a)nswer>", max_retries=0, max_new_tokens=40)
    judge = scorer.judges["judge"]
    traces = traces_for(["1", "2", "3", None])
    results = scorer.score([Group("g1", "p", 0, traces)])
    assert len(judge.seen) == 3 * 2 and judge.asked == 6 and all("SECRET" not in text for text in judge.seen)
    assert [r.status for r in results] == ["ok", "ok", "ok", "unparsable"]
    assert [t.reward for t in traces[:3]] == pytest.approx([0.5, 0.5, 0.5])
    # A reply with no verdict at all is unparsable, never a silent tie.
    strict = judge_scorer(tiny_model, mode="pairwise", pairwise_template="A=[{response_a},{response_b}] i=0\n",
                          winner_pattern=r"Winner: ([AB])", max_retries=1, max_new_tokens=24)
    results = strict.score([Group("g2", "p", 0, traces_for(["1", "2"], group="g2"))])
    assert [r.status for r in results] == ["unparsable", "unparsable"] and strict.judges["judge"].asked == 4


def test_reward_actors_of_a_run_share_verdicts_through_redis(tiny_model, tmp_path):
    # Two scorers (two reward actors) on one judge engine and one run's Redis: what one paid for, the other reads.
    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis

    fields = dict(template="A=[{response},{response},{response}] i=1\n", score_pattern=r"<answer>(\d)</answer>",
                  score_min=0, score_max=9, max_new_tokens=40, cache_size=4)
    server = EmbeddedRedis(str(tmp_path)).start()
    try:
        address = BufferAddress(server.url, "sp:test-judge:", 100)
        first = judge_scorer(tiny_model, address, **fields)
        second = judge_scorer(tiny_model, address, engine=first.models["judge"], **fields)
        first.score([Group("g1", "p", 0, traces_for(["7", "2", "9"]))])
        assert first.judges["judge"].asked == 3
        again = traces_for(["7", "2", "9", "4"], group="g2")
        second.score([Group("g2", "p", 0, again)])
        assert second.judges["judge"].asked == 1, "the verdicts the first actor paid for were asked again"
        assert [t.reward for t in again] == pytest.approx([7 / 9, 2 / 9, 1.0, 4 / 9])
        shared = second.judges["judge"].shared
        second.score([Group("g3", "p", 0, traces_for(["1", "3", "5", "6"], group="g3"))])
        assert shared.client.hlen(shared.key) == 4  # bounded by cache_size: random entries evicted
    finally:
        server.stop()
