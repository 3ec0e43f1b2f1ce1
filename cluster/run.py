"""Starting and stopping a run's processes: Redis, Ray, and the rollout, reward and learner actors.

`Cluster` owns everything it starts and stops exactly that, in reverse order,
also after Ctrl-C or SIGTERM: no redis-server, Ray or vLLM process outlives it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path

import ray

from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer
from scratchpad.common.config import ExperimentConfig
from scratchpad.cluster.metrics import RayMetrics
from scratchpad.cluster.pipeline import RunHalted, get_or_stall
from scratchpad.cluster.placement import model_role, release, reserve, strategy


def actor_env(cfg: ExperimentConfig, role: str = "") -> dict[str, str]:
    """Environment for a role's actors: thread counts that fit its CPUs (run.cores), vLLM's in-process engine."""
    threads = str(cfg.run.threads_for(role))
    return {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.rollout.kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if cfg.learner.num_gpus == 0 else "cuda"),
        # DeepSpeed JIT-builds its CPU comm op into torch's extension cache; two installs sharing one cache
        # (different include paths) rebuild it in turn, minutes each on 2 cores. One cache per install.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(
            Path.home() / ".cache" / "scratchpad" / "torch_extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])),
        "PYTHONWARNINGS": "ignore",
    }


def _where(worker) -> tuple[str, int]:
    return ray.util.get_node_ip_address(), os.getpid()


def pin(actors: list, cores: list[int]) -> None:
    """Pin every thread of each actor's process (on this node) to `cores`; threads it starts later inherit the mask."""
    here = ray.util.get_node_ip_address()
    for node, pid in ray.get([a.__ray_call__.remote(_where) for a in actors], timeout=60):
        if node != here:
            continue  # another node's cores are its own business: run.cores describes one machine
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass


def _rendezvous() -> tuple[str, int]:
    """(IP address, free TCP port) of the node this task runs on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


def run_identity(run_dir: Path, name: str) -> dict:
    """A run's stable identity (key prefix), kept in run.json so a resumed run finds its buffer again."""
    path = run_dir / "run.json"
    if path.exists():
        return json.loads(path.read_text())
    ident = {"run_id": f"{name}-{uuid.uuid4().hex[:8]}"}
    ident["prefix"] = f"sp:{ident['run_id']}:"
    path.write_text(json.dumps(ident, indent=2))
    return ident


