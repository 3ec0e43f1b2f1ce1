"""Model rewards on the warm-started tiny model: the likelihood reward (Quiet-STaR style) and a reward model
trained by `scratchpad train-rm` on generated preference pairs."""
import random

import pytest

from scratchpad.actors.tasks import array_access
from scratchpad.common.config import load_config
from scratchpad.common.records import Group
from scratchpad.rewards.scoring import Scorer
from test_records_and_scoring import make_trace


def test_likelihood_reward_prefers_a_thought_that_states_the_answer(tiny_model):
    cfg = load_config(None, ["reward.components=[{name: lik, kind: likelihood, model_path: " + tiny_model + "}]"]).reward
    scorer = Scorer(cfg)
    rng = random.Random(7)
    wins, groups = 0, []
    for g in range(12):
        question, answer, meta = array_access(rng, 3, 5)
        values = question.split("[", 1)[1].split("]", 1)[0].split(",")
        stated = " ".join(f"{k}:{values[k]}" for k in range(meta["index"] + 1))  # ends with the indexed value
        wrong = str((int(answer) + 5) % 10)
        misled = " ".join(f"{k}:{values[k] if k < meta['index'] else wrong}" for k in range(meta["index"] + 1))
        traces = []
        for k, thought in enumerate([stated, misled, None]):  # the last wrote no thought at all
            t = make_trace(answer=answer, group=f"g{g}", k=k, reference=answer)
            t.prompt, t.thought = question + "\n", thought
            traces.append(t)
        groups.append(Group(f"g{g}", "p", 0, traces))
    results = scorer.score(groups)
    assert all(r.status == "ok" for r in results)
    for group in groups:
        stated, misled, empty = (t.reward for t in group.traces)
        assert stated + misled + empty == pytest.approx(0.0, abs=1e-4)  # centred on the group's mean
        wins += stated > misled and stated > empty
    assert wins >= 11, f"the stated-answer thought won only {wins} of 12 groups"


def write_pairs(path, count: int, seed: int) -> None:
    """Array-access preference pairs: chosen answers the indexed value, rejected a digit the array lacks.

    (Telling the indexed value from another element of the array is answering the task directly, which a
    tiny model cannot learn in a minute: the reason it needs a scratchpad. Membership it learns in seconds.)"""
    import json

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            question, answer, meta = array_access(rng, 3, 5)
            values = question.split("[", 1)[1].split("]", 1)[0].split(",")
            wrong = rng.choice([str(d) for d in range(10) if str(d) not in values])
            # Responses are what a reward_model component reads by default: the parsed answer after the prompt.
            handle.write(json.dumps({"prompt": question + "\n", "chosen": answer, "rejected": wrong}) + "\n")


def test_train_rm_cli_learns_preferences_the_reward_model_component_uses(tiny_model, tmp_path, capsys):
    import time

    from scratchpad.cluster.cli import main

    write_pairs(tmp_path / "train.jsonl", 2000, seed=1)
    write_pairs(tmp_path / "held_out.jsonl", 200, seed=2)
    out = tmp_path / "rm"
    started = time.time()
    assert main(["train-rm", f"train_path={tmp_path / 'train.jsonl'}", f"eval_path={tmp_path / 'held_out.jsonl'}",
                 f"output_dir={out}", f"base_path={tiny_model}", "steps=300", "batch_size=16", "lr=1e-3", "threads=1", "seed=0"]) == 0
    seconds = time.time() - started
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed

    # The saved model, loaded the way a reward_model component loads it, ranks held-out pairs.
    import json

    cfg = load_config(None, [f"reward.components=[{{name: rm, kind: reward_model, model_path: {out}}}]"]).reward
    scorer = Scorer(cfg)
    held_out = [json.loads(line) for line in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    groups = []
    for i, pair in enumerate(held_out):
        chosen, rejected = make_trace(group=f"h{i}", k=0), make_trace(group=f"h{i}", k=1)
        for t, response in ((chosen, pair["chosen"]), (rejected, pair["rejected"])):
            t.prompt, t.answer = pair["prompt"], response
        groups.append(Group(f"h{i}", "p", 0, [chosen, rejected]))
    results = scorer.score(groups)
    assert all(r.status == "ok" for r in results)
    wins = sum(g.traces[0].reward > g.traces[1].reward for g in groups)
    assert wins / len(groups) >= 0.8, f"chosen above rejected on {wins}/{len(groups)} held-out pairs ({seconds:.0f}s of training)"


@pytest.mark.integration
def test_composed_reward_in_ray_actors(ray_cluster, tiny_model, cache_dir):
    """A reward actor on real Ray: answer checks in its killable worker processes, the likelihood model and a vLLM
    judge each in their own actor, as cluster/run.py places them."""
    import json

    import ray

    from conftest import small_config
    from scratchpad.actors.judge_engine import JudgeEngine
    from scratchpad.cluster.run import actor_env
    from scratchpad.rewards.models import ModelScorer
    from scratchpad.rewards.scoring import RewardWorker

    components = [
        {"name": "answer", "kind": "math", "weight": 1.0},
        {"name": "lik", "kind": "likelihood", "weight": 0.1},
        {"name": "judge", "kind": "judge", "weight": 0.5, "template": "A=[{response},{response},{response}] i=1\n",
         "score_pattern": r"<answer>(\d)</answer>", "score_min": 0, "score_max": 9, "max_new_tokens": 40},
    ]
    cfg = small_config(cache_dir, f"reward.components={json.dumps(components)}")
    env = {"env_vars": actor_env(cfg)}
    lik, judge = cfg.reward.components[1], cfg.reward.components[2]
    models = {"lik": ray.remote(ModelScorer).options(num_cpus=0, runtime_env=env).remote(lik, tiny_model, 1),
              "judge": ray.remote(JudgeEngine).options(num_cpus=0, runtime_env=env).remote(judge, tiny_model, "float32", 0, 1)}
    worker = ray.remote(RewardWorker).options(num_cpus=0, runtime_env=env).remote(cfg.reward, None, 80, models, tiny_model)
    try:
        traces = []
        for k, (thought, answer) in enumerate([("0:3 1:8", "8"), ("0:3", "3"), (None, None)]):
            t = make_trace(answer=answer, k=k, reference="8")
            t.prompt, t.thought = "A=[3,8,1] i=1\n", thought
            traces.append(t)
        [group] = ray.get(worker.score.remote([Group("g1", "p", 0, traces)]))
    finally:
        for actor in (worker, *models.values()):
            ray.kill(actor)
    right, wrong, empty = group.traces
    assert (right.status, wrong.status, empty.status) == ("ok", "ok", "unparsable")
    assert right.components["answer"] == 1.0 and wrong.components["answer"] == 0.0
    assert right.components["judge"] == pytest.approx(8 / 9) and wrong.components["judge"] == pytest.approx(3 / 9)
    assert right.components["lik"] > wrong.components["lik"]
    assert right.reward == pytest.approx(1.0 + 0.1 * right.components["lik"] + 0.5 * 8 / 9)
