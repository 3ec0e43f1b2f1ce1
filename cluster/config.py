"""The experiment schema: the one source of truth for every setting.

YAML files in configs/ are sparse overrides of these defaults; `key.sub=value`
arguments on the command line override the YAML. Every field is typed, bounded
and carries a one-line description (tests/test_config.py enforces the last).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(Exception):
    """A user's mistake in a config file or override: reported as one line, exit code 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Shape and warm start of the character-level model that `make-model` builds offline."""

    hidden_size: int = Field(128, ge=16, le=4096, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, le=64, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, le=64, description="Attention heads per block (hidden_size must divide by it).")
    intermediate_size: int = Field(512, ge=16, le=16384, description="Width of the MLP inside each block.")
    max_positions: int = Field(256, ge=32, le=8192, description="Longest sequence (prompt + completion) in tokens.")
    warmstart_steps: int = Field(150, ge=0, le=100000, description="Supervised steps on chain-of-thought examples before RL; 0 leaves the model random.")
    warmstart_batch: int = Field(32, ge=1, le=4096, description="Examples per supervised step.")
    warmstart_lr: float = Field(3e-3, gt=0, le=1, description="Peak learning rate of the warm start (AdamW, linear decay).")
    warmstart_direct_fraction: float = Field(0.0, ge=0, le=1, description="Share of warm-start examples that answer at once, with no scratchpad (cot mode only); RL then decides when to think.")
    seed: int = Field(0, ge=0, description="Seed for weights and warm-start data; the cache key includes it.")


class ModelConfig(_Section):
    """Which policy to train: a Hugging Face checkpoint, or the tiny model built offline."""

    path: str | None = Field(None, description="Local directory or hub id of a Hugging Face causal LM; null builds the tiny model.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Settings for the tiny model (used when path is null).")
    cache_dir: str | None = Field(None, description="Where built tiny models are cached; null means $SCRATCHPAD_CACHE or ~/.cache/scratchpad.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype in learner and engines; float32 makes vLLM and HF agree to 1e-5.")


class TaskConfig(_Section):
    """Where prompts and reference answers come from."""

    name: Literal["array_access", "addition", "jsonl"] = Field("array_access", description="Synthetic task to generate, or jsonl to read prompt/answer pairs from files.")
    mode: Literal["cot", "direct"] = Field("cot", description="cot lets the model write a <think> scratchpad before <answer>; direct asks for the answer at once.")
    min_len: int = Field(3, ge=1, le=64, description="Shortest array (array_access) or operand length in digits (addition).")
    max_len: int = Field(10, ge=1, le=64, description="Longest array (array_access) or operand length in digits (addition).")
    train_path: str | None = Field(None, description="JSONL file with one {prompt, answer} object per line (task jsonl only).")
    eval_path: str | None = Field(None, description="JSONL file of held-out {prompt, answer} lines (task jsonl only).")
    eval_size: int = Field(200, ge=1, le=100000, description="Held-out prompts scored greedily before, during and after training.")
    seed: int = Field(1, ge=0, description="Seed of the training prompt stream; the held-out set uses seed + 1000003.")


class RolloutConfig(_Section):
    """Rollout actors: engines that sample completions from the policy."""

    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm is the production engine; hf (transformers.generate) is the fallback.")
    num_engines: int = Field(1, ge=1, le=1024, description="Rollout actors, each holding one engine.")
    cpus_per_engine: float = Field(1.0, gt=0, le=256, description="Ray CPUs reserved per rollout actor.")
    gpus_per_engine: float = Field(0.0, ge=0, le=8, description="Ray GPUs reserved per rollout actor (0 on a CPU machine).")
    prompts_per_step: int = Field(16, ge=1, le=65536, description="Groups (distinct prompts) trained on per learner step.")
    n: int = Field(8, ge=1, le=1024, description="Completions sampled per prompt; a group's size.")
    max_new_tokens: int = Field(96, ge=1, le=32768, description="Longest completion in tokens; longer ones are cut with finish_reason=length.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature for training rollouts (evaluation is greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass for training rollouts.")
    kv_cache_gib: float = Field(1.0, gt=0, le=1024, description="KV-cache memory per vLLM engine, GiB (CPU backend).")
    enforce_eager: bool = Field(True, description="Skip vLLM's torch.compile warm-up (about 15 s at start on CPU, no speed lost on tiny models).")
    seed: int = Field(0, ge=0, description="Sampler seed; engine i uses seed + i.")


