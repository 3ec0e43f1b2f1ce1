"""A small pool of worker processes that run answer checks under a hard timeout.

A check that overruns its deadline has its worker killed (SIGKILL) and replaced;
its trace gets status timeout and the pool goes on, so a pathological input (a
sympy expression that never simplifies) cannot hang the reward actor. Threads
cannot do this: an overrunning thread can only be abandoned, and keeps its core.
Workers are fresh interpreters, not forks (the reward actor runs threads), and report when
they are ready, so a replacement's start-up never counts against a check's
deadline. A worker whose parent dies exits by itself.

Answers are untrusted text, and a checker (sympy's parser above all) may be made
to eat memory, CPU or disk by one. Each worker therefore runs with hard limits
(setrlimit, set before it imports the checkers): address space (RLIMIT_AS; an
allocation past it raises MemoryError, status error), CPU seconds per check
(RLIMIT_CPU; past it SIGXCPU kills the worker, status timeout) and file size
(RLIMIT_FSIZE; a bigger write fails, status error), in an empty working
directory and an environment holding no more than the interpreter needs (no
credentials, no Ray or Redis addresses).
"""
from __future__ import annotations

import importlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NamedTuple

from scratchpad.rewards.checkers import Unparsable

STARTUP_TIMEOUT_S = 120.0  # a worker that cannot even import in this long is a broken install, not a slow check
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ")  # what a worker inherits; everything else (tokens, URLs, keys) stays behind


class Limits(NamedTuple):
    """Per-worker resource limits (reward.checker_cpu_s, checker_memory_mib, checker_file_mib)."""

    cpu_s: int  # CPU seconds one check may use
    memory_mib: int  # the worker's whole address space
    file_mib: int  # the largest file it may write

    @classmethod
    def of(cls, cfg=None) -> "Limits":
        """From a RewardConfig; none gives the schema's defaults (imported here, not in the workers, which never
        need pydantic)."""
        if cfg is None:
            from scratchpad.common.config import RewardConfig

            cfg = RewardConfig()
        return cls(cfg.checker_cpu_s, cfg.checker_memory_mib, cfg.checker_file_mib)


class Outcome(NamedTuple):
    status: str  # "ok", "timeout", "error" or "unparsable"
    value: Any  # the function's return value when ok, else None
    error: str | None  # why, when not ok


