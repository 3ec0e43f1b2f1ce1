"""Checks that need files or servers but no cluster, run by `scratchpad train` once the config has loaded and before
Ray, Redis, the tiny model's build or any actor starts, so a bad input costs seconds and one line, not a traceback
minutes into the run. Config-only rules live in common/config.py (`_check_consistency`); these read the world:

- the external Redis (`buffer.redis_url`) answers a PING with the given credentials, within seconds;
- on `--resume`, the checkpoint was written by a config of the same shape (model, algorithm, ranks, ZeRO stage,
  critic): the fingerprint stored beside it in RUN_DIR/checkpoints/fingerprint.json must match;
- the model directory (or hub id) holds a config and a tokenizer, and its positions leave room for
  `rollout.max_new_tokens`;
- the prompt files read, with at most `task.max_bad_rows` bad lines (skipped and counted), and some prompt fits the
  model with room for `rollout.max_new_tokens` (the others are counted; `fits_model` is the filter that leaves them out).

What it counted goes to RUN_DIR/preflight.json and, as notes, to the user.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from scratchpad.actors.formatting import PromptFormat
from scratchpad.actors.tasks import Keep, eval_set, load_jsonl
from scratchpad.common.buffer import BufferUnreachable, probe
from scratchpad.common.config import MODEL_KINDS, ROLLOUT_CONTEXT_CAP, ConfigError, ExperimentConfig, load_config
from scratchpad.common.records import Prompt

FINGERPRINT = "fingerprint.json"  # in RUN_DIR/checkpoints: travels with the checkpoints
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "org/name" or "name"; anything else is meant as a local path


class ModelInfo(NamedTuple):
    tokenizer: Any  # the tokenizer the rollout actors will load
    positions: int | None  # context the rollout engine gets (max_position_embeddings, capped for vLLM); None: unknown
    source: str  # where the positions come from, for messages: "model.tiny.max_positions 256"


def preflight(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> list[str]:
    """Every check, cheapest first; ConfigError (one line) at the first failure. Returns notes for the user (lines
    skipped, prompts too long) and writes RUN_DIR/preflight.json and the checkpoint fingerprint."""
    if cfg.buffer.redis_url is not None:
        try:
            probe(cfg.buffer.redis_url)
        except BufferUnreachable as exc:
            raise ConfigError(f"buffer.redis_url: {exc}") from None
    if resume:
        check_fingerprint(cfg, run_dir)
    check_component_models(cfg)
    if cfg.model.path is not None:
        _check_directory("model.path", cfg.model.path, tokenizer=True)
    prompt_sets = read_prompts(cfg)  # before the tokenizer: a bad file is reported without importing transformers
    model = inspect_model(cfg)  # checks that rollout.max_new_tokens leaves room in the model's positions
    counts = count_prompts(cfg, model, prompt_sets)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / FINGERPRINT).write_text(json.dumps(fingerprint(cfg), indent=2))
    (run_dir / "preflight.json").write_text(json.dumps({"positions": model.positions, "prompts": counts}, indent=2))
    return [note for field, c in counts.items() for note in _notes(field, c)]


def _notes(field: str, c: dict) -> list[str]:
    notes = []
    if c["bad_lines"]:
        notes.append(f"{field}: skipped {c['bad_lines']} bad of {c['lines']} lines in {c['path']} (first: {c['first_bad']})")
    if c["too_long"]:
        notes.append(f"{field}: {c['too_long']} of {c['prompts']} prompts leave no room for rollout.max_new_tokens "
                     f"in the model's positions and are left out")
    return notes


# ---- resume: the checkpoint must come from a config of the same shape --------------------------------------------

def fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fields that shape a checkpoint: loading one written under other values fails or silently mismatches."""
    shape = {"model.path": cfg.model.path, "model.preset": cfg.model.preset, "model.dtype": cfg.model.dtype, "learner.algorithm": cfg.learner.algorithm,
             "learner.ranks": cfg.learner.ranks, "learner.zero_stage": cfg.learner.zero_stage,
             "critic": cfg.learner.algorithm == "ppo"}
    if cfg.model.path is None and cfg.model.preset is None:
        shape |= {f"model.tiny.{k}": v for k, v in cfg.model.tiny.model_dump().items()}
    if cfg.coldstart.steps:  # the reference policy (KL) is the cold-started model: another cold start is another reference
        shape |= {f"coldstart.{k}": v for k, v in cfg.coldstart.model_dump(exclude={"threads"}).items()}
    return shape


