"""The learner's train phase against a bare PyTorch step on the same batch: where the time beyond the arithmetic goes.

    python bench/learner_step.py [CONFIG] [--steps 12] [--threads 2] [--profile] [--prompt-len 24 34]
                                 [--completion-len 12 80] [KEY=VALUE ...]

Both sides run in this process, one after the other, alternating, on the same model (the config's model, built or
taken from the cache), the same batch shape as CONFIG's step (prompts_per_step x n traces, prompt and completion
lengths drawn like the quickstart's) and the same thread count:
- ours: `Learner.fill_batch` + `Learner.train` (DeepSpeed engine, batch assembly from Redis, chunked log p, entropy,
  the clipped loss, statistics), with the embedded Redis holding the groups;
- bare: one forward of the HF model on the padded batch, log-softmax gather of the completion tokens, the same
  token-mean clipped loss, backward, grad clip, AdamW step.
Reports the median seconds of each, and with --profile the top of a cProfile of ours. Ends with one JSON line
(`learner_over_bare`: ours over bare, median of per-pair ratios).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import ROOT, provenance  # noqa: E402
from test_learner_equivalence import synthetic_groups  # noqa: E402  (the learner tests' batch, at quickstart lengths here)


def bare_step(model, optim, batch, n: int, clip: float, eps_low: float, eps_high: float):
    """Forward over the padded batch, log p of the completion tokens, token-mean clipped surrogate, backward, step."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention"]).logits
    pos = batch["starts"].unsqueeze(1) - 1 + torch.arange(batch["targets"].shape[1]).unsqueeze(0)
    pos = pos.clamp(max=logits.shape[1] - 1)
    picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    logp = torch.log_softmax(picked, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    mask = batch["mask"]
    rewards = batch["rewards"].view(-1, n)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1, 1)
    ratio = torch.exp(logp - batch["old_logp"])
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    loss = (loss * mask).sum() / mask.sum()
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optim.step()
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(24, 34), metavar=("MIN", "MAX"), help="prompt tokens (the quickstart's)")
    parser.add_argument("--completion-len", type=int, nargs=2, default=(12, 80), metavar=("MIN", "MAX"), help="completion tokens")
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from scratchpad.cluster.make_model import resolve_model
    from scratchpad.common.buffer import BufferAddress, EmbeddedRedis, RedisBuffer, free_port
    from scratchpad.common.config import load_config
    from scratchpad.learner.batch import to_tensors
    from scratchpad.learner.learner import Learner

    cfg = load_config(args.config, [f"run.threads_per_actor={args.threads}", "run.checkpoint_every=0", *args.overrides])
    model_path = str(resolve_model(cfg, log=lambda *_: None))
    torch.set_num_threads(args.threads)
    redis = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="learner-step-")) / "redis").start()
    try:
        address = BufferAddress(redis.url, "sp:bench:", 100_000)
        learner = Learner(cfg, model_path, address, 0, 1, free_port())
        buffer = RedisBuffer(address)
        bare = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        lc = cfg.learner
        optim = torch.optim.AdamW(bare.parameters(), lr=lc.lr, weight_decay=lc.weight_decay, betas=(0.9, lc.adam_beta2), eps=lc.adam_eps)
        ours, theirs, ratios, profile = [], [], [], cProfile.Profile()
        for step in range(args.steps + 2):  # two warm-up pairs
            groups = synthetic_groups(learner.tokenizer, cfg.rollout.prompts_per_step, cfg.rollout.n, step, f"s{step}-",
                                      learner.version, prompt_len=tuple(args.prompt_len), completion_len=tuple(args.completion_len))
            buffer.put(groups)
            batch = to_tensors([t for g in groups for t in g.traces], learner.pad_id, torch.device("cpu"))
            sides = ["ours", "bare"] if step % 2 == 0 else ["bare", "ours"]
            took = {}
            for side in sides:
                started = time.perf_counter()
                if side == "ours":
                    if args.profile and step >= 2:
                        profile.enable()
                    assert learner.fill_batch(2000) == 0
                    learner.train()
                    profile.disable()
                else:
                    bare_step(bare, optim, batch, cfg.rollout.n, lc.grad_clip or float("inf"), lc.clip_low, lc.clip_high)
                took[side] = time.perf_counter() - started
            if step >= 2:
                ours.append(took["ours"])
                theirs.append(took["bare"])
                ratios.append(took["ours"] / took["bare"])
    finally:
        redis.stop()
    if args.profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    result = {
        "benchmark": "learner_step", "learner_over_bare": round(statistics.median(ratios), 3),
        "learner_over_bare_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "ours_s": round(statistics.median(ours), 4), "bare_s": round(statistics.median(theirs), 4), "pairs": len(ratios),
        "batch": {"sequences": cfg.rollout.prompts_per_step * cfg.rollout.n, "micro_batch_size": cfg.learner.micro_batch_size},
        "threads": args.threads, "model": model_path, "prompt_len": list(args.prompt_len),
        "completion_len": list(args.completion_len), "overrides": args.overrides, **provenance(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
