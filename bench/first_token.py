"""Greedy held-out accuracy of a model as it is, and with the completion's first token forced to think or to answer.

    python bench/first_token.py MODEL_DIR [MODEL_DIR ...] [--config configs/quickstart.yaml] [--set key=value ...]

Splits a policy's accuracy into what it would get by always thinking and by always answering at once: on the
quickstart, the difference between "as is" and "forced <think>" is what learning when to think can add.
"""
from __future__ import annotations

import argparse
import json

from scratchpad.actors.formatting import ANSWER_OPEN, THINK_OPEN, parse_completion
from scratchpad.actors.rollout import RolloutWorker
from scratchpad.actors.tasks import eval_set
from scratchpad.common.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Hugging Face model directories (e.g. a run's final/ or a cached tiny model)")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="config whose task and rollout settings to use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. task.max_len=14 (repeatable)")
    args = parser.parse_args()
    cfg = load_config(args.config, ["run.threads_per_actor=2", *args.set])
    held_out = eval_set(cfg.task)
    for path in args.models:
        worker = RolloutWorker(cfg, path)
        tok = worker.tokenizer
        row = {"model": path}
        for name, prefix in (("as_is", ""), ("forced_think", THINK_OPEN), ("forced_answer", ANSWER_OPEN)):
            ids = [tok(worker.format(p) + prefix, add_special_tokens=not worker.chat)["input_ids"] for p in held_out]
            samples = worker.engine.generate(ids, 1, 0.0, 1.0, cfg.rollout.max_new_tokens)
            answers = [parse_completion(prefix + tok.decode(s[0].token_ids, skip_special_tokens=True))[1] for s in samples]
            row[name] = sum(a == p.answer for a, p in zip(answers, held_out)) / len(held_out)
        print(json.dumps(row), flush=True)
        del worker


if __name__ == "__main__":
    main()
