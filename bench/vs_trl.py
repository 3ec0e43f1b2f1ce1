"""Scratchpad against TRL's GRPOTrainer, one after the other: time to a held-out target.

    python bench/vs_trl.py --steps 200 [--out runs/bench-vs-trl] [--trl-first]
                           [--scratchpad-overrides learner.max_staleness=1 run.eval_actor=true ...]
    python bench/vs_trl.py --config configs/smollm2_array.yaml --steps 70 --eval-every 10 \
                           --scratchpad-overrides learner.filter_groups=false

Both sides start from the same model (`scratchpad make-model CONFIG`: the quickstart's warm-started tiny model, or a
preset with its cold start), train on the same prompts in the same order (actors/tasks.py train_stream; TRL's
shuffling is off), put them in the same prompt format (actors/formatting.PromptFormat: the chat template with the
config's instruction and shots; TRL is given the conversation and applies the template itself), with the same reward
(the exact answer extracted by task.answer_format, with only the format's trailer after it: PromptFormat.parse +
rewards/checkers.exact), batch (prompts_per_step x n, micro-batches of learner.micro_batch_size), max new tokens,
temperature, lr and its schedule (constant, linear to 0, or cosine to min_lr_ratio), clip, grad clip, Adam settings,
token-mean loss (TRL's `dapo`), KL coefficient (k3 in the loss, as TRL's beta) and steps, all read from one resolved
scratchpad config. What TRL has no counterpart for is refused: learner.filter_groups (dynamic sampling), an entropy
bonus, a KL in the reward or by another estimator.
Both evaluate greedily on the same held-out prompts (eval_set) before training and every --eval-every steps.
Scratchpad runs as `scratchpad train` (synchronous, run.eval_actor=false so evaluation blocks and can be subtracted
exactly from its evals.jsonl: eval_started_wall..wall); TRL runs in a child process with HF generate (its CPU path),
evaluated by a callback that times itself. Wall times count from each side's first training step, evaluation left
out; start-up is from the side's command start to that step, its step-0 evaluation left out. Target: the side's own
step-0 accuracy + --gain. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, spread  # noqa: E402

LOSS = {"token_mean": "dapo", "seq_mean": "grpo", "seq_sum": "dr_grpo"}  # scratchpad aggregation -> TRL loss_type


def shared_overrides(args) -> list[str]:
    """The run settings both sides share, as scratchpad overrides (the batch, sampling and lr are the config's; the
    quickstart's are the issue's: 16 prompts x 8, 96 new tokens, T = 1, lr 1e-4); --scratchpad-overrides come after
    and win."""
    return [f"run.steps={args.steps}", f"run.eval_every={args.eval_every}", "run.eval_actor=false",
            f"run.threads_per_actor={args.threads}", *args.scratchpad_overrides]


def mappable(cfg) -> str | None:
    """Why this config cannot be run the same way by TRL's GRPOTrainer (None: it can)."""
    lc = cfg.learner
    if lc.algorithm != "grpo" or lc.ppo_epochs != 1 or lc.minibatches != 1:
        return "the comparison maps only grpo with one pass and one minibatch onto TRL"
    if lc.filter_groups:
        return "learner.filter_groups is true and TRL's GRPOTrainer has no dynamic sampling; add learner.filter_groups=false to --scratchpad-overrides"
    if lc.entropy_coef:
        return f"learner.entropy_coef is {lc.entropy_coef} and TRL's GRPOTrainer has no entropy bonus"
    if lc.kl_coef and (lc.kl_mode != "loss" or lc.kl_estimator != "k3"):
        return f"TRL's beta is the k3 KL in the loss; learner.kl_mode is {lc.kl_mode} and learner.kl_estimator {lc.kl_estimator}"
    if lc.lr_schedule == "linear" and lc.min_lr_ratio:
        return f"TRL's linear schedule decays to 0; learner.min_lr_ratio is {lc.min_lr_ratio}"
    return None


