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
    """Published weights travel as a few buckets in one object-store put that every rollout actor reads without a
    copy (numpy buffers are zero-copy in Ray's object store), instead of one object per parameter."""

    names: list[str]  # HF parameter names, in buffer order
    shapes: list[list[int]]  # each parameter's shape
    dtype: str  # torch dtype name of every parameter in the bucket ("float32", "bfloat16", ...)
    # Either one buffer per parameter (views of a CPU learner's own tensors: the put is then the only copy) or one
    # flat buffer, the parameters back to back (a copy: one transfer off a GPU, or out of ZeRO-3's gathered shards).
    # bfloat16 travels as its uint16 bit pattern.
    buffers: list[np.ndarray]


def unpack_bucket(bucket: WeightBucket):
    """(name, numpy view) for each parameter of a bucket, no copy."""
    if len(bucket.buffers) == len(bucket.names):
        for name, shape, buffer in zip(bucket.names, bucket.shapes, bucket.buffers):
            yield name, buffer.reshape(shape)
        return
    (flat,) = bucket.buffers
    offset = 0
    for name, shape in zip(bucket.names, bucket.shapes):
        count = int(np.prod(shape)) if shape else 1
        yield name, flat[offset : offset + count].reshape(shape)
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
    prompt: str  # prompt text as the model saw it (chat template, instruction, worked examples)
    prompt_ids: bytes  # (P,) int32 prompt token ids, BOS included (pack_ids / unpack_ids)
    completion: str  # decoded completion text, EOS excluded
    completion_ids: bytes  # (C,) int32 sampled token ids, EOS included when the model stopped
    logprobs: bytes  # (C,) float32 sampler's log p(token) for each completion id, under the distribution it was drawn from (temperature, top-p applied)
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    policy_version: int  # weights version that sampled this trace
    reference: str  # reference answer from the prompt
    thought: str | None = None  # text inside <think>..</think>, None if absent; never scored
    answer: str | None = None  # text inside <answer>..</answer>, None if absent
    closed: bool = False  # the completion ends right after </answer> (whitespace aside)
    meta: dict = {}  # copied from the prompt
    question: str = ""  # the task's question alone, as a judge or reward model reads it; "" in payloads from before it
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


class JsonLines(msgspec.Struct):
    """A JSONL file read leniently: the good rows, and why each bad line was skipped."""

    path: str
    rows: list[tuple[int, dict]]  # (line number, object) of each good line
    bad: list[tuple[int, str]]  # (line number, reason) of each skipped line
    lines: int  # non-blank lines in all

    def check(self, max_bad: float, what: str, setting: str | None = None) -> "JsonLines":
        """ValueError naming the file, the count and the first bad line when more than `max_bad` of the lines are bad
        (`setting` names the field that says so), or when no good line is left."""
        if self.bad and len(self.bad) > max_bad * self.lines:
            lineno, reason = self.bad[0]
            allowed = f", more than {setting} = {max_bad:g} allows" if setting else ""
            raise ValueError(f"{self.path}:{lineno}: {reason} ({len(self.bad)} of {self.lines} lines bad{allowed})")
        if not self.rows:
            raise ValueError(f"{self.path}: no {what}")
        return self


def _row_problem(line: bytes, kinds: dict[str, tuple[type, ...]]) -> tuple[dict | None, str | None]:
    """(object, None) for a good line, (None, reason) for a bad one."""
    import json

    fields = list(kinds)
    expected = f"expected a JSON object with {', '.join(fields[:-1])} and {fields[-1]}" if len(fields) > 1 else f"expected a JSON object with {fields[0]}"
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
    except json.JSONDecodeError as exc:
        return None, f"{expected} (not JSON: {exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"{expected} (got a JSON {type(row).__name__})"
    missing = [f for f in fields if f not in row]
    if missing:
        return None, f"{expected} (missing {', '.join(missing)})"
    for field, types in kinds.items():
        value = row[field]
        if not types:
            continue
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, str) and not value.strip()):
            wanted = " or ".join("non-empty string" if t is str else {int: "integer", float: "number"}[t] for t in types)
            return None, f"{field} must be a {wanted} (got {json.dumps(value)[:60]})"
    return row, None


def scan_json_lines(path, kinds: dict[str, tuple[type, ...]]) -> JsonLines:
    """Every non-blank line of a JSONL file, sorted into good rows (objects whose `kinds` fields exist and have one of
    the listed types; an empty tuple accepts any) and bad ones. OSError when the file cannot be read at all."""
    rows, bad, lines = [], [], 0
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is one bad row, not the end of the file
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            lines += 1
            row, problem = _row_problem(line, kinds)
            if problem is None:
                rows.append((lineno, row))
            else:
                bad.append((lineno, problem))
    return JsonLines(str(path), rows, bad, lines)


def read_json_lines(path, fields: tuple[str, ...], what: str, max_bad: float = 0.0) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file whose objects have `fields`; bad lines are
    skipped while at most `max_bad` of them are, else ValueError naming the file, the count and the first bad line
    (also when the file holds no good line)."""
    return scan_json_lines(path, {f: () for f in fields}).check(max_bad, what).rows
