"""A small pool of worker processes that run answer checks under a hard timeout.

A check that overruns its deadline has its worker killed (SIGKILL) and replaced;
its trace gets status timeout and the pool goes on, so a pathological input (a
sympy expression that never simplifies) cannot hang the reward actor. Threads
cannot do this: an overrunning thread can only be abandoned, and keeps its core.
Workers are fresh interpreters, not forks (the reward actor runs threads), and report when
they are ready, so a replacement's start-up never counts against a check's
deadline. A worker whose parent dies exits by itself.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

from scratchpad.rewards.checkers import Unparsable

STARTUP_TIMEOUT_S = 120.0  # a worker that cannot even import in this long is a broken install, not a slow check


class Outcome(NamedTuple):
    status: str  # "ok", "timeout", "error" or "unparsable"
    value: Any  # the function's return value when ok, else None
    error: str | None  # why, when not ok


def _orphan_watch(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _serve(rx: Connection, tx: Connection) -> None:
    """Worker loop: take the parent's sys.path, import what checks need, say ready, then run (fn, args, kwargs) jobs."""
    setup = rx.recv()
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
        try:
            tx.send(("ok", fn(*args, **kwargs), None))
        except Unparsable as exc:
            tx.send(("unparsable", None, str(exc)[:500]))
        except Exception as exc:  # reported as the trace's error; the worker lives on
            tx.send(("error", None, f"{type(exc).__name__}: {exc}"[:500]))


class _Worker:
    """One worker process, started with `python -m` (multiprocessing's spawn would re-run the parent's __main__,
    which in a Ray actor or a script without a main guard starts workers of its own)."""

    def __init__(self, warm: Sequence[str]):
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        self.proc = subprocess.Popen([sys.executable, "-m", "scratchpad.rewards.sandbox", str(down_r), str(up_w)],
                                     pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL)
        os.close(down_r)
        os.close(up_w)
        self.send_conn, self.conn = Connection(down_w, readable=False), Connection(up_r, writable=False)
        self.send_conn.send({"path": list(sys.path), "warm": list(warm), "parent": os.getpid()})
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


class CheckerPool:
    """`size` worker processes; `run` spreads jobs over them and returns one Outcome per job, in order."""

    def __init__(self, size: int, timeout_s: float, warm: Sequence[str] = ()):
        self.timeout_s, self.warm = timeout_s, tuple(warm)
        self.size = size
        self.workers = [_Worker(self.warm) for _ in range(size)]
        self.replaced = 0  # workers killed on timeout or found dead, over the pool's life

    def _remove(self, worker: _Worker) -> None:
        """Kill a worker; its replacement starts when there is work for it (see _refill), so a timeout is reported
        without waiting for a new interpreter to start."""
        worker.stop()
        self.workers.remove(worker)
        self.replaced += 1

    def _refill(self) -> None:
        while len(self.workers) < self.size:
            self.workers.append(_Worker(self.warm))

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
                        results[w.job] = Outcome("error", None, f"checker process died (exit code {w.exitcode})")
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

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the workers exit on their own when the parent goes
            pass


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
