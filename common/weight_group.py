"""Weights from learner rank 0 to the rollout engines over a collective: NCCL between GPUs, gloo otherwise.

`learner.weight_transport: collective` (the default is the object store, learner/publish.py). The group is its own:
a TCPStore on learner rank 0's node and a process group built on it, apart from the learner ranks' training group
(DeepSpeed's), so an engine never joins the training collectives and a learner restart never waits on an engine.

Nothing here may hang. Before each collective every member checks in under a key of the store; rank 0 waits for
the check-ins within `timeout_s`, naming the members that did not come, then says go, and only then does anyone
enter the collective. A receiver that hears no go within `timeout_s` names learner rank 0. The driver can abort
every wait at once (a member died: `abort`). Each error is one line (WeightGroupError). Buckets travel as flat
byte tensors, one broadcast each; the layout (names, shapes, dtypes) goes once through the store at join.
"""
from __future__ import annotations

import datetime
import time

import msgspec
import torch
import torch.distributed as dist


class WeightGroupError(RuntimeError):
    """A weight-group member that did not come or a collective that did not finish: one line naming the peer."""


class BucketLayout(msgspec.Struct, array_like=True):
    names: list[str]
    shapes: list[list[int]]
    dtype: str  # torch dtype name
    nbytes: int


def backend_for(learner_gpus: float, engine_gpus: float) -> str:
    """NCCL when both ends hold GPUs, gloo (CPU tensors) otherwise."""
    return "nccl" if learner_gpus > 0 and engine_gpus > 0 else "gloo"


class WeightGroup:
    """One member of the group: rank 0 is learner rank 0, ranks 1.. the rollout engines. `members[r]` names rank r
    in errors (e.g. "rollout actor 1"). Construction returns once every member has joined, or raises."""

    def __init__(self, host: str, port: int, rank: int, members: list[str], backend: str, timeout_s: float):
        self.rank, self.members, self.backend, self.timeout_s = rank, members, backend, timeout_s
        self.world, self.rounds = len(members), 0
        self.where = f"{members[0]} at {host}:{port}"
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            self.store = dist.TCPStore(host, port, self.world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as exc:
            raise WeightGroupError(f"weight group: {members[rank]} could not reach {self.where} within {timeout_s:g} s "
                                   f"({_first_line(exc)})") from None
        self._check_in("joined")
        prefixed = dist.PrefixStore("pg/", self.store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, self.world, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, self.world, options)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _check_in(self, what: str) -> None:
        """Every member sets `what/<rank>`; rank 0 waits for all of them (naming the ones missing), then says go, and
        only then does anyone enter the collective. A driver's abort (a member died) ends every wait at once."""
        deadline = time.time() + self.timeout_s
        if self.rank != 0:
            self.store.set(f"{what}/{self.rank}", b"1")
            self._wait(lambda: self.store.check([f"{what}/go"]), deadline, lambda: f"{self.where} did not say go ({what})")
            return
        keys = [f"{what}/{r}" for r in range(1, self.world)]

        def missing() -> list[str]:
            return [self.members[r] for r, k in zip(range(1, self.world), keys) if not self.store.check([k])]

        self._wait(lambda: not missing(), deadline, lambda: f"{', '.join(missing())} did not check in at {self.where} ({what})")
        for k in keys:
            self.store.delete_key(k)
        self.store.set(f"{what}/go", b"1")

    def _wait(self, done, deadline: float, failure) -> None:
        while not done():
            if self.store.check(["abort"]):
                raise WeightGroupError(f"weight group: aborted by the driver ({self.store.get('abort').decode()})")
            if time.time() > deadline:
                raise WeightGroupError(f"weight group: {failure()} within {self.timeout_s:g} s")
            time.sleep(0.002)

    def share_layout(self, layout: list[BucketLayout] | None) -> list[BucketLayout]:
        """Rank 0 passes the buckets' layout, every other rank gets it back."""
        if self.rank == 0:
            self.store.set("layout", msgspec.msgpack.encode(layout))
            return layout
        try:
            return msgspec.msgpack.decode(self.store.get("layout"), type=list[BucketLayout])
        except RuntimeError as exc:
            raise WeightGroupError(f"weight group: {self.where} sent no layout within {self.timeout_s:g} s ({_first_line(exc)})") from None

    def broadcast(self, buffers: list[torch.Tensor], version: int) -> None:
        """Rank 0 sends `buffers` (flat byte tensors on self.device); every other rank receives into its own."""
        self.rounds += 1  # every member counts the same rounds, so each round's keys are its own
        self._check_in(f"round-{self.rounds} (version {version})")
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        for i, buffer in enumerate(buffers):
            try:
                self.pg.broadcast([buffer], options).wait(datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                self.close()  # the other members' waits then fail at once, not after their own timeouts
                peer = self.where if self.rank != 0 else "the rollout engines"
                raise WeightGroupError(f"weight broadcast of version {version} (bucket {i + 1}/{len(buffers)}) with {peer} "
                                       f"did not finish within {self.timeout_s:g} s: {_first_line(exc)}") from None
        if self.backend == "nccl":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 (a broken group may not shut down cleanly; it is dropped either way)
            pass


def abort(host: str, port: int, reason: str) -> None:
    """From the driver: make learner rank 0 stop waiting for check-ins (a member died), so it answers again."""
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        store.set("abort", reason.encode())
    except (RuntimeError, OSError):  # the group is gone already
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
