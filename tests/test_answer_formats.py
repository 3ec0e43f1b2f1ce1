"""Answer formats, prompt templates and what the scorers read: parsing and templates are pure and fast; the judge and
reward-model checks use the session's tiny model."""
import json

import msgspec
import pytest

from scratchpad.actors.formatting import PromptFormat, instruction, parse_completion, target_completion, worked_examples
from scratchpad.actors.tasks import eval_set
from scratchpad.common.config import ConfigError, RewardConfig, load_config
from scratchpad.common.records import Group, decode_group, encode_group
from scratchpad.rewards.scoring import Scorer
from test_records_and_scoring import make_trace

ANSWER_LINE = r"Answer:\s*(\S+)"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("fmt, text, expected", [
    ("boxed", "x=2, so \\boxed{\\frac{1}{2}}.", ("x=2, so", "\\frac{1}{2}", True)),
    ("boxed", "\\boxed{3} or rather \\boxed{ 4 }", ("\\boxed{3} or rather", "4", True)),
    ("boxed", "The answer is $\\boxed{7}$.\n", ("The answer is $", "7", True)),
    ("boxed", "\\boxed{3} then \\boxed{4", (None, "3", False)),  # the last box never closes: the complete one, not closed
    ("boxed", "\\boxed{3} and more words", (None, "3", False)),
    ("boxed", "<think>1+2</think>so \\boxed{3}", ("1+2", "3", True)),
    ("boxed", "no box here", ("no box here", None, False)),
    ("regex", "step\nAnswer: 9\n", ("step", "9", True)),
    ("regex", "Answer: 1\nAnswer: 2", ("Answer: 1", "2", True)),
    ("regex", "Answer: 2 because", (None, "2", False)),
    ("regex", "no line", ("no line", None, False)),
    ("last_number", "A[2] is 1,234.5.", ("A[2] is", "1234.5", True)),
    ("last_number", "3-5 = -2", ("3-5 =", "-2", True)),
    ("last_number", "42 apples", (None, "42", False)),
    ("last_number", "   ", (None, None, False)),
])
def test_parse_each_format(fmt, text, expected):
    assert parse_completion(text, fmt, ANSWER_LINE) == expected


def test_tags_stays_the_default_format():
    assert parse_completion("<think>0:3</think><answer>3</answer>") == ("0:3", "3", True)
    assert parse_completion("\\boxed{3}") == (None, None, False)


@pytest.mark.parametrize("fmt", ["tags", "boxed", "regex", "last_number"])
@pytest.mark.parametrize("mode", ["cot", "direct"])
def test_worked_completions_round_trip(fmt, mode):
    thought, answer = "0:3 1:8 2:1", "1"
    text = target_completion(mode, thought, answer, fmt)
    parsed = parse_completion(text, fmt, ANSWER_LINE)
    assert parsed.answer == answer and parsed.closed
    assert (parsed.thought is not None and thought in parsed.thought) if mode == "cot" else parsed.thought is None


@pytest.mark.parametrize("overrides, field", [
    (["task.answer_format=regex"], "task.answer_regex"),
    (["task.answer_regex=(x)"], "task.answer_regex"),
    (["task.answer_format=regex", "task.answer_regex=(a)(b)"], "exactly one capturing group"),
    (["task.answer_format=regex", "task.answer_regex=(unclosed"], "not a regex"),
    (["task.answer_format=regex", "task.answer_regex=Result=(\\d+)"], "Answer: 7"),
    (["task.shots=9"], "task.shots"),
    (["task.answer_format=xml"], "task.answer_format"),
    (["model.preset=smollm2-135m-instruct", "model.path=/m"], "model.preset"),
    (["model.preset=gpt5"], "model.preset"),
    (["coldstart.steps=5", "coldstart.source=jsonl"], "coldstart.path"),
    (["coldstart.path=demos.jsonl"], "coldstart.path"),
    (["coldstart.steps=5", "coldstart.min_len=6", "coldstart.max_len=4"], "coldstart.min_len"),
])
def test_format_mistakes_are_one_line(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_another_regex_form_needs_its_own_instruction_and_no_worked_examples():
    cfg = load_config(None, ["task.answer_format=regex", "task.answer_regex=Result=(\\d+)", "task.system_prompt=End with Result=N."])
    assert cfg.task.answer_regex == "Result=(\\d+)"
    with pytest.raises(ConfigError, match="Answer: 7"):
        load_config(None, ["task.answer_format=regex", "task.answer_regex=Result=(\\d+)", "task.system_prompt=x", "task.shots=2"])


def _tokenizer(chat: bool):
    from scratchpad.cluster.make_model import build_tokenizer

    tokenizer = build_tokenizer()
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    return tokenizer


def test_plain_model_gets_prepended_shots_and_no_builtin_instruction():
    task = load_config(None, ["task.shots=3", "task.eval_size=50"]).task
    fmt = PromptFormat(task, _tokenizer(chat=False))
    text = fmt.render("A=[1,2,3] i=0")
    assert text.endswith("\nA=[1,2,3] i=0\n") and text.count("<answer>") == 3 and "Think" not in text
    held_out = {p.text for p in eval_set(task)}
    assert all(q not in held_out for q, _ in fmt.shots)
    assert PromptFormat(task, _tokenizer(chat=False)).shots == fmt.shots  # seeded: every rollout actor agrees
    with_system = PromptFormat(task.model_copy(update={"system_prompt": "Be brief."}), _tokenizer(chat=False))
    assert with_system.render("q").startswith("Be brief.\n")


def test_chat_model_gets_instruction_shots_as_turns_and_its_end_of_turn():
    tokenizer = _tokenizer(chat=True)
    task = load_config(None, ["task.shots=2", "task.answer_format=boxed"]).task
    fmt = PromptFormat(task, tokenizer)
    text = fmt.render("A=[4,5] i=1")
    assert text.startswith(f"<|im_start|>system\n{instruction('boxed', 'cot')}<|im_end|>")
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3 and text.endswith("<|im_start|>assistant\n")
    assert all("\\boxed{" in completion for _, completion in fmt.shots)
    assert tokenizer.convert_ids_to_tokens(fmt.end_of_turn()) == "<|im_end|>"
    bare = PromptFormat(task.model_copy(update={"system_prompt": "", "shots": 0}), tokenizer).render("q")
    assert bare == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    # a trainer that applies the template itself (TRL in bench/vs_trl.py) is given the conversation render templates
    messages = fmt.messages("A=[4,5] i=1")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert PromptFormat(task, _tokenizer(chat=False)).end_of_turn() == tokenizer.eos_token_id


def test_worked_examples_never_use_a_held_out_question(tmp_path):
    task = load_config(None, ["task.min_len=1", "task.max_len=1", "task.eval_size=6"]).task  # only 10 questions exist
    held_out = {p.text for p in eval_set(task)}
    examples = worked_examples(task, 30, 5, 1, 1)
    assert len(examples) == 30 and not {q for q, _, _ in examples} & held_out
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(5)))
    held.write_text(json.dumps({"prompt": "q0", "answer": 0}) + "\n")
    jsonl = load_config(None, ["task.name=jsonl", f"task.train_path={train}", f"task.eval_path={held}"]).task
    rows = worked_examples(jsonl, 8, 0, 1, 1)
    assert sorted(q for q, _, _ in rows) == ["q1", "q2", "q3", "q4"] and all(t is None for _, t, _ in rows)


