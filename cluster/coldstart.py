"""A short supervised cold start before RL, for any model: it teaches the answer format, never the held-out answers.

`scratchpad train` runs it first when `coldstart.steps > 0` (cluster/make_model.resolve_model). Examples are
JSONL demonstrations ({"prompt", "completion"} per line, completions verbatim) or the synthetic task's worked
scratchpads from a stream of their own (seed + 2000003, lengths coldstart.min_len..max_len), with every held-out
question left out. Each is formatted exactly as the rollout actors will prompt (actors/formatting.PromptFormat: chat
template, instruction, worked examples); the loss is on the completion and the end-of-turn token only. Plain torch
AdamW in the driver process (no DeepSpeed: one process, a few minutes), fp32, with torch's threads set for the stage.
The result is cached by a hash of the source model, every cold-start setting and the prompt-format settings.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

from scratchpad.actors.formatting import PromptFormat, worked_examples
from scratchpad.actors.tasks import eval_set
from scratchpad.cluster.make_model import cache_root, collate, model_key, save_atomically
from scratchpad.common.config import ConfigError, ExperimentConfig
from scratchpad.common.records import read_json_lines

COLDSTART_VERSION = 1  # bump when the cold start's output changes for the same config
COLDSTART_SEED_OFFSET = 2000003  # apart from the training (seed) and held-out (seed + 1000003) streams
Row = tuple[list[int], list[int]]  # (prompt ids, completion ids + end of turn)


def _digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def coldstart_key(cfg: ExperimentConfig, base: str) -> str:
    """Everything that shapes the cold-started model: its source, every cold-start setting, the prompt format (the whole
    task section: it also decides the shots and which questions are held out) and the contents of the files read."""
    if cfg.model.preset or cfg.model.path:
        local = Path(base).expanduser()
        source = cfg.model.preset or (str(local.resolve()) if local.exists() else base)
    else:
        source = f"tiny:{model_key(cfg)}"
    shape = {
        "build": COLDSTART_VERSION,
        "source": source,
        "coldstart": cfg.coldstart.model_dump(),
        "task": cfg.task.model_dump(),
        "files": {f: _digest(p) for f, p in (("coldstart.path", cfg.coldstart.path), ("task.train_path", cfg.task.train_path),
                                             ("task.eval_path", cfg.task.eval_path))},
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def demonstrations(cfg: ExperimentConfig, fmt: PromptFormat) -> Iterator[tuple[str, str]]:
    """Endless (question, completion) pairs in the task's answer format, no held-out question among them."""
    cold, task = cfg.coldstart, cfg.task
    rng = random.Random(cold.seed + COLDSTART_SEED_OFFSET)
    if cold.source == "task":
        count = cold.steps * cold.batch_size
        for question, thought, answer in worked_examples(task, count, cold.seed + COLDSTART_SEED_OFFSET, *cold.lengths(task)):
            yield question, fmt.target(thought, answer)
        return
    try:
        rows = read_json_lines(cold.path, ("prompt", "completion"), "demonstrations")
    except OSError as exc:
        raise ConfigError(f"coldstart.path: cannot read {cold.path} ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"coldstart.path: {exc}") from None
    held_out = {p.text for p in eval_set(task)}
    pairs = [(str(r["prompt"]), str(r["completion"])) for _, r in rows if str(r["prompt"]) not in held_out]
    if not pairs:
        raise ConfigError(f"coldstart.path: every demonstration in {cold.path} is a held-out question")
    while True:
        rng.shuffle(pairs)
        yield from pairs


def tokenised(cfg: ExperimentConfig, fmt: PromptFormat, tokenizer, counts: dict) -> Iterator[Row]:
    """Demonstrations as the rollout would tokenise them; those longer than coldstart.max_length are left out (counted)."""
    end = fmt.end_of_turn()
    for question, completion in demonstrations(cfg, fmt):
        prompt_ids = tokenizer(fmt.render(question), add_special_tokens=not fmt.chat)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end]
        counts["seen"] += 1
        if len(prompt_ids) + len(completion_ids) > cfg.coldstart.max_length:
            counts["too_long"] += 1
            continue
        yield prompt_ids, completion_ids


def _batches(rows: Iterator[Row], size: int, steps: int) -> Iterator[list[Row]]:
    for _ in range(steps):
        batch = [row for _, row in zip(range(size), rows)]
        if len(batch) < size:
            return
        yield batch


def train_supervised(cfg: ExperimentConfig, model, rows: Iterator[Row], pad_id: int, log) -> list[float]:
    """AdamW steps with linear decay and gradient clipping at 1.0; returns the loss of each step."""
    import torch

    cold = cfg.coldstart
    optim = torch.optim.AdamW(model.parameters(), lr=cold.lr, weight_decay=cold.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - s / cold.steps)
    model.train()
    losses = []
    every = max(1, cold.steps // 10)
    for step, batch in enumerate(_batches(rows, cold.batch_size, cold.steps)):
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == cold.steps - 1:
            log(f"cold start step {step + 1}/{cold.steps} loss {losses[-1]:.3f}")
    return losses


def cold_start(cfg: ExperimentConfig, base: str, force: bool = False, log=print) -> Path:
    """The cold-started checkpoint for `base` (a model directory or hub id), trained once and cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = coldstart_key(cfg, base)
    target = cache_root(cfg) / f"coldstart-{key}"
    if (target / "build.json").exists() and not force:
        return target
    started, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(cfg.coldstart.threads)
    try:
        torch.manual_seed(cfg.coldstart.seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        fmt = PromptFormat(cfg.task, tokenizer)
        counts = {"seen": 0, "too_long": 0}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        log(f"cold start: {cfg.coldstart.steps} steps x {cfg.coldstart.batch_size} {cfg.coldstart.source} examples on {base} into {target}")
        trained = time.time()
        losses = train_supervised(cfg, model, tokenised(cfg, fmt, tokenizer, counts), pad, log)
        if len(losses) < cfg.coldstart.steps:
            raise ConfigError(f"coldstart: only {len(losses)} of {cfg.coldstart.steps} steps had examples ({counts['too_long']} of "
                              f"{counts['seen']} longer than coldstart.max_length {cfg.coldstart.max_length})")
        info = {"key": key, "base": base, "steps": len(losses), "examples": counts, "first_loss": losses[0],
                "final_loss": losses[-1], "seconds_per_step": round((time.time() - trained) / len(losses), 3),
                "seconds": round(time.time() - started, 1)}
        return save_atomically(model.eval(), tokenizer, target, info)
    finally:
        torch.set_num_threads(threads)
