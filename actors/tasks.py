"""Tasks that feed prompts: the seeds' array access, multi-digit addition, and JSONL files.

A task yields `Prompt` records (question + reference answer). Only the answer is
ever checked; `worked_thought` gives a correct scratchpad for the supervised warm
start of the tiny model and nothing else.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from scratchpad.common.config import TaskConfig
from scratchpad.common.records import Prompt, read_json_lines

EVAL_SEED_OFFSET = 1000003  # the held-out stream never shares a seed with training


def array_access(rng: random.Random, min_len: int, max_len: int) -> tuple[str, str, dict]:
    """`A=[3,8,1,5] i=2` -> `1`: an array of one-digit numbers and an index into it."""
    length = rng.randint(min_len, max_len)
    values = [rng.randint(0, 9) for _ in range(length)]
    index = rng.randrange(length)
    question = f"A=[{','.join(map(str, values))}] i={index}"
    return question, str(values[index]), {"length": length, "index": index}


def addition(rng: random.Random, min_len: int, max_len: int) -> tuple[str, str, dict]:
    """`12+39` -> `51`: two operands of min_len..max_len digits."""
    length = rng.randint(min_len, max_len)
    a = rng.randint(10 ** (length - 1) if length > 1 else 0, 10**length - 1)
    b = rng.randint(10 ** (length - 1) if length > 1 else 0, 10**length - 1)
    return f"{a}+{b}", str(a + b), {"length": length}


GENERATORS = {"array_access": array_access, "addition": addition}


def worked_thought(task: str, question: str) -> str:
    """A correct scratchpad for a synthetic question (warm-start data only; never used as a reward)."""
    if task == "array_access":
        values = question.split("[", 1)[1].split("]", 1)[0].split(",")
        index = int(question.rsplit("i=", 1)[1])
        return " ".join(f"{k}:{values[k]}" for k in range(index + 1))
    if task == "addition":
        a, b = question.split("+")
        width = max(len(a), len(b))
        a, b = a.zfill(width), b.zfill(width)
        carry, steps = 0, []
        for da, db in zip(reversed(a), reversed(b)):
            total = int(da) + int(db) + carry
            steps.append(f"{da}+{db}+{carry}={total}")
            carry = total // 10
        return " ".join(steps)
    raise ValueError(f"no worked scratchpad for task {task!r}")


def _synthetic(cfg: TaskConfig, seed: int, prefix: str) -> Iterator[Prompt]:
    rng = random.Random(seed)
    make = GENERATORS[cfg.name]
    index = 0
    while True:
        question, answer, meta = make(rng, cfg.min_len, cfg.max_len)
        yield Prompt(prompt_id=f"{prefix}-{seed}-{index}", text=question, answer=answer, meta=meta)
        index += 1


def read_jsonl(path: str | Path) -> list[Prompt]:
    """One {"prompt": ..., "answer": ...} object per line; no reasoning traces are needed."""
    prompts = []
    for lineno, row in read_json_lines(path, ("prompt", "answer"), "prompts"):
        meta = {k: v for k, v in row.items() if k not in ("prompt", "answer") and isinstance(v, (str, int, float, bool))}
        prompts.append(Prompt(prompt_id=f"{Path(path).stem}-{lineno}", text=str(row["prompt"]), answer=str(row["answer"]), meta=meta))
    return prompts


def train_stream(cfg: TaskConfig) -> Iterator[Prompt]:
    """Endless training prompts: fresh synthetic ones, or a JSONL file shuffled each epoch."""
    if cfg.name != "jsonl":
        yield from _synthetic(cfg, cfg.seed, "train")
        return
    rows = read_jsonl(cfg.train_path)
    rng = random.Random(cfg.seed)
    epoch = 0
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in order:
            row = rows[i]
            yield Prompt(prompt_id=f"{row.prompt_id}-e{epoch}", text=row.text, answer=row.answer, meta=row.meta)
        epoch += 1


def eval_set(cfg: TaskConfig) -> list[Prompt]:
    """The held-out prompts: a fixed synthetic sample, or the eval JSONL file."""
    if cfg.name == "jsonl":
        rows = read_jsonl(cfg.eval_path) if cfg.eval_path else []
        return rows[: cfg.eval_size]
    stream = _synthetic(cfg, cfg.seed + EVAL_SEED_OFFSET, "eval")
    return [next(stream) for _ in range(cfg.eval_size)]