def _parsed_trace(text, fmt, reference, k):
    thought, answer, closed = parse_completion(text, fmt)
    t = make_trace(answer=answer, closed=closed, k=k, reference=reference)
    t.thought, t.completion = thought, text
    return t


def test_checkers_and_format_reward_read_the_extracted_answer():
    comps = [{"name": "answer", "kind": "math"}, {"name": "number", "kind": "numeric"}, {"name": "format", "kind": "format", "require_thought": True}]
    scorer = Scorer(load_config(None, [f"reward.components={json.dumps(comps)}"]).reward)
    texts = ["half of 1 is \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{0.5} and then more", "0.5"]
    traces = [_parsed_trace(text, "boxed", "0.5", k) for k, text in enumerate(texts)]
    try:
        results = scorer.score([Group("g1", "p", 0, traces)])
    finally:
        scorer.close()
    assert [t.components["answer"] for t in traces] == [1.0, 1.0, 0.0, 0.0]  # require_stop: the third keeps writing
    assert [t.components["number"] for t in traces] == [0.0, 1.0, 0.0, 0.0]  # \frac{1}{2} is not a plain number
    assert [t.components["format"] for t in traces] == [1.0, 0.0, 0.0, 0.0]  # closed and a thought before the answer
    assert results[3].status == "unparsable" and "answer_format" in results[3].error
    last = _parsed_trace("first 3, then 4.", "last_number", "4", 0)
    default = Scorer(RewardConfig())
    try:
        default.score([Group("g1", "p", 0, [last])])
    finally:
        default.close()
    assert last.components["correct"] == 1.0


def test_old_payloads_without_a_question_decode():
    trace = make_trace()
    fields = {k: v for k, v in msgspec.structs.asdict(trace).items() if k != "question"}
    payload = msgspec.msgpack.encode({"group_id": "g1", "prompt_id": "p", "policy_version": 0, "traces": [fields]})
    assert decode_group(payload).traces[0].question == ""
    trace.question = "A=[3] i=0"
    assert decode_group(encode_group(Group("g1", "p", 0, [trace]))).traces[0].question == "A=[3] i=0"


def _asked(question: str, k: int = 0):
    t = make_trace(answer="7", k=k)
    t.prompt, t.question = f"<|im_start|>system\nTEMPLATED<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n", question
    return t


def test_judge_reads_the_question_not_the_templated_prompt(tiny_model):
    from scratchpad.actors.judge_engine import JudgeEngine

    spec = {"name": "judge", "kind": "judge", "engine": "hf", "model_path": tiny_model, "max_new_tokens": 8, "max_retries": 0,
            "template": "{prompt} {response}\n"}
    cfg = load_config(None, [f"reward.components=[{json.dumps(spec)}]"]).reward
    scorer = Scorer(cfg, models={"judge": JudgeEngine(cfg.components[0], tiny_model)})
    scorer.score([Group("g1", "p", 0, [_asked("A=[7,1] i=0")])])
    assert scorer.judges["judge"].seen == ["A=[7,1] i=0 7\n"]


def test_reward_model_reads_the_question(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scratchpad.rewards.models import RewardModel

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    rm = RewardModel(str(tmp_path / "rm"))
    spec = {"name": "rm", "kind": "reward_model", "model_path": str(tmp_path / "rm")}
    scorer = Scorer(load_config(None, [f"reward.components=[{json.dumps(spec)}]"]).reward, models={"rm": rm})
    trace = _asked("A=[7,1] i=0")
    scorer.score([Group("g1", "p", 0, [trace])])
    [by_question], [by_prompt] = (rm.score([{"prompt": text, "answer": "7"}]) for text in (trace.question, trace.prompt))
    assert trace.components["rm"] == pytest.approx(by_question, abs=1e-6) and by_question != pytest.approx(by_prompt, abs=1e-3)
