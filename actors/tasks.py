"""Tasks that feed prompts: the seeds' array access, multi-digit addition, and JSONL files.

A task yields `Prompt` records (question + reference answer). Only the answer is
ever checked; `worked_thought` gives a correct scratchpad for the supervised warm
start of the tiny model and nothing else.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

from scratchpad.common.config import TaskConfig
from scratchpad.common.records import JsonLines, Prompt, scan_json_lines

EVAL_SEED_OFFSET = 1000003  # the held-out stream never shares a seed with training
PROMPT_KINDS = {"prompt": (str,), "answer": (str, int, float)}  # a row's required fields and the JSON types they may have
Keep = Callable[[Prompt], bool]  # which prompts a run may use (preflight's fits_model: those the model has room for)


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


def _synthetic(cfg: TaskConfig, seed: int, prefix: str, lengths: tuple[int, int] | None = None) -> Iterator[Prompt]:
    rng = random.Random(seed)
    make = GENERATORS[cfg.name]
    low, high = lengths or (cfg.min_len, cfg.max_len)
    index = 0
    while True:
        question, answer, meta = make(rng, low, high)
        yield Prompt(prompt_id=f"{prefix}-{seed}-{index}", text=question, answer=answer, meta=meta)
        index += 1


def load_jsonl(path: str | Path, max_bad_rows: float = 0.0) -> tuple[list[Prompt], JsonLines]:
    """The prompts of a JSONL file and the scan that found them (bad lines and why). Bad lines are skipped while at
    most `max_bad_rows` of the lines are bad; more is a ValueError naming the file, the count and the first one."""
    scan = scan_json_lines(path, PROMPT_KINDS).check(max_bad_rows, "prompts", "task.max_bad_rows")
    prompts = []
    for lineno, row in scan.rows:
        meta = {k: v for k, v in row.items() if k not in PROMPT_KINDS and isinstance(v, (str, int, float, bool))}
        prompts.append(Prompt(prompt_id=f"{Path(path).stem}-{lineno}", text=row["prompt"], answer=str(row["answer"]), meta=meta))
    return prompts, scan


def read_jsonl(path: str | Path, max_bad_rows: float = 0.0) -> list[Prompt]:
    """One {"prompt": ..., "answer": ...} object per line; no reasoning traces are needed."""
    return load_jsonl(path, max_bad_rows)[0]


def train_stream(cfg: TaskConfig, keep: Keep | None = None) -> Iterator[Prompt]:
    """Endless training prompts: fresh synthetic ones, or a JSONL file shuffled each epoch; with `keep`, only the
    prompts it accepts (the others are skipped, and preflight has counted them). Synthetic prompts span
    train_min_len..train_max_len (default: the held-out set's min_len..max_len)."""
    if cfg.name != "jsonl":
        yield from (p for p in _synthetic(cfg, cfg.seed, "train", cfg.train_lengths) if keep is None or keep(p))
        return
    rows = [p for p in read_jsonl(cfg.train_path, cfg.max_bad_rows) if keep is None or keep(p)]
    rng = random.Random(cfg.seed)
    epoch = 0
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in order:
            row = rows[i]
            yield Prompt(prompt_id=f"{row.prompt_id}-e{epoch}", text=row.text, answer=row.answer, meta=row.meta)
        epoch += 1


def eval_set(cfg: TaskConfig, keep: Keep | None = None) -> list[Prompt]:
    """The held-out prompts: a fixed synthetic sample, or the eval JSONL file; with `keep`, only those it accepts."""
    if cfg.name == "jsonl":
        rows = read_jsonl(cfg.eval_path, cfg.max_bad_rows) if cfg.eval_path else []
    else:
        stream = _synthetic(cfg, cfg.seed + EVAL_SEED_OFFSET, "eval")
        rows = [next(stream) for _ in range(cfg.eval_size)]
    return [p for p in rows if keep is None or keep(p)][: cfg.eval_size]