class RewardConfig(_Section):
    """Reward actors: score the answer (never the thought)."""

    correct_weight: float = Field(1.0, ge=-100, le=100, description="Weight of the answer-correctness component (1 if the answer matches).")
    format_weight: float = Field(0.0, ge=-100, le=100, description="Weight of the format component (1 if <answer>..</answer> closes the completion).")
    require_stop: bool = Field(True, description="Count an answer as correct only if the completion ends right after it (no text after </answer>).")
    timeout_s: float = Field(5.0, gt=0, le=3600, description="Seconds one trace's check may take before it is marked timeout with zero reward.")
    num_actors: int = Field(1, ge=1, le=1024, description="Reward actors scoring in parallel.")
    cpus_per_actor: float = Field(0.0, ge=0, le=256, description="Ray CPUs reserved per reward actor; 0 shares the others' cores (checking answers is cheap).")


class BufferConfig(_Section):
    """The Redis replay buffer between reward actors and the learner."""

    redis_url: str | None = Field(None, description="redis:// or rediss:// URL of an external server; null starts the embedded one.")
    maxlen: int = Field(100000, ge=16, le=100_000_000, description="Approximate bound on the stream's length (XADD MAXLEN ~).")
    appendfsync: Literal["always", "everysec", "no"] = Field("everysec", description="AOF fsync policy of the embedded server.")
    read_timeout_s: float = Field(300.0, gt=0, le=86400, description="How long the learner waits for a batch before failing.")


