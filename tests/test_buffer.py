"""The Redis buffer against a real embedded redis-server: put, read, ack, counters, dead letters."""
import pytest

from scratchpad.common.buffer import LEARNER_GROUP, BufferAddress, EmbeddedRedis, RedisBuffer
from scratchpad.common.records import Group

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


def test_full_buffer_makes_producers_wait_and_trims_only_acknowledged_entries(server):
    """At the bound a put waits (backpressure) instead of trimming undelivered groups; once the learner acks, it
    goes through; a producer that never gets room fails with BufferFull after put_timeout_s, writing nothing."""
    import threading
    import time

    from scratchpad.common.buffer import BufferFull

    address = BufferAddress(server.url, "sp:bound:", 16, put_timeout_s=0.5)
    buf = RedisBuffer(address)
    buf.ensure_group()
    buf.put(groups(16))
    started = time.monotonic()
    with pytest.raises(BufferFull, match="buffer.maxlen"):
        buf.put(groups(1, start=16))
    assert 0.5 <= time.monotonic() - started < 2.0
    c = buf.counters()
    assert (c["produced"], c["in_flight"], c["stream_length"], c["invariant_holds"]) == (16, 16, 16, True)

    slow = RedisBuffer(BufferAddress(server.url, "sp:bound:", 16, put_timeout_s=30))
    done = []
    producer = threading.Thread(target=lambda: done.append(slow.put(groups(4, start=16))))
    producer.start()
    time.sleep(0.3)
    assert not done, "the put went through with 16 groups in flight at maxlen 16"
    got = buf.read("learner-0", 4, 100)
    buf.ack([i for i, _ in got], trained=4, dropped={})
    producer.join(10)
    assert done and len(done[0]) == 4
    # Many more rounds than maxlen: every group is delivered exactly once, none trimmed before it was trained.
    seen = [g.group_id for _, g in got]
    for r in range(10):
        got = buf.read("learner-0", 16, 100)
        seen += [g.group_id for _, g in got]
        buf.ack([i for i, _ in got], trained=len(got), dropped={})
        buf.put(groups(16, start=100 + 16 * r))
    seen += [g.group_id for _, g in buf.read("learner-0", 100, 100)]
    produced = [f"g{i}" for i in range(20)] + [f"g{i}" for i in range(100, 260)]
    assert sorted(seen) == sorted(produced)
    c = buf.counters()
    assert c["invariant_holds"] and c["stream_length"] < 16 * 4  # trimmed: the acknowledged ones went
