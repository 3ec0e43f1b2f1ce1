"""Nothing untrusted is executed: buffer payloads are msgpack only (a pickle is dead-lettered, never loaded), the
embedded Redis listens on loopback behind a password, and answer checkers run under CPU, memory and file-size limits
in a scrubbed environment, where a hostile check costs its trace a status and nothing else."""
import os
import pickle
import resource
import time

import pytest

from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer, connect
from scratchpad.rewards.sandbox import CheckerPool, Limits

pytestmark = pytest.mark.integration


class _Exploit:
    """Unpickling this runs os.system: what a pickle-reading learner would do with a hostile stream entry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def server(tmp_path):
    redis = EmbeddedRedis(tmp_path / "redis").start()
    yield redis
    redis.stop()


def test_a_pickle_payload_is_dead_lettered_and_never_loaded(server, tmp_path):
    marker = tmp_path / "pwned"
    buf = RedisBuffer(BufferAddress(server.url, "sp:pickle:", 1000))
    buf.ensure_group()
    buf.client.xadd(buf.stream, {"g": pickle.dumps(_Exploit(marker))})
    buf.client.hincrby(buf.counters_key, "produced", 1)
    assert buf.read("learner-0", 10, 100) == []
    (_, fields), = buf.client.xrange(buf.dead)
    assert b"undecodable group" in fields[b"reason"] and not marker.exists()
    counters = buf.counters()
    assert counters["dropped_by_reason"] == {"invalid": 1} and counters["invariant_holds"] and counters["stream_length"] == 0


def test_the_embedded_server_listens_on_loopback_behind_a_password(server):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    admin = connect(server.url)
    assert admin.config_get("bind")["bind"] == "127.0.0.1" and admin.config_get("protected-mode")["protected-mode"] == "yes"
    assert len(server.password) >= 32 and f":{server.password}@127.0.0.1:" in server.url
    for password in (None, "wrong"):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, password=password, retry=Retry(NoBackoff(), 0)).ping()


# ---- answer checkers under limits (the functions run in the workers, which import this module) ----------------

def allocate(mib: int) -> int:
    return len(bytearray(mib * 2**20)) // 2**20


def write_file(name: str, mib: int) -> int:
    with open(name, "wb") as handle:
        for _ in range(mib):
            handle.write(b"x" * 2**20)
    return mib


def spin() -> None:
    while True:
        pass


def environment() -> tuple[dict, str]:
    return dict(os.environ), os.getcwd()


def test_hostile_checks_get_a_status_and_the_pool_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHPAD_TEST_SECRET", "token-that-must-not-leak")
    own_limits = [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_CPU)]
    pool = CheckerPool(1, timeout_s=120, warm=[__name__], limits=Limits(cpu_s=1, memory_mib=256, file_mib=1)).wait_ready()
    try:
        memory, fine = pool.run([(allocate, (512,), {}), (allocate, (8,), {})])
        assert memory.status == "error" and "checker_memory_mib" in memory.error and fine == ("ok", 8, None)
        big, small = pool.run([(write_file, ("big.bin", 4), {}), (write_file, ("small.bin", 0), {})])
        assert big.status == "error" and "File too large" in big.error and small.status == "ok"
        assert os.path.getsize(os.path.join(pool.workdir.name, "big.bin")) <= 2**20  # stopped at the limit, in the pool's directory
        started = time.monotonic()
        cpu, after = pool.run([(spin, (), {}), (allocate, (8,), {})])
        assert cpu.status == "timeout" and "CPU" in cpu.error and after.status == "ok"
        assert time.monotonic() - started < 60 and pool.replaced == 1  # killed by its CPU limit, not the 120 s deadline
        (env, cwd), = [o.value for o in pool.run([(environment, (), {})])]
        assert "SCRATCHPAD_TEST_SECRET" not in env and cwd == pool.workdir.name and env["OMP_NUM_THREADS"] == "1"
        assert [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_CPU)] == own_limits
    finally:
        pool.close()


def test_a_killed_pools_directory_is_removed_by_the_next_pool(tmp_path, monkeypatch):
    """A reward actor killed with SIGKILL never cleans up; the next pool on the machine removes what it left."""
    import signal
    import subprocess
    import sys
    import tempfile

    owner = subprocess.Popen([sys.executable, "-c", "import os, signal; from scratchpad.rewards.sandbox import CheckerPool; "
                              "pool = CheckerPool(1, timeout_s=60); open(os.path.join(pool.workdir.name, 'left.txt'), 'w').write('x'); "
                              "print(pool.workdir.name, flush=True); os.kill(os.getpid(), signal.SIGKILL)"],
                             env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, text=True)
    orphan = owner.stdout.readline().strip()
    assert owner.wait(timeout=60) == -signal.SIGKILL and os.path.exists(os.path.join(orphan, "left.txt"))
    foreign = tmp_path / "scratchpad-checkers-notapid"  # not named by a pool of this version: left alone
    foreign.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = CheckerPool(1, timeout_s=60)
    second = CheckerPool(1, timeout_s=60)  # a live pool's directory survives another pool's sweep
    try:
        assert not os.path.exists(orphan) and foreign.exists() and os.path.isdir(first.workdir.name)
    finally:
        first.close()
        second.close()
    assert not os.path.exists(first.workdir.name) and not os.path.exists(second.workdir.name)
