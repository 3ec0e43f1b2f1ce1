"""Replay-buffer throughput: our put + read + ack against a bare redis-py XADD/XREADGROUP/XACK loop.

Both run in the same process against the same embedded redis-server, on the same
realistic groups (default 16 traces x 1,024 completion tokens with logprobs).
Ours also encodes, decodes and validates every group; the bare loop ships
pre-encoded bytes, so the ratio is what our records and accounting cost.
Last printed line: JSON with groups_per_s, mb_per_s (ours, median run) and overhead_ratio (median ours /
median bare time; the best-of-runs ratio is printed too, as best_overhead_ratio). Repeats are interleaved
so both loops see the same machine noise.

    python bench/buffer.py [--groups 400] [--traces 16] [--tokens 1024]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

from scratchpad.common.buffer import LEARNER_GROUP, BufferAddress, EmbeddedRedis, RedisBuffer
from scratchpad.common.records import Group, Trace, encode_group, pack_ids, pack_logprobs


def make_group(i: int, traces: int, tokens: int, rng: random.Random) -> Group:
    gid = f"bench-{i}"
    prompt_ids = pack_ids([rng.randrange(32000) for _ in range(128)])
    return Group(group_id=gid, prompt_id=f"p{i}", policy_version=0, traces=[
        Trace(trace_id=f"{gid}:{k}", group_id=gid, prompt_id=f"p{i}", prompt="x" * 400, prompt_ids=prompt_ids,
              completion="y" * tokens * 3, completion_ids=pack_ids([rng.randrange(32000) for _ in range(tokens)]),
              logprobs=pack_logprobs([-rng.random() for _ in range(tokens)]), finish_reason="stop", policy_version=0,
              reference="42", thought="t" * tokens, answer="42", closed=True, reward=1.0, components={"correct": 1.0},
              status="ok")
        for k in range(traces)
    ])


def run_ours(buf: RedisBuffer, groups: list[Group], batch: int) -> float:
    started = time.perf_counter()
    for g in groups:
        buf.put([g])
    done = 0
    while done < len(groups):
        got = buf.read("bench", batch, 1000)
        buf.ack([entry_id for entry_id, _ in got], trained=len(got), dropped={})
        done += len(got)
    return time.perf_counter() - started


def run_bare(client, stream: str, payloads: list[bytes], batch: int, maxlen: int) -> float:
    client.xgroup_create(stream, LEARNER_GROUP, id="0", mkstream=True)
    started = time.perf_counter()
    for p in payloads:
        client.xadd(stream, {"g": p}, maxlen=maxlen, approximate=True)
    done = 0
    while done < len(payloads):
        reply = client.xreadgroup(LEARNER_GROUP, "bench", {stream: ">"}, count=batch, block=1000)
        ids = [entry_id for _, entries in reply for entry_id, _ in entries]
        client.xack(stream, LEARNER_GROUP, *ids)
        done += len(ids)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=400)
    parser.add_argument("--traces", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="groups per learner read")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(0)
    groups = [make_group(i, args.traces, args.tokens, rng) for i in range(args.groups)]
    payloads = [encode_group(g) for g in groups]
    mb = sum(map(len, payloads)) / 1e6
    ours, bare = [], []
    for r in range(args.repeats):  # interleaved; a fresh server each time, so AOF growth and rewrites hit both alike
        with tempfile.TemporaryDirectory() as tmp:
            server = EmbeddedRedis(tmp).start()
            try:
                buf = RedisBuffer(BufferAddress(server.url, "sp:bench:", 10 * args.groups))
                buf.ensure_group()
                if r % 2:
                    bare.append(run_bare(buf.client, "bare:groups", payloads, args.batch, 10 * args.groups))
                    ours.append(run_ours(buf, groups, args.batch))
                else:
                    ours.append(run_ours(buf, groups, args.batch))
                    bare.append(run_bare(buf.client, "bare:groups", payloads, args.batch, 10 * args.groups))
            finally:
                server.stop()
        print(f"repeat {r}: ours {ours[-1]:.2f}s bare {bare[-1]:.2f}s for {args.groups} groups, {mb:.1f} MB")
    mid_ours, mid_bare = statistics.median(ours), statistics.median(bare)
    print(json.dumps({
        "groups": args.groups, "traces_per_group": args.traces, "tokens_per_trace": args.tokens,
        "payload_mb": round(mb, 2), "repeats": args.repeats, "groups_per_s": round(args.groups / mid_ours, 1),
        "mb_per_s": round(mb / mid_ours, 1), "bare_mb_per_s": round(mb / mid_bare, 1),
        "overhead_ratio": round(mid_ours / mid_bare, 3), "best_overhead_ratio": round(min(ours) / min(bare), 3),
    }))


if __name__ == "__main__":
    main()
