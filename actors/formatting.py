"""The prompt template (instruction, worked examples, chat template) and parsing a completion into thought and answer.

`task.answer_format` says where the answer is; for each format, `parse_completion` defines:

| format | answer | thought | closed (reward.require_stop) |
| --- | --- | --- | --- |
| tags | the first `<answer>..</answer>` | the `<think>..</think>` before it | only whitespace follows `</answer>` |
| boxed | the last `\\boxed{..}` whose braces balance | `<think>` block, else the text before the answer | only whitespace, `.`, `!`, `*`, `)`, `$`, `\\]`, `\\)` follow |
| regex | `answer_regex`'s group in its last match | `<think>` block, else the text before the match | only whitespace follows the match |
| last_number | the last number (thousands commas dropped) | `<think>` block, else the text before it | as boxed |

The thought is carried along for reading and for likelihood rewards but never graded; a text before the answer
counts as a thought whatever it says ("The answer is" too). Answers are stripped; None when there is none.
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple

from scratchpad.common.config import TaskConfig

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOXED = "\\boxed{"
SHOTS_SEED_OFFSET = 3000017  # worked examples never share a seed with the training (seed) or held-out (seed + 1000003) streams

INSTRUCTIONS = {
    ("tags", "cot"): "Think step by step inside <think></think>, then give only the final answer inside <answer></answer>.",
    ("tags", "direct"): "Give only the final answer inside <answer></answer>.",
    ("boxed", "cot"): "Think step by step, then give the final answer as \\boxed{answer}.",
    ("boxed", "direct"): "Give only the final answer, as \\boxed{answer}.",
    ("regex", "cot"): "Think step by step, then end with a last line 'Answer: <answer>'.",
    ("regex", "direct"): "Reply with one line only: 'Answer: <answer>'.",
    ("last_number", "cot"): "Think step by step, then end with the final answer, a number.",
    ("last_number", "direct"): "Reply with the final answer only, a number.",
}

_ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_THINK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), re.DOTALL)
_NUMBER = re.compile(r"(?<!\d)-?\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")  # "-4", "1,234.5"; in "3-5" the last number is 5
_TRAILER = re.compile(r"(?:\s|[.!*)$]|\\[\])])*")  # what may follow a boxed answer or a last number: "$\boxed{3}$." is closed


class Parsed(NamedTuple):
    thought: str | None  # see the module's table; None when absent
    answer: str | None  # the extracted answer, stripped; None when the format finds none
    closed: bool  # nothing but the format's trailer follows the answer


def parse_completion(text: str, answer_format: str = "tags", answer_regex: str | None = None) -> Parsed:
    """(thought, answer, closed) of a completion under `answer_format` (the module's table says what each means)."""
    if answer_format == "tags":
        return _parse_tags(text)
    if answer_format == "boxed":
        span = _last_boxed(text)
    elif answer_format == "regex":
        span = _last_regex(text, answer_regex)
    elif answer_format == "last_number":
        span = _last_number(text)
    else:
        raise ValueError(f"unknown answer format {answer_format!r}")
    if span is None:
        return Parsed(_thought_before(text, len(text)), None, False)
    answer, start, end = span
    trailer = text[end:]
    closed = trailer.strip() == "" if answer_format == "regex" else _TRAILER.fullmatch(trailer) is not None
    return Parsed(_thought_before(text, start), answer, closed)


def _parse_tags(text: str) -> Parsed:
    match = _ANSWER.search(text)
    if match is None:
        think = _THINK.search(text)
        return Parsed(think.group(1) if think else None, None, False)
    think = _THINK.search(text, 0, match.start())
    closed = text[match.end():].strip() == ""
    return Parsed(think.group(1) if think else None, match.group(1).strip(), closed)


def _thought_before(text: str, start: int) -> str | None:
    """The <think> block before `start`, else the text before it (None when only whitespace)."""
    think = _THINK.search(text, 0, start)
    if think is not None:
        return think.group(1)
    before = text[:start].strip()
    return before or None


def _last_boxed(text: str) -> tuple[str, int, int] | None:
    """(content, start, end) of the last \\boxed{..} whose braces balance; nested braces stay in the content."""
    start = text.rfind(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(BOXED): i - 1].strip(), start, i
        start = text.rfind(BOXED, 0, start)
    return None


def _last_regex(text: str, pattern: str | None) -> tuple[str, int, int] | None:
    if pattern is None:
        raise ValueError("answer_format regex needs answer_regex")
    matches = [m for m in re.finditer(pattern, text) if m.group(1) is not None]
    if not matches:
        return None
    last = matches[-1]
    return last.group(1).strip(), last.start(), last.end()


def _last_number(text: str) -> tuple[str, int, int] | None:
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(0).replace(",", ""), last.start(), last.end()


def instruction(answer_format: str, mode: str) -> str:
    """The built-in instruction for a format and mode (what task.system_prompt null means for chat models)."""
    return INSTRUCTIONS[(answer_format, mode)]


def target_completion(mode: str, thought: str | None, answer: str, answer_format: str = "tags") -> str:
    """The completion a perfect policy would write in this format (worked examples, cold start, warm start);
    the answer follows what the format's instruction asks for."""
    think = mode == "cot" and thought is not None
    if answer_format == "tags":
        body = f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
        return f"{THINK_OPEN}{thought}{THINK_CLOSE}{body}" if think else body
    if answer_format == "boxed":
        return f"{thought}\nThe answer is {BOXED}{answer}}}." if think else f"{BOXED}{answer}}}"
    if answer_format == "regex":  # common/config.py checks that answer_regex reads this line
        return f"{thought}\nAnswer: {answer}" if think else f"Answer: {answer}"
    if answer_format == "last_number":
        return f"{thought}\nThe answer is {answer}." if think else answer
    raise ValueError(f"unknown answer format {answer_format!r}")


def plain_prompt(question: str) -> str:
    """Prompt for a model without a chat template (the tiny model): the question and a newline."""
    return question + "\n"


def worked_examples(task: TaskConfig, count: int, seed: int, min_len: int, max_len: int) -> list[tuple[str, str | None, str]]:
    """`count` (question, thought, answer) examples no held-out question is among: the synthetic generator's worked
    scratchpads, or (jsonl, thought None) rows of the train file. A stream of its own, seeded by `seed`."""
    from scratchpad.actors.tasks import GENERATORS, eval_set, read_jsonl, worked_thought

    held_out = {p.text for p in eval_set(task)}
    rng = random.Random(seed)
    if task.name == "jsonl":
        rows = [p for p in read_jsonl(task.train_path, task.max_bad_rows) if p.text not in held_out]
        return [(p.text, None, p.answer) for p in rng.sample(rows, min(count, len(rows)))]
    out, tries = [], 0
    while len(out) < count:
        question, answer, _ = GENERATORS[task.name](rng, min_len, max_len)
        tries += 1
        if question not in held_out:
            out.append((question, worked_thought(task.name, question), answer))
        elif tries > 1000 * (count + 1):
            raise ValueError(f"{task.name} lengths {min_len}-{max_len}: every example drawn is a held-out question")
    return out


class PromptFormat:
    """What a rollout actor (and the cold start) puts around a question, and how it reads the answer back."""

    def __init__(self, task: TaskConfig, tokenizer):
        self.task, self.tokenizer = task, tokenizer
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        # Plain models get no built-in instruction: the tiny model was warm-started on bare questions.
        builtin = instruction(task.answer_format, task.mode) if self.chat else ""
        self.system = builtin if task.system_prompt is None else task.system_prompt
        examples = worked_examples(task, task.shots, task.seed + SHOTS_SEED_OFFSET, task.min_len, task.max_len) if task.shots else []
        self.shots = [(q, self.target(t, a)) for q, t, a in examples]

    def target(self, thought: str | None, answer: str, mode: str | None = None) -> str:
        return target_completion(mode or self.task.mode, thought, answer, self.task.answer_format)

    def render(self, question: str) -> str:
        """The prompt text the model is conditioned on (tokenise it with add_special_tokens = not self.chat)."""
        if self.chat:
            return self.tokenizer.apply_chat_template(self.messages(question), tokenize=False, add_generation_prompt=True)
        head = f"{self.system}\n" if self.system else ""
        return head + "".join(f"{plain_prompt(q)}{c}\n" for q, c in self.shots) + plain_prompt(question)

    def messages(self, question: str) -> list[dict]:
        """The conversation `render` templates (chat models only), for trainers that apply the template themselves:
        the instruction as a system turn (none when it is empty), the worked examples as user/assistant turns, and
        the question."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for question_k, completion_k in self.shots:
            messages += [{"role": "user", "content": question_k}, {"role": "assistant", "content": completion_k}]
        return messages + [{"role": "user", "content": question}]

    def parse(self, completion: str) -> Parsed:
        return parse_completion(completion, self.task.answer_format, self.task.answer_regex)

    def end_of_turn(self) -> int:
        """The token that ends an assistant turn: the chat template's first special token after the reply (ChatML's
        <|im_end|>), else EOS. A completion that is to stop is trained with it appended."""
        if self.chat:
            messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "XYZ"}]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
            suffix = rendered[rendered.rfind("XYZ") + 3:]
            ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
            special = set(self.tokenizer.all_special_ids)
            if ids and ids[0] in special:
                return ids[0]
        return self.tokenizer.eos_token_id
