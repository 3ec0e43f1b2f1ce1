"""Records survive msgpack; malformed payloads are rejected; the default scorer keeps its correct/format meaning."""
import pytest

from scratchpad.common.config import RewardConfig
from scratchpad.common.records import Group, Trace, decode_group, encode_group, pack_ids, pack_logprobs, unpack_ids
from scratchpad.rewards.scoring import Scorer


def make_trace(answer="3", closed=True, group="g1", k=0, reference="3"):
    return Trace(trace_id=f"{group}:{k}", group_id=group, prompt_id="p", prompt="A=[3] i=0\n", prompt_ids=pack_ids([1, 2]),
                 completion="", completion_ids=pack_ids([5, 6]), logprobs=pack_logprobs([-0.1, -0.2]), finish_reason="stop", policy_version=0,
                 reference=reference, thought="0:3", answer=answer, closed=closed)


def test_group_round_trip():
    group = Group(group_id="g1", prompt_id="p", policy_version=3, traces=[make_trace(k=i) for i in range(4)])
    back = decode_group(encode_group(group))
    assert back == group
    assert unpack_ids(back.traces[0].completion_ids).tolist() == [5, 6] and back.traces[0].num_tokens == 2


@pytest.mark.parametrize("payload", [b"garbage", b"\x81\xa1x\x01", encode_group(Group("g1", "p", 0, []))])
def test_malformed_payloads_raise_value_error(payload):
    with pytest.raises(ValueError):
        decode_group(payload)


def test_mismatched_logprobs_are_rejected():
    bad = make_trace()
    bad.logprobs = pack_logprobs([-0.1])
    with pytest.raises(ValueError, match="logprobs"):
        decode_group(encode_group(Group("g1", "p", 0, [bad])))


def test_scorer_statuses_and_rewards():
    scorer = Scorer(RewardConfig(format_weight=0.1))
    right, wrong, rambling, none = make_trace(), make_trace(answer="4"), make_trace(closed=False), make_trace(answer=None, closed=False)
    scorer.score([Group("g1", "p", 0, [right, wrong, rambling, none])])
    assert (right.status, right.reward) == ("ok", pytest.approx(1.1))
    assert (wrong.status, wrong.reward) == ("ok", pytest.approx(0.1))
    assert rambling.reward == 0.0  # a right answer followed by more text is not rewarded
    assert (none.status, none.reward) == ("unparsable", 0.0)
    assert right.components == {"correct": 1.0, "format": 1.0} and rambling.components == {"correct": 0.0, "format": 0.0}
    scorer.close()


def test_ragged_packed_arrays_are_rejected():
    bad = make_trace()
    bad.completion_ids = bad.completion_ids[:-1]
    with pytest.raises(ValueError, match="4-byte"):
        decode_group(encode_group(Group("g1", "p", 0, [bad])))