def _orphan_watch(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _limit(limits: Limits) -> None:
    """Hard memory and file-size limits for the rest of this worker's life (they can only be lowered again)."""
    memory, size = limits.memory_mib * 2**20, limits.file_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a worker killed by SIGXCPU leaves no core file behind


def _cpu_budget(cpu_s: int) -> None:
    """RLIMIT_CPU counts the process's whole life: each check gets `cpu_s` more seconds than used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(usage.ru_utime + usage.ru_stime) + 1 + cpu_s
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _serve(rx: Connection, tx: Connection) -> None:
    """Worker loop: take the parent's sys.path and limits, import what checks need, say ready, then run
    (fn, args, kwargs) jobs."""
    setup = rx.recv()
    limits = Limits(*setup["limits"])
    _limit(limits)
    sys.path[:] = setup["path"]  # functions arrive pickled by reference: the child must find the same modules
    threading.Thread(target=_orphan_watch, args=(setup["parent"],), daemon=True).start()
    for module in setup["warm"]:
        importlib.import_module(module)
    tx.send(("ready", None, None))
    while True:
        try:
            fn, args, kwargs = rx.recv()
        except EOFError:
            return
        _cpu_budget(limits.cpu_s)
        try:
            tx.send(("ok", fn(*args, **kwargs), None))
        except Unparsable as exc:
            tx.send(("unparsable", None, str(exc)[:500]))
        except MemoryError:
            tx.send(("error", None, f"MemoryError: past the checker's {limits.memory_mib} MiB (reward.checker_memory_mib)"))
        except Exception as exc:  # reported as the trace's error; the worker lives on
            tx.send(("error", None, f"{type(exc).__name__}: {exc}"[:500]))


class _Worker:
    """One worker process, started with `python -m` (multiprocessing's spawn would re-run the parent's __main__,
    which in a Ray actor or a script without a main guard starts workers of its own)."""

    def __init__(self, warm: Sequence[str], limits: Limits, workdir: str):
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        self.proc = subprocess.Popen([sys.executable, "-m", "scratchpad.rewards.sandbox", str(down_r), str(up_w)],
                                     pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL, cwd=workdir, env=_worker_env())
        os.close(down_r)
        os.close(up_w)
        self.send_conn, self.conn = Connection(down_w, readable=False), Connection(up_r, writable=False)
        self.send_conn.send({"path": _parent_path(), "warm": list(warm), "parent": os.getpid(), "limits": tuple(limits)})
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None  # index of the job it runs
        self.deadline = 0.0

    def send(self, job) -> None:
        self.send_conn.send(job)

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.send_conn.close()
        self.conn.close()


def _parent_path() -> list[str]:
    """The parent's sys.path made absolute: the worker runs in another directory, where "" and relative entries
    would name something else."""
    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


def _worker_env() -> dict[str, str]:
    """A scrubbed environment: the interpreter finds the project through PYTHONPATH (the parent's sys.path, which
    also carries a Ray job's working_dir), one thread per numeric library, and nothing else of the parent's."""
    env = {k: os.environ[k] for k in _KEPT_ENV if k in os.environ}
    env.update(PYTHONPATH=os.pathsep.join(_parent_path()), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


_DIR_PREFIX = "scratchpad-checkers-"


def _sweep_orphans(root: str | None = None) -> int:
    """Remove the working directories of pools whose process is gone. A reward actor that Ray kills (SIGKILL at
    shutdown, a chaos kill) never runs its cleanup, so each would leave one directory, and what its checkers wrote,
    in the temp dir for good. The owner's pid is in the name; a directory whose pid no longer runs is an orphan."""
    removed = 0
    for path in Path(root or tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name[len(_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to touch
        return True
    return True


class CheckerPool:
    """`size` worker processes; `run` spreads jobs over them and returns one Outcome per job, in order."""

    def __init__(self, size: int, timeout_s: float, warm: Sequence[str] = (), limits: Limits | None = None):
        self.timeout_s, self.warm, self.limits = timeout_s, tuple(warm), limits or Limits.of()
        self.size = size
        _sweep_orphans()
        self.workdir = tempfile.TemporaryDirectory(prefix=f"{_DIR_PREFIX}{os.getpid()}-")  # what a checker writes lands here
        self.workers = [self._new_worker() for _ in range(size)]
        self.replaced = 0  # workers killed on timeout or found dead, over the pool's life

    @classmethod
    def for_config(cls, cfg, warm: Sequence[str] = ()) -> "CheckerPool":
        """A pool sized and limited by a RewardConfig (checker_workers, timeout_s, checker_*)."""
        return cls(cfg.checker_workers, cfg.timeout_s, warm, Limits.of(cfg))

    def _new_worker(self) -> _Worker:
        return _Worker(self.warm, self.limits, self.workdir.name)

    def _remove(self, worker: _Worker) -> None:
        """Kill a worker; its replacement starts when there is work for it (see _refill), so a timeout is reported
        without waiting for a new interpreter to start."""
        worker.stop()
        self.workers.remove(worker)
        self.replaced += 1

    def _refill(self) -> None:
        while len(self.workers) < self.size:
            self.workers.append(self._new_worker())

    def wait_ready(self) -> "CheckerPool":
        """Block until every worker has started (imports done), so the first batch pays no start-up."""
        self._refill()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not all(w.ready for w in self.workers):
            for conn in wait([w.conn for w in self.workers if not w.ready], timeout=max(0.0, deadline - time.monotonic())):
                w = next(x for x in self.workers if x.conn is conn)
                try:
                    status, _, _ = conn.recv()
                except (EOFError, OSError):
                    raise RuntimeError(f"a checker worker exited while starting (exit code {w.exitcode})") from None
                w.ready = status == "ready"
            if time.monotonic() > deadline:
                raise RuntimeError(f"checker workers did not start within {STARTUP_TIMEOUT_S}s")
        return self

    def run(self, jobs: Sequence[tuple[Callable, tuple, dict]]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        while queue or any(w.job is not None for w in self.workers):
            if queue:
                self._refill()
            for w in self.workers:
                if w.ready and w.job is None and queue:
                    w.job = queue.popleft()
                    w.send(jobs[w.job])
                    w.deadline = time.monotonic() + self.timeout_s
            busy = [w for w in self.workers if w.job is not None]
            now = time.monotonic()
            wait_s = min((w.deadline - now for w in busy), default=1.0)
            for conn in wait([w.conn for w in self.workers], timeout=max(0.0, wait_s)):
                w = next(x for x in self.workers if x.conn is conn)
                try:
                    status, value, error = conn.recv()
                except (EOFError, OSError):  # the worker died (a crash in native code, the OOM killer)
                    if not w.ready:
                        raise RuntimeError(f"a checker worker exited while starting (exit code {w.exitcode})") from None
                    if w.job is not None:
                        results[w.job] = self._death(w)
                    self._remove(w)
                    continue
                if status == "ready":
                    w.ready = True
                else:
                    results[w.job] = Outcome(status, value, error)
                    w.job = None
            now = time.monotonic()
            for w in list(self.workers):
                if w.job is not None and now >= w.deadline:
                    results[w.job] = Outcome("timeout", None, f"check exceeded {self.timeout_s}s; its worker was killed")
                    self._remove(w)
                elif not w.ready and now - w.started > STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"a checker worker did not start within {STARTUP_TIMEOUT_S}s (exit code {w.exitcode})")
        return results  # type: ignore[return-value]

    def _death(self, worker: _Worker) -> Outcome:
        """Why a worker died during a check: killed for its CPU time (the kernel's SIGXCPU), or anything else."""
        try:
            worker.proc.wait(timeout=10)  # its pipe closed: the exit status follows at once
        except subprocess.TimeoutExpired:
            pass
        if worker.exitcode == -signal.SIGXCPU:
            return Outcome("timeout", None, f"check used more than {self.limits.cpu_s}s of CPU (reward.checker_cpu_s); its worker was killed")
        return Outcome("error", None, f"checker process died (exit code {worker.exitcode})")

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []
        self.workdir.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the workers exit on their own when the parent goes
            pass


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
