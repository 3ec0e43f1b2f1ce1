"""The records that cross process boundaries, and their msgpack encoding.

Everything that travels between rollout actors, reward actors, the Redis buffer
and the learner is one of these structs. They are plain data (no tensors, never
pickle) so a Redis entry written by one version of the code can be read and
validated by another; `decode_group` rejects anything malformed.
"""
from __future__ import annotations

import msgspec
import numpy as np

# Token ids and logprobs travel as packed little-endian arrays: encoding and decoding them is a copy,
# not one Python object per token (msgpack lists decoded at ~90 MB/s; see docs/BENCHMARKS.md).
ID_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")


def pack_ids(ids) -> bytes:
    return np.asarray(ids, dtype=ID_DTYPE).tobytes()


def pack_logprobs(values) -> bytes:
    return np.asarray(values, dtype=LOGPROB_DTYPE).tobytes()


def unpack_ids(packed: bytes) -> np.ndarray:
    """(N,) int32 view of packed ids (read-only)."""
    return np.frombuffer(packed, dtype=ID_DTYPE)


def unpack_logprobs(packed: bytes) -> np.ndarray:
    return np.frombuffer(packed, dtype=LOGPROB_DTYPE)


class WeightBucket(msgspec.Struct):
    """Published weights travel as a few flat buffers: one object-store put that every rollout actor reads without a
    copy (numpy buffers are zero-copy in Ray's object store), instead of one object per parameter."""

    names: list[str]  # HF parameter names, in buffer order
    shapes: list[list[int]]  # each parameter's shape
    dtype: str  # torch dtype name of every parameter in the bucket ("float32", "bfloat16", ...)
    flat: np.ndarray  # (sum of numels,) the parameters back to back; bfloat16 travels as its uint16 bit pattern


def unpack_bucket(bucket: WeightBucket):
    """(name, numpy view) for each parameter of a bucket, no copy."""
    offset = 0
    for name, shape in zip(bucket.names, bucket.shapes):
        count = int(np.prod(shape)) if shape else 1
        yield name, bucket.flat[offset : offset + count].reshape(shape)
        offset += count


class Prompt(msgspec.Struct, frozen=True):
    """One task instance, before sampling."""

    prompt_id: str  # stable id: task name + seed + index, unique within a run
    text: str  # what the model is conditioned on, already formatted for its mode
    answer: str  # reference answer the checkers compare against
    meta: dict = {}  # task details for metrics, e.g. {"length": 7}


class Trace(msgspec.Struct):
    """One sampled completion of one prompt, then its score."""

    trace_id: str  # group_id + ":" + index within the group
    group_id: str  # the group this trace belongs to
    prompt_id: str
    prompt: str  # prompt text as the model saw it
    prompt_ids: bytes  # (P,) int32 prompt token ids, BOS included (pack_ids / unpack_ids)
    completion: str  # decoded completion text, EOS excluded
    completion_ids: bytes  # (C,) int32 sampled token ids, EOS included when the model stopped
    logprobs: bytes  # (C,) float32 sampler's log p(token) for each completion id, unmodified distribution
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    policy_version: int  # weights version that sampled this trace
    reference: str  # reference answer from the prompt
    thought: str | None = None  # text inside <think>..</think>, None if absent; never scored
    answer: str | None = None  # text inside <answer>..</answer>, None if absent
    closed: bool = False  # the completion ends right after </answer> (whitespace aside)
    meta: dict = {}  # copied from the prompt
    reward: float | None = None  # total scalar reward, set by a reward actor
    components: dict[str, float] = {}  # named parts of the reward before weighting
    status: str | None = None  # "ok", "timeout", "error" or "unparsable" once scored
    error: str | None = None  # scorer's message when status is not ok

    @property
    def num_tokens(self) -> int:
        """C, the completion's length in tokens."""
        return len(self.completion_ids) // ID_DTYPE.itemsize


class Group(msgspec.Struct):
    """The n traces of one prompt. One stream entry per group: group-relative advantages never see half a group."""

    group_id: str  # unique per sampling of a prompt: run-wide counter based
    prompt_id: str
    policy_version: int  # weights version that sampled every trace of the group
    traces: list[Trace]
    created_at: float = 0.0  # unix seconds when sampling finished


_encoder = msgspec.msgpack.Encoder()
_group_decoder = msgspec.msgpack.Decoder(Group)


def encode_group(group: Group) -> bytes:
    return _encoder.encode(group)


def decode_group(payload: bytes) -> Group:
    """Decode and validate a group; raises ValueError with the reason when the payload is malformed."""
    try:
        group = _group_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"undecodable group: {exc}") from None
    if not group.traces:
        raise ValueError("group has no traces")
    for trace in group.traces:
        if any(len(b) % 4 for b in (trace.prompt_ids, trace.completion_ids, trace.logprobs)):
            raise ValueError(f"trace {trace.trace_id}: packed ids or logprobs are not whole 4-byte values")
        if len(trace.completion_ids) != len(trace.logprobs):
            raise ValueError(f"trace {trace.trace_id}: {trace.num_tokens} completion ids but {len(trace.logprobs) // 4} logprobs")
        if not trace.prompt_ids:
            raise ValueError(f"trace {trace.trace_id}: empty prompt_ids")
        if trace.group_id != group.group_id:
            raise ValueError(f"trace {trace.trace_id}: group_id {trace.group_id} does not match {group.group_id}")
    return group


def read_json_lines(path, fields: tuple[str, ...], what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file whose objects all have `fields`;
    ValueError naming the file and line of a bad one, or the file when it holds none."""
    import json

    names = f"{', '.join(fields[:-1])} and {fields[-1]}" if len(fields) > 1 else fields[0]
    rows = []
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [f for f in fields if f not in row]
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with {names} ({exc})") from None
            if not isinstance(row, dict) or missing:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with {names} (missing {', '.join(missing)})")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no {what}")
    return rows
