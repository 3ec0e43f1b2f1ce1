"""Prompt formatting (chain-of-thought or direct) and parsing a completion into thought and answer.

Format: `<think>scratchpad</think><answer>answer</answer>`. The thought is
carried along for reading and for likelihood rewards but never graded.
"""
from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

INSTRUCTIONS = {
    "cot": "Think step by step inside <think></think>, then give only the final answer inside <answer></answer>.",
    "direct": "Give only the final answer inside <answer></answer>.",
}

_ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_THINK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), re.DOTALL)


def plain_prompt(question: str) -> str:
    """Prompt for a model without a chat template (the tiny model): the question and a newline."""
    return question + "\n"


def target_completion(mode: str, thought: str, answer: str) -> str:
    """The completion a perfect policy would write (warm-start data)."""
    body = f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}{body}" if mode == "cot" else body


def chat_prompt(tokenizer, question: str, mode: str) -> str:
    """Prompt for an instruct model: its chat template around the question and the format instruction."""
    messages = [{"role": "system", "content": INSTRUCTIONS[mode]}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def parse_completion(text: str) -> tuple[str | None, str | None, bool]:
    """(thought, answer, closed): the first <answer> block, the <think> block before it, and
    whether nothing but whitespace follows the answer block (a policy that keeps writing after
    its answer is not rewarded, or it drifts to never stopping)."""
    match = _ANSWER.search(text)
    if match is None:
        think = _THINK.search(text)
        return (think.group(1) if think else None), None, False
    think = _THINK.search(text, 0, match.start())
    closed = text[match.end():].strip() == ""
    return (think.group(1) if think else None), match.group(1).strip(), closed
