"""Train a reward model from preference pairs with the Bradley-Terry loss: -log sigmoid(r(chosen) - r(rejected)).

The model is an AutoModelForSequenceClassification with one output, started from
a causal LM's backbone (a fresh linear head reads the last real token) and saved
in Hugging Face format, ready for a `reward_model` component.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from scratchpad.common.config import RewardModelTrainConfig
from scratchpad.common.records import read_json_lines


def read_pairs(path: str) -> list[dict]:
    """One {"prompt", "chosen", "rejected"} object per line; ValueError names the file and line of a bad one."""
    fields = ("prompt", "chosen", "rejected")
    return [{k: str(row[k]) for k in fields} for _, row in read_json_lines(path, fields, "preference pairs")]


def load_for_training(base_path: str, seed: int):
    """(model, tokenizer): the base's backbone under a one-output head; a pad token is set (the head needs it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    torch.manual_seed(seed)
    quiet = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a causal LM loaded as a classifier: lm_head unused and score new, by design
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    finally:
        transformers_logging.set_verbosity(quiet)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def pairwise_accuracy(model, tokenizer, pairs: list[dict], template: str, max_length: int, batch: int = 64) -> float:
    """Share of pairs scored chosen > rejected."""
    import torch

    model.eval()
    wins = 0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        with torch.no_grad():
            chosen = _scores(model, tokenizer, [template.format(prompt=p["prompt"], answer=p["chosen"]) for p in chunk], max_length)
            rejected = _scores(model, tokenizer, [template.format(prompt=p["prompt"], answer=p["rejected"]) for p in chunk], max_length)
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def _scores(model, tokenizer, texts: list[str], max_length: int):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return model(**batch).logits[:, 0]


def train_reward_model(cfg: RewardModelTrainConfig, base_path: str, pairs: list[dict], held_out: list[dict], log=print) -> dict:
    """Bradley-Terry training; saves model and tokenizer to cfg.output_dir and returns what happened."""
    import torch
    import torch.nn.functional as F

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    model, tokenizer = load_for_training(base_path, cfg.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - s / cfg.steps)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses = []
    fill = cfg.input_template.format
    for step in range(cfg.steps):
        model.train()
        if len(order) < cfg.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        chunk = [pairs[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        texts = [fill(prompt=p["prompt"], answer=p["chosen"]) for p in chunk] + [fill(prompt=p["prompt"], answer=p["rejected"]) for p in chunk]
        scores = _scores(model, tokenizer, texts, cfg.max_length)
        loss = -F.logsigmoid(scores[: len(chunk)] - scores[len(chunk):]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"train-rm step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "pairs": len(pairs),
        "steps": cfg.steps,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_accuracy": pairwise_accuracy(model, tokenizer, pairs[:512], cfg.input_template, cfg.max_length),
        "eval_accuracy": pairwise_accuracy(model, tokenizer, held_out, cfg.input_template, cfg.max_length) if held_out else None,
        "seconds": round(time.time() - started, 1),
        "input_template": cfg.input_template,
    }
    (out / "train_rm.json").write_text(json.dumps(info, indent=2))
    return info
