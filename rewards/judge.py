"""An LLM judge for Thought Preference Optimisation: it sees the instruction and the response, never the thought.

The judge's text engine (`complete(texts, temperature, max_new_tokens) -> replies`) lives in its own Ray
actor (actors/judge_engine.py). Here: the prompts, the parsing of verdicts, bounded retries of unparsable
replies, and a cache of verdicts keyed by a hash of exactly what the judge saw (the same prompt is never judged
twice, and a changed template is never served a stale verdict). The cache has two tiers: an LRU in the reward
actor, and a `SharedHash` in the run's Redis, which every reward actor of the run reads and writes, so a verdict
one actor paid for is never bought again by another (and survives a restart with the append-only file).
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Any

from scratchpad.common.buffer import SharedHash
from scratchpad.common.records import Trace
from scratchpad.rewards.checkers import NO_ANSWER
from scratchpad.rewards.sandbox import Outcome

RETRY_TEMPERATURE = 0.7  # a greedy judge would repeat its unparsable reply


def instruction_of(trace: Trace) -> str:
    """What a judge or reward model reads as the instruction: the user's question, not the policy's templated prompt
    (a payload from before traces carried the question falls back to the prompt)."""
    return (trace.question or trace.prompt).strip()


def _complete(engine: Any, texts: list[str], temperature: float, max_new_tokens: int, timeout: float) -> list[str]:
    if hasattr(engine.complete, "remote"):
        import ray

        return ray.get(engine.complete.remote(texts, temperature, max_new_tokens), timeout=timeout)
    return engine.complete(texts, temperature, max_new_tokens)


class Judge:
    """Pointwise scores in [0, 1] or pairwise win rates, one Outcome per trace."""

    def __init__(self, component, engine: Any, shared: SharedHash | None = None):
        self.c, self.engine, self.shared = component, engine, shared
        self.score_re, self.winner_re = re.compile(component.score_pattern), re.compile(component.winner_pattern)
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.asked = 0  # judge prompts sent to the engine (cache misses and retries), for tests and metrics
        self.seen: list[str] = []  # the last batch's judge prompts, exactly as the judge read them

    def _parse_score(self, reply: str) -> float | None:
        match = self.score_re.search(reply)
        if match is None:
            return None
        try:
            value = float(match.group(1))
        except (TypeError, ValueError):  # an optional group that did not take part is None
            return None
        if not self.c.score_min <= value <= self.c.score_max:
            return None
        return (value - self.c.score_min) / (self.c.score_max - self.c.score_min)

    def _parse_winner(self, reply: str) -> str | None:
        match = self.winner_re.search(reply)
        winner = (match.group(1) or "").upper() if match else ""  # an optional group that did not take part is None
        return winner if winner in ("A", "B") else None

    def _verdicts(self, texts: list[str], parse) -> list[Any]:
        """Parsed verdict per text (None when still unparsable after max_retries), through the cache."""
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        verdicts = [self.cache.get(k) for k in keys]
        for k in keys:
            if k in self.cache:
                self.cache.move_to_end(k)
        if self.shared is not None and self.c.cache_size:
            missing = [i for i, v in enumerate(verdicts) if v is None]
            for i, v in zip(missing, self.shared.get([keys[i] for i in missing])):
                if v is not None:
                    verdicts[i] = self.cache[keys[i]] = v
        first: dict[str, int] = {}  # identical prompts are asked once
        for i, (k, v) in enumerate(zip(keys, verdicts)):
            if v is None:
                first.setdefault(k, i)
        todo = list(first.values())
        for attempt in range(self.c.max_retries + 1):
            if not todo:
                break
            temperature = self.c.temperature if attempt == 0 else max(self.c.temperature, RETRY_TEMPERATURE)
            replies = _complete(self.engine, [texts[i] for i in todo], temperature, self.c.max_new_tokens, self.c.timeout_s)
            self.asked += len(todo)
            still = []
            for i, reply in zip(todo, replies):
                verdict = parse(reply)
                if verdict is None:
                    still.append(i)
                else:
                    verdicts[i] = verdict
                    if self.c.cache_size:
                        self.cache[keys[i]] = verdict
            todo = still
        if self.shared is not None and self.c.cache_size:
            self.shared.put({keys[i]: verdicts[i] for i in first.values() if verdicts[i] is not None})
        while len(self.cache) > self.c.cache_size:
            self.cache.popitem(last=False)
        by_key = {k: v for k, v in zip(keys, verdicts) if v is not None}
        return [by_key.get(k) for k in keys]

    @staticmethod
    def shared_cache(buffer_address, component) -> SharedHash:
        """The run's Redis hash of this judge's verdicts: named by the component, its model and its mode."""
        judge_id = hashlib.sha256(f"{component.model_path}\0{component.mode}".encode()).hexdigest()[:12]
        return SharedHash(buffer_address, f"judge:{component.name}:{judge_id}", component.cache_size)

    def score(self, traces: list[Trace]) -> list[Outcome]:
        unparsable = Outcome("unparsable", 0.0, NO_ANSWER)
        if self.c.mode == "pointwise":
            wanted = [i for i, t in enumerate(traces) if t.answer is not None]
            texts = [self.c.template.format(prompt=instruction_of(traces[i]), response=traces[i].answer) for i in wanted]
            self.seen = texts
            outcomes = [unparsable] * len(traces)
            for i, v in zip(wanted, self._verdicts(texts, self._parse_score)):
                outcomes[i] = Outcome("ok", v, None) if v is not None else Outcome(
                    "unparsable", 0.0, f"judge reply unparsable after {self.c.max_retries} retries")
            return outcomes
        return self._pairwise(traces, unparsable)

    def _pairwise(self, traces: list[Trace], unparsable: Outcome) -> list[Outcome]:
        """Each answered trace against every other answered trace of its group, in both orders; value = win rate."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(traces):
            if t.answer is not None:
                groups.setdefault(t.group_id, []).append(i)
        pairs = [(a, b) for members in groups.values() for a in members for b in members if a != b]
        texts = [self.c.pairwise_template.format(prompt=instruction_of(traces[a]), response_a=traces[a].answer,
                                                 response_b=traces[b].answer) for a, b in pairs]
        self.seen = texts
        wins: dict[int, list[float]] = {}
        for (a, b), winner in zip(pairs, self._verdicts(texts, self._parse_winner)):
            if winner is not None:
                wins.setdefault(a, []).append(float(winner == "A"))
                wins.setdefault(b, []).append(float(winner == "B"))
        outcomes = []
        for i, t in enumerate(traces):
            if t.answer is None:
                outcomes.append(unparsable)
            elif i in wins:
                outcomes.append(Outcome("ok", sum(wins[i]) / len(wins[i]), None))
            elif len(groups[t.group_id]) == 1:
                outcomes.append(Outcome("ok", 0.5, None))  # nothing to compare with: a neutral value
            else:
                outcomes.append(Outcome("unparsable", 0.0, f"no parsable pairwise verdict after {self.c.max_retries} retries"))
        return outcomes