def resolve(args):
    from scratchpad.common.config import load_config

    cfg = load_config(args.config, shared_overrides(args))
    why = mappable(cfg)
    if why:
        raise SystemExit(f"bench/vs_trl.py: error: {why}")
    if cfg.model.path:
        return cfg, cfg.model.path
    done = subprocess.run(["scratchpad", "make-model", args.config, *shared_overrides(args)], capture_output=True, text=True, check=True)
    return cfg, done.stdout.strip().splitlines()[-1]


# ---- scratchpad's side: run the CLI, read its run directory ------------------------------------------------------

def run_scratchpad(args, out: Path) -> dict:
    run_dir = out / "scratchpad"
    cmd = ["scratchpad", "train", args.config, "--run-dir", str(run_dir), *shared_overrides(args)]
    launched = time.time()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL if args.quiet else None)
    if done.returncode != 0:
        raise SystemExit(f"bench/vs_trl.py: error: scratchpad train exited {done.returncode}")
    return scratchpad_curve(run_dir, launched, time.time() - launched)


def _overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


def scratchpad_curve(run_dir: Path, launched: float, command_s: float) -> dict:
    """Accuracy against training wall time from metrics.jsonl / evals.jsonl. Times there are seconds since train()
    began; config.yaml is written at that moment, so its mtime places them on this clock (start-up includes imports).
    Blocking evaluations (run.eval_actor false) are subtracted; evaluations on their own actor overlap training."""
    import yaml

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    blocking = not yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["eval_actor"]
    spans = [(e["eval_started_wall"], e["wall"]) for e in evals] if blocking else []
    first = metrics[0]["wall"] - metrics[0]["step_seconds"]  # when step 1 began
    train_wall = lambda t: t - first - _overlap(spans, first, t)  # noqa: E731
    end_of = {m["step"]: m["wall"] for m in metrics}
    points = [{"step": e["step"], "train_wall": round(train_wall(end_of[e["step"]]) if e["step"] else 0.0, 2),
               "accuracy": e["accuracy"], "eval_s": round(e["wall"] - e["eval_started_wall"], 2)} for e in evals]
    began = (run_dir / "config.yaml").stat().st_mtime
    total = train_wall(metrics[-1]["wall"])
    return {"startup_s": round(began - launched + first - _overlap(spans, 0.0, first), 1), "train_wall_s": round(total, 1),
            "steps": len(metrics), "seconds_per_step": round(total / len(metrics), 3), "evals": points,
            "phase_s_per_step": {k[5:]: round(sum(m.get(k, 0.0) for m in metrics) / len(metrics), 3)
                                 for k in metrics[0] if k.startswith("time_")},
            "eval_blocks_training": blocking, "command_s": round(command_s, 1), "run_dir": str(run_dir)}


# ---- TRL's side: GRPOTrainer in a child process (--trl-side), greedy evaluation in a callback --------------------

def prompt_of(fmt, text: str):
    """What TRL is given for one question: the plain prompt, or the conversation its chat template renders exactly as
    our rollout workers render it (PromptFormat.render)."""
    return fmt.messages(text) if fmt.chat else fmt.render(text)


def reward_of(fmt):
    """TRL's reward function: 1 for the exact answer, extracted by the task's answer format with nothing but the
    format's trailer after it (scratchpad's correct component), else 0."""
    from scratchpad.rewards.checkers import exact

    def correct(completions, answer, **_) -> list[float]:
        scores = []
        for completion, reference in zip(completions, answer):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            parsed = fmt.parse(text)
            scores.append(float(parsed.answer is not None and parsed.closed and exact(parsed.answer, reference)))
        return scores

    return correct


def greedy_accuracy(model, tokenizer, fmt, prompts: list, max_new_tokens: int) -> float:
    """Held-out accuracy with HF greedy generate (left-padded, one batch), scored like the reward."""
    import torch

    texts = [fmt.render(q.text) for q in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not fmt.chat)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(reward_of(fmt)(completions, [q.answer for q in prompts])) / len(prompts)


