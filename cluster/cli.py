"""The `scratchpad` command line. A user's mistake gets one line and exit code 2; a bug its traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from scratchpad.common.buffer import BufferFull
from scratchpad.common.config import ConfigError, dump_config, load_config
from scratchpad.cluster.jobs import DEFAULT_ADDRESS, JobError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchpad", description="Teach a language model to think before it answers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run an experiment locally (or on the Ray cluster in run.ray_address)")
    train.add_argument("config", nargs="?", help="YAML experiment, e.g. configs/quickstart.yaml (with --resume: the run's own)")
    train.add_argument("overrides", nargs="*", help="key.sub=value settings that override the YAML")
    train.add_argument("--run-dir", help="where outputs go (default runs/<name>-<time>)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    make = sub.add_parser("make-model", help="build (or find cached) the model a config starts from (tiny, preset, cold start); prints its path")
    make.add_argument("config", nargs="?", help="YAML experiment (default: built-in defaults)")
    make.add_argument("overrides", nargs="*", help="key.sub=value settings that override the YAML")
    make.add_argument("--force", action="store_true", help="rebuild even if cached")
    rm = sub.add_parser("train-rm", help="train a Bradley-Terry reward model from JSONL preference pairs {prompt, chosen, rejected}")
    rm.add_argument("config", nargs="?", help="YAML of train-rm settings (RewardModelTrainConfig), or only key=value settings")
    rm.add_argument("overrides", nargs="*", help="key=value settings, e.g. train_path=pairs.jsonl output_dir=rm steps=300")
    submit = sub.add_parser("submit", help="run an experiment as a Ray job (uploads the current directory)")
    submit.add_argument("config", help="YAML experiment inside the current directory, e.g. configs/quickstart.yaml")
    submit.add_argument("overrides", nargs="*", help="key.sub=value settings that override the YAML")
    submit.add_argument("--run-dir", help="where outputs go on the cluster's driver node (default runs/<name>-<time>, "
                        "made absolute against the current directory)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    status = sub.add_parser("status", help="RUN_DIR: a run's buffer counters and whether produced = trained + dropped + "
                            "in flight; JOB: a Ray job's status")
    status.add_argument("run_dir", metavar="RUN_DIR|JOB")
    logs = sub.add_parser("logs", help="a Ray job's logs")
    logs.add_argument("job")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = sub.add_parser("stop", help="stop a Ray job (SIGTERM: the run checkpoints after its current step)")
    stop.add_argument("job")
    ev = sub.add_parser("eval", help="held-out accuracy of a checkpoint or run: greedy, pass@k, maj@k, best-of-N, by length")
    ev.add_argument("checkpoint", help="RUN_DIR (its final/ and config.yaml), RUN_DIR/final, or any Hugging Face checkpoint directory")
    ev.add_argument("config", nargs="?", help="YAML experiment (default: the run's config.yaml, else built-in defaults)")
    ev.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. task.mode=direct rollout.temperature=0.7")
    ev.add_argument("--out", help="where eval.json and eval.png go (default RUN_DIR/eval, else runs/eval-<time>)")
    ev.add_argument("--samples", type=int, default=8, help="sampled completions per prompt at rollout.temperature (0: greedy only)")
    ev.add_argument("--k", help="comma-separated k for pass@k, maj@k and best-of-k (default 1,4,8 up to --samples, and --samples)")
    ev.add_argument("--rerank", help="reward component best-of-N picks by (default: the first answer checker)")
    ev.add_argument("--eval-size", type=int, help="held-out prompts (default task.eval_size)")
    for cmd in (submit, status, logs, stop):
        cmd.add_argument("--address", help=f"Ray dashboard address (default $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train CFG --run-dir D a.b=1`), which argparse leaves over.
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    config = getattr(args, "config", None)
    if config and "=" in config and not Path(config).exists():  # `train --resume D a.b=1`: no config, only overrides
        args.config, args.overrides = None, [config, *args.overrides]
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "make-model":
            from scratchpad.cluster.make_model import resolve_model

            cfg = load_config(args.config, args.overrides)
            if cfg.model.path and not cfg.coldstart.steps:
                raise ConfigError(f"model.path is set ({cfg.model.path}) and coldstart.steps is 0; make-model builds the tiny model, a preset or a cold start")
            print(resolve_model(cfg, force=args.force))
            return 0
        if args.command == "status":
            if Path(args.run_dir).is_dir():
                return _status(Path(args.run_dir))
            return _job_status(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "train-rm":
            return _train_rm(args)
        if args.command in ("submit", "logs", "stop"):
            return {"submit": _submit, "logs": _logs, "stop": _stop}[args.command](args)
    except (ConfigError, JobError) as err:
        print(f"scratchpad: error: {err}", file=sys.stderr)
        return 2
    except BufferFull as err:  # raised in a reward actor; Ray's wrapper keeps the original as .cause
        print(f"scratchpad: error: {getattr(err, 'cause', err)}; checkpoints and the buffer's contents are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scratchpad: interrupted; every process this run started has been stopped", file=sys.stderr)
        return 130
    return 0


def _train(args) -> int:
    if args.resume:
        from scratchpad.cluster.train import latest_checkpoint

        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        if latest_checkpoint(run_dir) is None:
            raise ConfigError(f"--resume {run_dir}: no checkpoint to resume from (set run.checkpoint_every)")
        cfg = load_config(args.config or run_dir / "config.yaml", args.overrides)
    else:
        if args.config is None:
            raise ConfigError("train: give a CONFIG, or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: exists and is not a directory")
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir}: holds a finished run; choose a new directory")
    if not args.resume and (run_dir / "run.json").exists():
        raise ConfigError(f"--run-dir {run_dir}: holds a started run; continue it with --resume {run_dir}")
    from scratchpad.cluster.preflight import preflight

    for note in preflight(cfg, run_dir, resume=bool(args.resume)):  # files and servers, before anything starts
        print(f"scratchpad: note: {note}", file=sys.stderr)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from scratchpad.cluster.train import train

    summary = train(cfg, run_dir, resume=bool(args.resume))
    print(
        f"done in {summary['wall_seconds']:.0f}s: held-out accuracy {summary['accuracy_before']:.3f} -> "
        f"{summary['accuracy_after']:.3f}; outputs in {run_dir}"
    )
    return 0


def _eval(args) -> int:
    from scratchpad.cluster.evaluate import eval_config, format_result, parse_ks, rerank_component, run_eval

    cfg, default_out = eval_config(args.checkpoint, args.config, args.overrides, args.samples, args.eval_size)
    ks, rerank = parse_ks(args.k, args.samples), rerank_component(cfg, args.rerank)
    out = Path(args.out or default_out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    result = run_eval(cfg, out, args.samples, ks, rerank, log=lambda text: print(text, file=sys.stderr))
    print(f"{cfg.model.path}: {result['evaluated']} of {result['prompts']} held-out prompts ({result['skipped']['count']} too long), "
          f"{args.samples} samples at temperature {cfg.rollout.temperature}; 95% Wilson intervals")
    print(format_result(result))
    print(f"outputs in {out} (eval.json, eval.png, greedy.jsonl)")
    return 0


def _train_rm(args) -> int:
    import tempfile

    from scratchpad.common.config import ExperimentConfig, RewardModelTrainConfig
    from scratchpad.rewards.train_rm import read_pairs, train_reward_model

    cfg = load_config(args.config, args.overrides, schema=RewardModelTrainConfig)
    pairs = {}
    for name in ("train_path", "eval_path"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"train-rm: {name}: no such file {path}")
        try:
            pairs[name] = read_pairs(path) if path else []
        except ValueError as exc:  # a malformed pairs file: one line naming file and line
            raise ConfigError(f"train-rm: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="scratchpad-rm-base-") as scratch:
        base = cfg.base_path
        if base is None:  # the tiny architecture and character tokenizer, random weights
            from scratchpad.cluster.make_model import build_random_model, build_tokenizer

            tokenizer = build_tokenizer()
            build_random_model(ExperimentConfig(model={"tiny": cfg.tiny.model_dump()}), tokenizer).save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            base = scratch
        info = train_reward_model(cfg, base, pairs["train_path"], pairs["eval_path"])
    accuracy = f", held-out pairwise accuracy {info['eval_accuracy']:.3f}" if info["eval_accuracy"] is not None else ""
    print(f"reward model saved to {cfg.output_dir} ({info['pairs']} pairs, {info['steps']} steps, {info['seconds']:.0f}s"
          f", train pairwise accuracy {info['train_accuracy']:.3f}{accuracy})")
    return 0


def _submit(args) -> int:
    from scratchpad.cluster import jobs

    cfg = load_config(args.config, args.overrides)  # a mistake is reported here, before anything is uploaded
    config = Path(args.config).absolute()
    if not config.is_relative_to(Path.cwd()):
        raise ConfigError(f"{args.config}: the config must lie inside the current directory, which is what the job uploads")
    run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    job_id, dashboard = jobs.submit(str(config.relative_to(Path.cwd())), args.overrides, str(run_dir), args.address, env)
    print(f"submitted job {job_id}")
    print(f"dashboard: {dashboard}")
    print(f"run directory (on the driver's node): {run_dir}")
    print(f"follow it: scratchpad logs {job_id} --follow; stop it: scratchpad stop {job_id}")
    return 0


def _job_status(args) -> int:
    from scratchpad.cluster import jobs

    if "/" in args.run_dir or args.run_dir.startswith("."):
        raise ConfigError(f"{args.run_dir}: no such run directory")
    info = jobs.status(args.run_dir, args.address)
    for key, value in info.items():
        print(f"{key}: {value}")
    return 1 if info["status"] == "FAILED" else 0


def _logs(args) -> int:
    from scratchpad.cluster import jobs

    try:
        jobs.logs(args.job, args.address, args.follow, lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:  # stops following; the job goes on
        return 130
    return 0


def _stop(args) -> int:
    from scratchpad.cluster import jobs

    jobs.stop(args.job, args.address)
    print(f"stop requested for job {args.job}: the run checkpoints after its current step, then exits "
          f"(`scratchpad status {args.job}` shows STOPPED)")
    return 0


def _status(run_dir: Path) -> int:
    """The run's buffer counters, read back from its Redis (the embedded one is restarted on its AOF)."""
    import json

    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer

    ident_path, cfg_path = run_dir / "run.json", run_dir / "config.yaml"
    if not ident_path.exists() or not cfg_path.exists():
        raise ConfigError(f"{run_dir}: not a run directory (no run.json or config.yaml)")
    cfg = load_config(cfg_path)
    server = None
    url = cfg.buffer.redis_url
    if url is None:
        server = EmbeddedRedis.reopen(run_dir / "redis").start()
        url = server.url
    try:
        counters = RedisBuffer(BufferAddress(url, json.loads(ident_path.read_text())["prefix"], cfg.buffer.maxlen)).counters()
    finally:
        if server is not None:
            server.stop()
    for key, value in counters.items():
        print(f"{key}: {value}")
    print(f"produced {counters['produced']} = trained {counters['trained']} + dropped {counters['dropped']} + "
          f"in flight {counters['in_flight']}: {'holds' if counters['invariant_holds'] else 'VIOLATED'}")
    return 0 if counters["invariant_holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