class LearnerConfig(_Section):
    """The DeepSpeed learner and its algorithm."""

    algorithm: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = Field("grpo", description="Advantage estimator by name (learner/algorithms.py).")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (constant after warmup).")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Linear learning-rate warmup, in learner steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    adam_eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon; larger values stop Adam from blowing tiny, noisy gradients up to full-size steps.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW second-moment decay.")
    clip_low: float = Field(0.2, gt=0, le=1, description="Importance ratio may fall to 1 - clip_low before the surrogate clips.")
    clip_high: float = Field(0.2, gt=0, le=10, description="Importance ratio may rise to 1 + clip_high (DAPO's clip-higher uses 0.28).")
    dual_clip: float | None = Field(None, gt=1, le=100, description="Dual-clip bound c for negative advantages (loss <= c|A|); null disables.")
    loss_aggregation: Literal["token_mean", "seq_mean", "seq_sum"] = Field("token_mean", description="token_mean over the batch (DAPO), seq_mean per sequence (GRPO paper), seq_sum over a fixed budget (Dr. GRPO).")
    kl_coef: float = Field(0.0, ge=0, le=100, description="Weight of the KL penalty to the frozen reference model; 0 loads no reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator for the penalty.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Global gradient-norm clip; 0 disables.")
    ppo_epochs: int = Field(1, ge=1, le=100, description="Passes over each batch; later passes are off-policy and the clip bounds them.")
    minibatches: int = Field(1, ge=1, le=4096, description="Optimizer steps per pass; each takes prompts_per_step / minibatches whole groups.")
    micro_batch_size: int = Field(64, ge=1, le=65536, description="Sequences per forward/backward; gradients accumulate over a step.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    max_staleness: int = Field(0, ge=0, le=1000, description="Oldest policy version lag a trained group may have; 0 is strictly on-policy.")
    num_cpus: float = Field(1.0, gt=0, le=256, description="Ray CPUs reserved for the learner.")
    num_gpus: float = Field(0.0, ge=0, le=8, description="Ray GPUs reserved for the learner (0 on a CPU machine).")
    seed: int = Field(0, ge=0, description="Seed of the learner's torch RNG.")


class RunConfig(_Section):
    """The run as a whole."""

    steps: int = Field(100, ge=0, le=10_000_000, description="Learner steps (one policy version each).")
    eval_every: int = Field(25, ge=0, le=10_000_000, description="Greedy held-out evaluation every this many steps; 0 evaluates only before and after.")
    checkpoint_every: int = Field(0, ge=0, le=10_000_000, description="DeepSpeed checkpoint (model, optimizer, scheduler, version, RNG) every this many steps; 0 writes only the final HF model.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="How many of the newest checkpoints to keep in RUN_DIR/checkpoints.")
    sample_traces: int = Field(4, ge=0, le=100000, description="Traces per step written to traces.jsonl for reading.")
    ray_address: str | None = Field(None, description="Address of a Ray cluster to join; null joins $RAY_ADDRESS when set (as inside `ray job submit`), else starts a private local one.")
    num_cpus: int | None = Field(None, ge=1, le=100000, description="CPUs a private local Ray cluster may use; null uses all of the machine's.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="Ray placement-group strategy for the run's reserved CPUs/GPUs (one bundle per rollout engine, reward actor with CPUs, learner).")
    placement_timeout_s: float = Field(60.0, gt=0, le=86400, description="How long to wait for the cluster to free the reserved resources before failing with what is missing.")
    wandb: bool = Field(False, description="Also log step metrics to Weights & Biases (needs the wandb package; never required).")
    wandb_project: str = Field("scratchpad", min_length=1, max_length=200, description="Weights & Biases project the run logs to when run.wandb is true.")
    threads_per_actor: int = Field(1, ge=1, le=256, description="torch threads in each actor; 1 keeps 2-core machines from oversubscribing.")


class ExperimentConfig(_Section):
    """A whole experiment: what `scratchpad train` reads."""

    name: str = Field("experiment", min_length=1, max_length=200, description="Name for logs and metric tags.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="The prompts and answers.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Scoring.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Replay buffer.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Training.")
    run: RunConfig = Field(default_factory=RunConfig, description="The run.")


def _parse_scalar(text: str) -> Any:
    """An override's value is read as YAML, so `3`, `0.5`, `true` and `null` keep their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {field}: {first['msg']}{shown}{extra}"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply `key.sub=value` overrides, validate; ConfigError on any mistake."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        _set_path(data, key.strip(), _parse_scalar(value))
        source = f"{source} + overrides" if "overrides" not in source else source
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None
    _check_consistency(cfg, source)
    return cfg


def _check_consistency(cfg: ExperimentConfig, source: str) -> None:
    """Rules that span fields."""
    tiny = cfg.model.tiny
    if tiny.hidden_size % tiny.num_heads:
        raise ConfigError(f"{source}: model.tiny.hidden_size ({tiny.hidden_size}) must divide by model.tiny.num_heads ({tiny.num_heads})")
    head_dim = tiny.hidden_size // tiny.num_heads
    if cfg.model.path is None and cfg.rollout.engine == "vllm" and (head_dim < 32 or head_dim % 16):
        raise ConfigError(f"{source}: model.tiny head size hidden_size/num_heads = {head_dim}; vLLM's CPU attention needs a multiple of 16, at least 32")
    if cfg.task.min_len > cfg.task.max_len:
        raise ConfigError(f"{source}: task.min_len ({cfg.task.min_len}) exceeds task.max_len ({cfg.task.max_len})")
    if cfg.task.name == "jsonl" and not cfg.task.train_path:
        raise ConfigError(f"{source}: task.train_path is required when task.name is jsonl")
    if cfg.task.name != "jsonl" and (cfg.task.train_path or cfg.task.eval_path):
        raise ConfigError(f"{source}: task.train_path/eval_path are only read when task.name is jsonl")
    if cfg.rollout.prompts_per_step % cfg.learner.minibatches:
        raise ConfigError(f"{source}: learner.minibatches ({cfg.learner.minibatches}) must divide rollout.prompts_per_step ({cfg.rollout.prompts_per_step})")
    url = cfg.buffer.redis_url
    if url is not None and not url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"{source}: buffer.redis_url must start with redis:// or rediss:// (got {url!r})")
    if cfg.rollout.n < 2:
        raise ConfigError(f"{source}: rollout.n must be at least 2 ({cfg.learner.algorithm} uses group-relative advantages)")


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, in schema order."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
