"""A long run's Redis stays bounded: 2,000 groups through put -> read -> ack on the real embedded server leave an empty
stream, flat memory and a compacted append-only file, with the counters balanced."""
import time

import pytest

from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer
from scratchpad.common.records import Group, Trace, encode_group, pack_ids, pack_logprobs

pytestmark = pytest.mark.integration

GROUPS, PER_PUT, SAMPLES = 2000, 4, 50  # 4 groups a put (rollout.prompts_per_step=4); memory read every 40 groups


def realistic_group(i: int, n: int = 8, prompt_tokens: int = 30, completion_tokens: int = 96) -> Group:
    """A group the size the quickstart makes (8 traces of 96 tokens): about 10 KB of msgpack."""
    traces = [Trace(trace_id=f"g{i}:{k}", group_id=f"g{i}", prompt_id=f"p{i}", prompt="A=[3,8,1,5] i=2\n",
                    prompt_ids=pack_ids(range(prompt_tokens)), completion="<think>0:3 1:8 2:1</think><answer>1</answer>",
                    completion_ids=pack_ids(range(completion_tokens)), logprobs=pack_logprobs([-0.5] * completion_tokens),
                    finish_reason="stop", policy_version=0, reference="1", reward=float(k % 2)) for k in range(n)]
    return Group(group_id=f"g{i}", prompt_id=f"p{i}", policy_version=0, traces=traces)


def quiet(client, timeout_s: float = 5.0) -> None:
    """Pause until no AOF rewrite is running or scheduled (at least 50 ms: a rewrite ends after 20 ms without writes)."""
    time.sleep(0.05)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        time.sleep(0.02)


def aof_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.aof"))


def test_acknowledged_groups_leave_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", aof_rewrite_min_mb=1).start()  # rewrite from 1 MB, not 64: seen within the test
    try:
        assert server_setting(server, "auto-aof-rewrite-percentage") == "100"  # automatic rewrites are on
        buf = RedisBuffer(BufferAddress(server.url, "sp:memory:", 100000))  # the default bound: MAXLEN never trims here
        buf.ensure_group()
        memory, aof, written, started = [], [], 0, time.monotonic()
        for step in range(GROUPS // PER_PUT):
            batch = [realistic_group(step * PER_PUT + j) for j in range(PER_PUT)]
            written += sum(len(encode_group(g)) for g in batch)
            buf.put(batch)
            got = buf.read("learner-0", PER_PUT, 100)
            assert len(got) == PER_PUT
            buf.ack([entry_id for entry_id, _ in got], trained=PER_PUT, dropped={})
            if (step + 1) % (GROUPS // PER_PUT // SAMPLES) == 0:
                # A run writes in bursts (a step's groups) with quiet phases between (train, sync), in which an AOF
                # rewrite finishes; this loop writes 100 steps' worth a second, so it leaves the quiet in by hand.
                # Read in the quiet: while a rewrite runs Redis also holds a 10 MB block for what arrives meanwhile.
                quiet(buf.client)
                memory.append(buf.client.info("memory")["used_memory"])
                aof.append(aof_bytes(tmp_path / "redis"))
        seconds = time.monotonic() - started
        counters = buf.counters()
        quarter = SAMPLES // 4
        second, last = sum(memory[quarter:2 * quarter]) / quarter, sum(memory[-quarter:]) / quarter
        print(f"{GROUPS} groups ({written / 2**20:.1f} MB) in {seconds:.1f}s; every 40 groups, used_memory (KB): "
              f"{[m // 1024 for m in memory]}, AOF (KB): {[a // 1024 for a in aof]}")
        assert counters["stream_length"] == 0
        assert (counters["produced"], counters["trained"], counters["in_flight"], counters["invariant_holds"]) == (GROUPS, GROUPS, 0, True)
        assert last <= second * 1.05 + 64 * 1024, f"used_memory grew from {second:.0f} to {last:.0f} bytes: {memory}"
        # Rewritten from 1 MB on, the AOF saws between about 0.1 and 3 MB (what arrives during a rewrite is appended
        # to it); one that kept every acknowledged group would grow to the 18 MB put.
        assert max(aof) < written / 4, f"the AOF keeps what was acknowledged: {aof} bytes of {written} put"
    finally:
        server.stop()


def server_setting(server: EmbeddedRedis, name: str) -> str:
    from scratchpad.common.buffer import connect

    return connect(server.url).config_get(name)[name]