class Cluster:
    """The run's processes. Use as a context manager; everything started is stopped on exit."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, model_path: str, resume_from: str | None = None):
        self.cfg, self.run_dir, self.model_path, self.resume_from = cfg, run_dir, model_path, resume_from
        self.redis: EmbeddedRedis | None = None
        self.started_ray = False
        self.actors: list = []
        self.learners: list = []
        self.evaluator = None
        self.placement = None
        self.weight_group: tuple[str, int] | None = None  # (host, port) of the weight group while it is whole
        self.stop_requested = threading.Event()  # set by the first SIGTERM/Ctrl-C: finish the step, checkpoint, stop
        self.previous_handlers: dict = {}

    def _request_stop(self, signum, frame) -> None:
        """First SIGTERM (as `ray job stop` sends) or Ctrl-C: stop after the current step, so the checkpoint and
        the run's records agree. A second one interrupts at once."""
        if self.stop_requested.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        self.stop_requested.set()

    def __enter__(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        cfg = self.cfg
        ident = run_identity(self.run_dir, cfg.name)
        url = cfg.buffer.redis_url
        if url is None:
            directory = self.run_dir / "redis"
            # A run directory that already has a server (a resumed run) gets it back: same password, same AOF.
            self.redis = (EmbeddedRedis.reopen(directory) if (directory / "redis.conf").exists()
                          else EmbeddedRedis(directory, cfg.buffer.appendfsync)).start().watch()
            url = self.redis.url
        self.address = BufferAddress(url=url, prefix=ident["prefix"], maxlen=cfg.buffer.maxlen, put_timeout_s=cfg.buffer.put_timeout_s)
        self.buffer = RedisBuffer(self.address)
        self.buffer.ensure_group()
        if not ray.is_initialized():
            if cfg.run.ray_address or os.environ.get("RAY_ADDRESS"):
                # A named cluster, or the one a `ray job submit` driver runs in (Ray sets RAY_ADDRESS there).
                ray.init(address=cfg.run.ray_address or os.environ["RAY_ADDRESS"], log_to_driver=True)
            else:
                ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=True)
                self.started_ray = True
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
                self.previous_handlers[signum] = signal.signal(signum, self._request_stop)
        self.metrics = RayMetrics(ident["run_id"])
        self._start_actors()

    def _start_actors(self) -> None:
        from scratchpad.actors.rollout import RolloutWorker
        from scratchpad.rewards.scoring import RewardWorker

        cfg = self.cfg
        env, rollout_env = {"env_vars": actor_env(cfg)}, {"env_vars": actor_env(cfg, "rollout")}
        restarts = {"max_restarts": cfg.run.max_restarts}  # Ray restarts a dead rollout or reward actor; the loop reissues its work
        self.placement, index = reserve(cfg)  # fails fast, with what is missing, if the cluster cannot hold the run
        rollout_cls = ray.remote(RolloutWorker)
        self.rollouts = [
            rollout_cls.options(num_cpus=cfg.rollout.cpus_per_engine, num_gpus=cfg.rollout.gpus_per_engine, runtime_env=rollout_env, **restarts,
                                **strategy(self.placement, index, "rollout engine", i)).remote(cfg, self.model_path, i)
            for i in range(cfg.rollout.num_engines)
        ]
        # The held-out evaluation's own engine: reserves nothing, so it runs beside the others (on the eval cores).
        self.evaluator = rollout_cls.options(num_cpus=0, num_gpus=0, runtime_env={"env_vars": actor_env(cfg, "eval")}, **restarts).remote(
            cfg, self.model_path, cfg.rollout.num_engines) if cfg.run.eval_actor else None
        self.reward_models = self._start_reward_models(env, index)
        self.rewarders = [
            ray.remote(RewardWorker).options(num_cpus=cfg.reward.cpus_per_actor, runtime_env=env, max_pending_calls=cfg.reward.max_pending,
                                             **restarts, **strategy(self.placement, index, "reward actor", i)).remote(
                cfg.reward, self.address, cfg.rollout.max_new_tokens, self.reward_models, self.model_path)
            for i in range(cfg.reward.num_actors)
        ]
        self.eval_rewarder = ray.remote(RewardWorker).options(num_cpus=0, runtime_env=env, **restarts).remote(
            cfg.reward, self.address, cfg.rollout.max_new_tokens, self.reward_models, self.model_path)  # scores held-out evaluations only
        self.index = index
        self.learners = self.start_learners(self.resume_from)
        self.actors = [*self.rollouts, *([self.evaluator] if self.evaluator else []), *self.reward_models.values(), *self.rewarders,
                       self.eval_rewarder]
        get_or_stall([a.__ray_ready__.remote() for a in self.actors], cfg.run.startup_timeout_s, "start-up",
                     "the rollout and reward actors", "run.startup_timeout_s")
        self.pin_roles(("rollout", "reward", "eval"))

    def start_learners(self, resume_from: str | None) -> list:
        """The learner ranks (again, after a crash: from the checkpoint `resume_from`), ready and pinned."""
        from scratchpad.learner.learner import Learner

        cfg = self.cfg
        # torch.distributed's rendezvous (gloo on CPU, NCCL on GPU) listens on rank 0's node: ask that bundle for its
        # address and a free port there, so the ranks may span nodes.
        addr, port = ray.get(ray.remote(_rendezvous).options(num_cpus=0, **strategy(self.placement, self.index, "learner", 0)).remote(),
                             timeout=cfg.run.placement_timeout_s)
        self.learners = [
            ray.remote(Learner).options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus,
                                        runtime_env={"env_vars": actor_env(cfg, "learner")},
                                        **strategy(self.placement, self.index, "learner", rank)).remote(
                cfg, self.model_path, self.address, rank, cfg.learner.ranks, port, resume_from, addr)
            for rank in range(cfg.learner.ranks)
        ]
        self.learner = self.learners[0]  # publishes weights and writes the final model
        get_or_stall([a.__ray_ready__.remote() for a in self.learners], cfg.run.startup_timeout_s, "start-up",
                     "the learner ranks", "run.startup_timeout_s")
        self.pin_roles(("learner",))
        return self.learners

    def publish_weights(self):
        """One object-store put of the learner's weights (rank 0's return value), for every reader. Every rank is
        called: under ZeRO-3 gathering them is a collective."""
        published, *others = [rank.weights.remote() for rank in self.learners]
        get_or_stall(others, self.cfg.run.stall_timeout_s, "publish", "the learner")
        return published

    def form_weight_group(self) -> None:
        """learner.weight_transport collective: learner rank 0 and every rollout actor (re)join a weight group of
        their own (common/weight_group.py), on a fresh port on rank 0's node."""
        from scratchpad.common.weight_group import backend_for

        cfg = self.cfg
        self.weight_group = None
        host, port = ray.get(ray.remote(_rendezvous).options(num_cpus=0, **strategy(self.placement, self.index, "learner", 0)).remote(),
                             timeout=cfg.run.placement_timeout_s)
        members = ["learner rank 0", *[f"rollout actor {i}" for i in range(len(self.rollouts))]]
        backend, timeout = backend_for(cfg.learner.num_gpus, cfg.rollout.gpus_per_engine), cfg.learner.weight_timeout_s
        calls = [rank.join_weight_group.remote(host, port, members, backend, timeout) for rank in self.learners]
        calls += [actor.join_weight_group.remote(host, port, i + 1, members, backend, timeout) for i, actor in enumerate(self.rollouts)]
        try:
            get_or_stall(calls, timeout + 30, "weight group", "the learner and the rollout actors", "learner.weight_timeout_s")
        except ray.exceptions.RayTaskError as exc:  # a WeightGroupError: one line naming the member that did not come
            raise RunHalted(str(getattr(exc, "cause", None) or exc).splitlines()[0]) from None
        self.weight_group = (host, port)

    def restart_learners(self, resume_from: str) -> None:
        """A learner rank died: stop every rank (a process group cannot lose a member) and start them from a checkpoint."""
        for rank in self.learners:
            try:
                ray.kill(rank)
            except Exception:  # already dead
                pass
        self.start_learners(resume_from)

    def pin_roles(self, roles: tuple[str, ...]) -> None:
        """Apply run.cores to these roles' processes (again after Ray restarts one: a new process is not pinned)."""
        if not self.cfg.run.cores:
            return
        by_role = {"rollout": self.rollouts, "learner": self.learners, "reward": self.rewarders,
                   "eval": [a for a in (self.evaluator, self.eval_rewarder) if a is not None]}
        for role in roles:
            cores = self.cfg.run.cores.get(role) or (self.cfg.run.cores.get("rollout") if role == "eval" else None)
            if cores:
                pin(by_role[role], cores)

    def _start_reward_models(self, env: dict, index: dict) -> dict:
        """One Ray actor per model component (likelihood LM, reward model, judge engine), shared by every reward actor."""
        from scratchpad.common.config import MODEL_KINDS
        from scratchpad.actors.judge_engine import JudgeEngine
        from scratchpad.rewards.models import ModelScorer

        started = {}
        for c in self.cfg.reward.resolved_components():
            if c.kind == "judge":
                started[c.name] = ray.remote(JudgeEngine).options(num_cpus=c.num_cpus, num_gpus=c.num_gpus, runtime_env=env,
                                                                  **strategy(self.placement, index, model_role(c), 0)).remote(
                    c, self.model_path, self.cfg.model.dtype, 0, self.cfg.run.threads_per_actor)
            elif c.kind in MODEL_KINDS:
                started[c.name] = ray.remote(ModelScorer).options(num_cpus=c.num_cpus, runtime_env=env,
                                                                  **strategy(self.placement, index, model_role(c), 0)).remote(
                    c, self.model_path, self.cfg.run.threads_per_actor)
        return started

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
        for actor in [*self.actors, *self.learners]:
            try:
                ray.kill(actor)
            except Exception:  # already dead: nothing left to stop
                pass
        self.actors, self.learners = [], []
        if self.placement is not None:
            release(self.placement)
            self.placement = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
