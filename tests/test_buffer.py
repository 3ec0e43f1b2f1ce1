"""The Redis buffer against a real embedded redis-server: put, read, ack, counters, dead letters."""
import pytest

from scratchpad.cluster.buffer import LEARNER_GROUP, BufferAddress, EmbeddedRedis, RedisBuffer
from scratchpad.cluster.records import Group

from test_records_and_scoring import make_trace

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    redis = EmbeddedRedis(tmp_path / "redis").start()
    yield redis
    redis.stop()


def groups(n, start=0):
    return [Group(group_id=f"g{i}", prompt_id=f"p{i}", policy_version=0,
                  traces=[make_trace(group=f"g{i}", k=k) for k in range(2)]) for i in range(start, start + n)]


def test_put_read_ack_and_invariant(server):
    buf = RedisBuffer(BufferAddress(server.url, "sp:test:", 1000))
    buf.ensure_group()
    buf.put(groups(5))
    c = buf.counters()
    assert (c["produced"], c["in_flight"], c["invariant_holds"]) == (5, 5, True)
    got = buf.read("learner-0", 3, 100)
    assert [g.group_id for _, g in got] == ["g0", "g1", "g2"]
    assert buf.counters()["in_flight"] == 5  # delivered but not yet trained still counts as in flight
    buf.ack([i for i, _ in got[:2]], trained=2, dropped={"stale": 1})
    buf.ack([got[2][0]], trained=0, dropped={})
    c = buf.counters()
    assert (c["trained"], c["dropped"], c["in_flight"], c["invariant_holds"]) == (2, 1, 2, True)


def test_malformed_entries_go_to_dead_letters(server):
    buf = RedisBuffer(BufferAddress(server.url, "sp:dead:", 1000))
    buf.ensure_group()
    buf.put(groups(2))
    buf.client.xadd(buf.stream, {"g": b"not msgpack"})
    buf.client.xadd(buf.stream, {"other": b"x"})
    buf.client.hincrby(buf.counters_key, "produced", 2)
    buf.put(groups(1, start=2))
    got = buf.read("learner-0", 10, 100)
    assert [g.group_id for _, g in got] == ["g0", "g1", "g2"]
    dead = buf.client.xrange(buf.dead)
    assert len(dead) == 2 and all(b"reason" in fields for _, fields in dead)
    assert buf.client.xpending(buf.stream, LEARNER_GROUP)["pending"] == 3  # dead letters are acked, good ones wait
    assert buf.counters()["dropped_by_reason"] == {"invalid": 2}


def test_runs_share_a_server_without_mixing(server):
    a = RedisBuffer(BufferAddress(server.url, "sp:a:", 1000))
    b = RedisBuffer(BufferAddress(server.url, "sp:b:", 1000))
    for buf in (a, b):
        buf.ensure_group()
    a.put(groups(3))
    assert b.read("learner-0", 10, 50) == []
    assert a.counters()["produced"] == 3 and b.counters()["produced"] == 0


def test_restart_on_same_directory_recovers_stream_and_counters(tmp_path):
    first = EmbeddedRedis(tmp_path / "redis", appendfsync="always").start()
    buf = RedisBuffer(BufferAddress(first.url, "sp:aof:", 1000))
    buf.ensure_group()
    buf.put(groups(4))
    first.stop()
    second = EmbeddedRedis(tmp_path / "redis", port=first.port, password=first.password).start()
    try:
        again = RedisBuffer(BufferAddress(second.url, "sp:aof:", 1000))
        assert again.counters()["produced"] == 4
        assert len(again.read("learner-0", 10, 100)) == 4
    finally:
        second.stop()


def test_stop_leaves_no_server(tmp_path):
    redis = EmbeddedRedis(tmp_path / "redis").start()
    pid = redis.process.pid
    redis.stop()
    import psutil
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
