"""Engines for the endpoint tests (test_openai_endpoint.py, test_verifiers_rollout.py): the real hf engine, with
what it served recorded, and a variant that serves a fixed tool call on turn 0."""

from __future__ import annotations

import threading

import torch

from rollout.engine import Sample, build_batch


class Recording:
    """The real hf engine, with every `generate` call's sampled turns recorded per request id (what it served)."""

    def __init__(self, engine) -> None:
        self.engine, self.calls, self.sampled, self.lock = engine, 0, {}, threading.Lock()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def generate(self, prompts, params):
        batch = self.engine.generate(prompts, params)
        with self.lock:
            self.calls += 1
            for i, p in enumerate(prompts):
                self.sampled[p.prompt_id] = batch.input_ids[i][batch.loss_mask[i]].tolist()
        return batch


class Steered(Recording):
    """The real hf engine, except that turn 0 of every episode "samples" the call text `call` (the random tiny model
    writes no tool calls): its ids, with the log-probs the tiny model gives them in exactly the context it was
    served in (one fp32 forward), as a sampler that drew them would record. The later turns are really sampled."""

    def __init__(self, engine, model, tokenizer, call: str) -> None:
        super().__init__(engine)
        self.model, self.tokenizer = model, tokenizer
        self.call = tokenizer(call, add_special_tokens=False)["input_ids"]
        self.contexts: dict[str, list[int]] = {}

    def generate(self, prompts, params):
        with self.lock:
            self.contexts.update({p.prompt_id: list(p.token_ids) for p in prompts})
        if any(p.prompt_id.split("#")[2] != "0" for p in prompts):
            return super().generate(prompts, params)
        samples = []
        for p in prompts:
            ids = torch.tensor([[*p.token_ids, *self.call]])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            lps = logp[len(p.token_ids) - 1:].gather(1, ids[0, len(p.token_ids):, None]).squeeze(1).tolist()
            samples.append(Sample(p, 0, tuple(self.call), tuple(lps), "stop"))
            with self.lock:
                self.sampled[p.prompt_id] = list(self.call)
        with self.lock:
            self.calls += 1
        return build_batch(samples, self.tokenizer, self.tokenizer.pad_token_id, 0)
