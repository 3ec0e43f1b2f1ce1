"""Answer checkers: pure functions (answer, reference, **options) -> bool.

They read only what actors/formatting.py extracted in task.answer_format (the <answer> block, the last \\boxed{},
the regex's group or the last number), never the rest of the completion.

They run inside the sandbox's worker processes (rewards/sandbox.py), which can be
killed when a check overruns; nothing here needs a timeout of its own. A checker
raises `Unparsable` when the answer cannot be read at all (the trace's status
says so) and any other exception for a reference it cannot read (status error).
"""
from __future__ import annotations

import logging
import math
import re


NO_ANSWER = "no answer in the completion (task.answer_format found none)"  # a trace's error when its answer is None


class Unparsable(Exception):
    """The answer could not be read (not a number, no option letter, no mathematical expression)."""


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact(answer: str, reference: str) -> bool:
    """Normalised exact match (case, surrounding and repeated whitespace ignored)."""
    return normalise(answer) == normalise(reference)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _number(text: str) -> float:
    """The text as a number: thousands commas, a leading $, a trailing % or unit word are ignored; a/b is a fraction."""
    cleaned = text.strip().replace(",", "").lstrip("$").strip()
    fraction = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*(\d+)\s*", cleaned)
    if fraction:
        return int(fraction.group(1)) / int(fraction.group(2))
    match = _NUMBER.match(cleaned)
    if match is None or not re.fullmatch(r"\s*%?\s*[A-Za-z]*\s*\.?", cleaned[match.end():]):
        raise Unparsable(f"not a number: {text[:80]!r}")
    return float(match.group(0))


def numeric(answer: str, reference: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """|a - r| <= max(abs_tol, rel_tol * |r|)."""
    try:
        ref = _number(reference)
    except Unparsable as exc:
        raise ValueError(f"reference {exc}") from None
    value = _number(answer)
    return math.isfinite(value) and abs(value - ref) <= max(abs_tol, rel_tol * abs(ref))


def _option(text: str, options: str) -> str:
    """The option letter in "B", "(b)", "B) 42", "B. foo", "answer: B", "\\boxed{B}"."""
    cleaned = re.sub(r"^\s*(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:=]?\s*", "", text.strip(), flags=re.I)
    cleaned = re.sub(r"^\\boxed\{(.*)\}$", r"\1", cleaned.strip())
    match = re.match(r"^[\(\[]?([A-Za-z])(?:[\)\]\.:]|\s|$)", cleaned.strip())
    if match is None or match.group(1).upper() not in options:
        raise Unparsable(f"no option letter among {options}: {text[:80]!r}")
    return match.group(1).upper()


def choice(answer: str, reference: str, options: str = "ABCDEFGHIJ") -> bool:
    try:
        ref = _option(reference, options)
    except Unparsable as exc:
        raise ValueError(f"reference has {exc}") from None
    return _option(answer, options) == ref


def _math_parse(text: str, extraction: list, whose: str, failure: type[Exception]):
    """math-verify's parse of `text`; when its parser raises (it would log that and return nothing), `failure`
    naming whose text it was: the answer's is unparsable, the reference's an error."""
    from math_verify import parse

    # Its "timeout is disabled" warning is expected: the sandbox kills an overrunning worker instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # math-verify finds LaTeX only between delimiters ($..$, \boxed{}, \[..\]); a bare `\{1,2\}` or `(0,1]` is wrapped.
    delimited = any(d in text for d in ("$", "\\boxed", "\\[", "\\("))
    try:
        return parse(text if delimited else f"${text}$", extraction_config=extraction, parsing_timeout=None, raise_on_error=True)
    except Exception as exc:  # noqa: BLE001 - the parser crashed on this text
        raise failure(f"math-verify failed parsing the {whose} {text[:80]!r}: {type(exc).__name__}: {exc}") from None


def math_equal(answer: str, reference: str, float_rounding: int = 6) -> bool:
    """Mathematical equivalence by math-verify: 0.5 = \\frac{1}{2}, \\boxed{2} = 2, \\{1,2\\} = \\{2,1\\}, intervals."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, verify

    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = _math_parse(reference, extraction, "reference", ValueError)
    if not gold:
        raise ValueError(f"reference is not a mathematical expression: {reference[:80]!r}")
    target = _math_parse(answer, extraction, "answer", Unparsable)
    if not target:
        raise Unparsable(f"no mathematical expression in the answer: {answer[:80]!r}")
    # Timeouts are the sandbox's job (it kills the worker); math-verify's own uses SIGALRM, main thread only.
    if verify(gold, target, float_rounding=float_rounding, timeout_seconds=None):
        return True
    # math-verify turns a comparison that raised into False; ask again with errors raised, so that a check which
    # failed (rather than found the answer different) gets status `error` instead of passing as a wrong answer.
    try:
        verify(gold, target, float_rounding=float_rounding, timeout_seconds=None, raise_on_error=True)
    except Exception as exc:  # noqa: BLE001 - any failure inside math-verify is the check's error, reported as such
        raise RuntimeError(f"math-verify failed comparing the answer with the reference: {type(exc).__name__}: {exc}") from None
    return False


CHECKERS = {"exact": exact, "numeric": numeric, "choice": choice, "math": math_equal}


def options_of(component) -> dict:
    """The keyword options a component passes to its checker."""
    if component.kind == "numeric":
        return {"rel_tol": component.rel_tol, "abs_tol": component.abs_tol}
    if component.kind == "choice":
        return {"options": component.options}
    if component.kind == "math":
        return {"float_rounding": component.float_rounding}
    return {}