def trl_args(cfg, out: Path):
    from trl import GRPOConfig

    r, lr = cfg.rollout, cfg.learner
    batch = r.prompts_per_step * r.n
    micro = min(lr.micro_batch_size, batch)
    if batch % micro:
        raise SystemExit(f"bench/vs_trl.py: error: batch {batch} is not a multiple of learner.micro_batch_size {micro}")
    # transformers' cosine_with_min_lr is learner/engine.lr_factor's cosine (to min_lr_ratio at run.steps); its
    # warmup starts at 0 where ours starts at 1/warmup_steps
    schedule, schedule_kwargs = {"constant": ("constant_with_warmup", {}), "linear": ("linear", {}),
                                 "cosine": ("cosine_with_min_lr", {"min_lr_rate": lr.min_lr_ratio})}[lr.lr_schedule]
    return GRPOConfig(
        output_dir=str(out), max_steps=cfg.run.steps, per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        num_generations=r.n, max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=0,
        learning_rate=lr.lr, lr_scheduler_type=schedule, lr_scheduler_kwargs=schedule_kwargs, warmup_steps=lr.warmup_steps,
        weight_decay=lr.weight_decay,
        adam_epsilon=lr.adam_eps, adam_beta2=lr.adam_beta2, max_grad_norm=lr.grad_clip or 1e9, epsilon=lr.clip_low,
        epsilon_high=lr.clip_high, beta=lr.kl_coef, loss_type=LOSS[lr.loss_aggregation], scale_rewards="group",
        num_iterations=1, shuffle_dataset=False, seed=lr.seed, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=lr.gradient_checkpointing, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )


def trl_side(args) -> None:
    """The child process: build everything, evaluate at step 0, train with timed evaluations; write trl.json."""
    launched = float(args.launched)
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from scratchpad.actors.formatting import PromptFormat
    from scratchpad.actors.tasks import eval_set, train_stream
    from scratchpad.common.config import load_config

    cfg, path = load_config(args.config, shared_overrides(args)), args.model_path
    out = Path(args.out) / "trl"
    tokenizer = AutoTokenizer.from_pretrained(path)
    fmt = PromptFormat(cfg.task, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stream, held_out = train_stream(cfg.task), eval_set(cfg.task)
    rows = [next(stream) for _ in range(cfg.run.steps * cfg.rollout.prompts_per_step)]
    data = Dataset.from_list([{"prompt": prompt_of(fmt, p.text), "answer": p.answer} for p in rows])
    clock = {"evals": [], "eval_s": 0.0}

    def evaluate(step: int) -> None:
        began = time.time()
        accuracy = greedy_accuracy(model, tokenizer, fmt, held_out, cfg.rollout.max_new_tokens)
        took = time.time() - began
        train_wall = 0.0 if step == 0 else began - clock["first"] - clock["eval_s"]
        clock["eval_s"] += took if step else 0.0
        clock["evals"].append({"step": step, "train_wall": round(train_wall, 2), "accuracy": accuracy, "eval_s": round(took, 2)})
        print(json.dumps({"trl_eval": clock["evals"][-1]}), file=sys.stderr, flush=True)

    class Timed(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            evaluate(0)
            clock["first"] = time.time()
            clock["startup_s"] = clock["first"] - launched - clock["evals"][0]["eval_s"]

        def on_step_end(self, targs, state, control, **kw):
            clock["last"] = time.time()
            if state.global_step % args.eval_every == 0 or state.global_step == cfg.run.steps:
                evaluate(state.global_step)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward_of(fmt)], args=trl_args(cfg, out), train_dataset=data,
                          processing_class=tokenizer, callbacks=[Timed()])
    trainer.train()
    total = clock["last"] - clock["first"] - sum(e["eval_s"] for e in clock["evals"][1:-1])
    steps = trainer.state.global_step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {"startup_s": round(clock["startup_s"], 1), "train_wall_s": round(total, 1), "steps": steps,
              "seconds_per_step": round(total / max(1, steps), 3), "evals": clock["evals"],
              "reward_first_last": [logs[0].get("reward"), logs[-1].get("reward")] if logs else None,
              "command_s": round(time.time() - launched, 1), "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl.json").write_text(json.dumps(result, indent=2))


