"""Model scorers: the likelihood reward's causal LM and a sequence-classification reward model.

Each takes plain dicts and returns one float per item, so the same object works
in-process or as its own Ray actor (cluster/run.py starts one per component,
shared by every reward actor). Inputs are scored in batches, right-padded.
"""
from __future__ import annotations


def _threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


class LikelihoodModel:
    """log p(reference | context) under a causal LM; context = template filled with prompt and thought.

    Context and reference are tokenised apart and joined (the reference's tokens are exactly those scored);
    BOS comes from the context's tokenisation when the tokenizer adds one."""

    def __init__(self, path: str, context_template: str, per_token: bool = False, batch_size: int = 32,
                 threads: int | None = None, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.template, self.per_token, self.batch_size = context_template, per_token, batch_size
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, items: list[dict]) -> list[float]:
        """items: {"prompt", "thought", "reference"}; returns log p(reference tokens | context) per item."""
        import torch

        rows = []
        for item in items:
            context = self.tokenizer(self.template.format(prompt=item["prompt"], thought=item["thought"]))["input_ids"]
            target = self.tokenizer(item["reference"], add_special_tokens=False)["input_ids"]
            if not target:
                raise ValueError(f"reference {item['reference']!r} has no tokens")
            rows.append((context, target))
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(c) + len(t) for c, t in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (c, t) in enumerate(chunk):
                ids[r, : len(c) + len(t)] = torch.tensor(c + t)
                mask[r, : len(c) + len(t)] = 1
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, (c, t) in enumerate(chunk):
                # Target token k sits at position len(c) + k and is predicted from the position before it.
                pos = torch.arange(len(c) - 1, len(c) + len(t) - 1)
                total = logp[r, pos, torch.tensor(t)].sum().item()
                out.append(total / len(t) if self.per_token else total)
        return out


class RewardModel:
    """Scalar scores of an AutoModelForSequenceClassification with one label (the last real token's logit)."""

    def __init__(self, path: str, input_template: str = "{prompt}{answer}", max_length: int = 512, batch_size: int = 32,
                 threads: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"  # keep the answer, which comes last
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one label, this one has {self.model.config.num_labels}")
        self.template, self.max_length, self.batch_size = input_template, max_length, batch_size

    def texts(self, items: list[dict]) -> list[str]:
        return [self.template.format(prompt=item["prompt"], answer=item["answer"]) for item in items]

    def score(self, items: list[dict]) -> list[float]:
        """items: {"prompt", "answer"}; returns the model's scalar score per item."""
        import torch

        texts, out = self.texts(items), []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                out += self.model(**batch).logits[:, 0].float().tolist()
        return out


def load_model_scorer(component, policy_path: str | None, threads: int | None = None):
    """The model a likelihood or reward_model component calls; built in this process."""
    if component.kind == "likelihood":
        path = component.model_path or policy_path
        if path is None:
            raise ValueError(f"reward component {component.name}: model_path is null and no policy path was given")
        return LikelihoodModel(path, component.context_template, component.per_token, component.batch_size, threads)
    if component.kind == "reward_model":
        return RewardModel(component.model_path, component.input_template, component.max_length, component.batch_size, threads)
    raise ValueError(f"component {component.name} of kind {component.kind} has no model")


class ModelScorer:
    """What a model component's Ray actor hosts: the component's model, behind `score(items)`."""

    def __init__(self, component, policy_path: str | None, threads: int | None = None):
        self.model = load_model_scorer(component, policy_path, threads)

    def score(self, items: list[dict]) -> list[float]:
        return self.model.score(items)