def check_fingerprint(cfg: ExperimentConfig, run_dir: Path) -> None:
    """The stored fingerprint (or, for a run from before fingerprints, that of the run's config.yaml) against cfg's."""
    stored_path = run_dir / "checkpoints" / FINGERPRINT
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else fingerprint(load_config(run_dir / "config.yaml"))
    current = fingerprint(cfg)
    differ = [f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if differ:
        raise ConfigError(f"--resume {run_dir}: its checkpoint was written with another config; differing: {', '.join(differ)}")


# ---- models: files, tokenizer, positions -------------------------------------------------------------------------

def _local(path: str) -> Path | None:
    """The directory a model path names, or None for a hub id that is not a local directory."""
    local = Path(path).expanduser()
    if local.exists() or not _HUB_ID.match(path):
        return local
    return None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (None when it can): one TCP connect with a short timeout, where
    transformers would retry for over a minute before it gives up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached: {exc.strerror or exc}"
    return None


def _check_hub_id(field: str, repo: str) -> bool:
    """A hub id must be in the local cache or on a reachable hub; True when it is to be read from the cache only."""
    from huggingface_hub import try_to_load_from_cache

    why = _hub_unreachable()
    cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    if why is not None and not cached:
        raise ConfigError(f"{field}: {repo}: no such local directory, not in the Hugging Face cache, and {why}")
    return why is not None


def _check_directory(field: str, path: str, tokenizer: bool) -> None:
    local = _local(path)
    if local is None:
        _check_hub_id(field, path)
        return
    if not local.is_dir():
        raise ConfigError(f"{field}: {path}: no such model directory")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{field}: {path} has no config.json (not a Hugging Face model directory)")
    if tokenizer and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{field}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def check_component_models(cfg: ExperimentConfig) -> None:
    """Reward components with a model of their own (likelihood, reward model, judge) name a model directory."""
    for c in cfg.reward.resolved_components():
        if c.kind in MODEL_KINDS and c.model_path:
            _check_directory(f"reward.components {c.name}: model_path", c.model_path, tokenizer=True)


def _positions(declared: int | None, source: str, cfg: ExperimentConfig) -> tuple[int | None, str]:
    """(positions the rollout engine gets, where they come from): vLLM's context is capped."""
    if declared is None or cfg.rollout.engine != "vllm" or declared <= ROLLOUT_CONTEXT_CAP:
        return declared, f"{source} {declared}"
    return ROLLOUT_CONTEXT_CAP, f"{source} {declared}, capped at {ROLLOUT_CONTEXT_CAP} for vLLM"


def _declared_positions(config: dict) -> int | None:
    return next((config[k] for k in ("max_position_embeddings", "n_positions") if isinstance(config.get(k), int)), None)


def inspect_model(cfg: ExperimentConfig) -> ModelInfo:
    """The policy's tokenizer and positions: the tiny model's are known without building it. A local directory's
    positions are read from its config.json, and checked, before transformers is imported (seconds on a small machine)."""
    if cfg.model.path is None and cfg.model.preset is not None:
        return ModelInfo(None, None, f"model.preset {cfg.model.preset}")  # built later: train checks it with its path
    if cfg.model.path is None:
        from scratchpad.cluster.make_model import build_tokenizer

        return ModelInfo(build_tokenizer(), *_positions(cfg.model.tiny.max_positions, "model.tiny.max_positions", cfg))  # checked at load
    path, local = cfg.model.path, _local(cfg.model.path)
    if local is not None:
        try:
            declared = _declared_positions(json.loads((local / "config.json").read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: {local / 'config.json'}: not a readable JSON config ({exc})") from None
        check_positions(cfg, ModelInfo(None, *_positions(declared, f"{path}/config.json max_position_embeddings", cfg)))
    cache_only = local is None and _check_hub_id("model.path", path)  # offline with a cached copy: no minute of retries
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=cache_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=cache_only)
    except (OSError, ValueError, KeyError) as exc:  # a hub id that is not there, a config or tokenizer that does not load
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.path: {path}: cannot load its config and tokenizer ({first})") from None
    declared = _declared_positions({k: getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")})
    model = ModelInfo(tokenizer, *_positions(declared, f"{path}/config.json max_position_embeddings", cfg))
    check_positions(cfg, model)
    return model


def check_positions(cfg: ExperimentConfig, model: ModelInfo) -> None:
    if model.positions is not None and cfg.rollout.max_new_tokens >= model.positions:
        raise ConfigError(f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no room for a prompt in the model's "
                          f"{model.positions} positions ({model.source})")


# ---- prompts: bad lines and prompts too long ---------------------------------------------------------------------

def prompt_lengths(tokenizer, prompts: list[Prompt], task) -> list[int]:
    """Tokens of each prompt as the rollout actors format it (actors/rollout.py: the chat template with no added
    specials, or the plain prompt with BOS)."""
    if not prompts:
        return []
    fmt = PromptFormat(task, tokenizer)  # the system prompt and few-shot examples count too
    texts = [fmt.render(p.text) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=not fmt.chat)["input_ids"]]


def fits_model(cfg: ExperimentConfig, model: ModelInfo) -> Keep:
    """The prompts with room for rollout.max_new_tokens after them in the model's positions."""
    if model.positions is None:
        return lambda prompt: True
    room, fmt = model.positions - cfg.rollout.max_new_tokens, PromptFormat(cfg.task, model.tokenizer)
    return lambda prompt: len(model.tokenizer(fmt.render(prompt.text), add_special_tokens=not fmt.chat)["input_ids"]) <= room


def read_prompts(cfg: ExperimentConfig) -> dict[str, tuple[str, list[Prompt], Any]]:
    """field -> (path, prompts, scan) for each prompt file (or the synthetic held-out sample)."""
    task, sets = cfg.task, {}
    if task.name != "jsonl":
        return {"task": (f"{task.name} held-out sample", eval_set(task), None)}
    for field in ("train_path", "eval_path"):
        path = getattr(task, field)
        try:
            prompts, scan = load_jsonl(path, task.max_bad_rows)
        except OSError as exc:
            raise ConfigError(f"task.{field}: cannot read {path} ({exc.strerror})") from None
        except ValueError as exc:
            raise ConfigError(f"task.{field}: {exc}") from None
        sets[f"task.{field}"] = (path, prompts, scan)
    return sets


def count_prompts(cfg: ExperimentConfig, model: ModelInfo, prompt_sets: dict) -> dict[str, dict]:
    """Counts per prompt file: lines, bad lines (skipped), prompts, prompts too long (left out). ConfigError when no
    prompt of a file fits."""
    counts = {}
    for field, (path, prompts, scan) in prompt_sets.items():
        lengths = prompt_lengths(model.tokenizer, prompts, cfg.task) if model.tokenizer is not None else []
        room = None if model.positions is None else model.positions - cfg.rollout.max_new_tokens
        too_long = 0 if room is None else sum(n > room for n in lengths)
        if prompts and too_long == len(prompts):
            raise ConfigError(f"{field}: every prompt in {path} is too long: the shortest is {min(lengths)} tokens, and the model's "
                              f"{model.positions} positions less rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leave {room}")
        first = f"line {scan.bad[0][0]}: {scan.bad[0][1]}" if scan is not None and scan.bad else None
        counts[field] = {"path": str(path), "lines": scan.lines if scan is not None else len(prompts),
                         "bad_lines": len(scan.bad) if scan is not None else 0, "first_bad": first, "prompts": len(prompts),
                         "too_long": too_long, "longest_prompt_tokens": max(lengths, default=0)}
    return counts