def run_trl(args, out: Path, path: str) -> dict:
    cmd = [sys.executable, __file__, "--trl-side", "--model-path", path, "--launched", repr(time.time()), "--out", str(out), "--steps", str(args.steps),
           "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--config", args.config,
           "--scratchpad-overrides", *args.scratchpad_overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if args.quiet else None)
    if done.returncode != 0:
        raise SystemExit(f"bench/vs_trl.py: error: the TRL side exited {done.returncode}")
    return json.loads((out / "trl" / "trl.json").read_text())


# ---- the comparison ------------------------------------------------------------------------------------------------

def time_to(evals: list[dict], target: float) -> float | None:
    """Training wall time of the first evaluation at or above `target` (None: never reached)."""
    return next((e["train_wall"] for e in evals if e["accuracy"] >= target - 1e-9), None)


def accuracy_at(evals: list[dict], wall: float) -> float:
    """Accuracy of the newest evaluation done by `wall` seconds of training (the last one if the run ended sooner)."""
    return [e for e in evals if e["train_wall"] <= wall + 1e-6][-1]["accuracy"]


def compare(ours: dict, trl: dict, gain: float) -> dict:
    for side in (ours, trl):
        side["accuracy_before"] = side["evals"][0]["accuracy"]
        side["target"] = round(side["accuracy_before"] + gain, 4)
        side["time_to_target_s"] = time_to(side["evals"], side["target"])
        side["accuracy_after"] = side["evals"][-1]["accuracy"]
    t_ours, t_trl = ours["time_to_target_s"], trl["time_to_target_s"]
    ratio = round(t_trl / t_ours, 3) if t_ours and t_trl else None
    return {
        "trl_time_to_target_ratio": ratio,
        # when only one side reached its target: the other's whole training wall bounds the ratio
        "trl_time_to_target_ratio_bound": (None if ratio is not None or not (t_ours or t_trl) else
                                           {"at_least": round(trl["train_wall_s"] / t_ours, 3)} if t_ours else
                                           {"at_most": round(t_trl / ours["train_wall_s"], 3)}),
        "accuracy_at_trl_wall": accuracy_at(ours["evals"], trl["train_wall_s"]),
        "trl_accuracy_at_our_wall": accuracy_at(trl["evals"], ours["train_wall_s"]),
        "seconds_per_step_ratio_trl_over_ours": round(trl["seconds_per_step"] / ours["seconds_per_step"], 3),
        "startup_s": {"scratchpad": ours["startup_s"], "trl": trl["startup_s"]},
    }


class LoadSampler:
    """The machine's 1-minute load average every `every` seconds while a side runs: a side measured under a load far
    from the other's is not comparable with it (on a shared 2-core machine, step times moved 10x with load)."""

    def __init__(self, every: float = 10.0):
        import threading

        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        return spread(self.samples) if self.samples else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--gain", type=float, default=0.10, help="target = held-out accuracy before + gain")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side (scratchpad: run.threads_per_actor)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--out", default=None, help="directory for both runs (default runs/bench-vs-trl-TIME)")
    parser.add_argument("--trl-first", action="store_true", help="run TRL's side first")
    parser.add_argument("--quiet", action="store_true", help="keep each side's step lines off stdout")
    parser.add_argument("--scratchpad-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra scratchpad overrides, applied last (e.g. learner.max_staleness=1); TRL reads the shared ones too")
    parser.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--launched", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_side:
        trl_side(args)
        return
    out = Path(args.out or ROOT / "runs" / f"bench-vs-trl-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    info, started = provenance(), time.time()
    _, path = resolve(args)  # builds (or finds) the shared model before either side's clock starts
    sides = {}
    for name in (["trl", "scratchpad"] if args.trl_first else ["scratchpad", "trl"]):
        with LoadSampler() as load:
            sides[name] = run_trl(args, out, path) if name == "trl" else run_scratchpad(args, out)
        sides[name]["load_1min"] = load.summary()
    result = {"benchmark": "vs_trl", **compare(sides["scratchpad"], sides["trl"], args.gain), "steps": args.steps,
              "eval_every": args.eval_every, "order": list(sides), "scratchpad": sides["scratchpad"], "trl": sides["trl"],
              "wall_s": round(time.time() - started, 1), **info, "load_1min_at_end": round(os.getloadavg()[0], 2)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
