"""A rollout worker: one engine, prompts in, `RolloutBatch` out, weights in from the learner."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.loop.weights import sync_mode
from rl.types import FullWeights, LoraFiles, Prompt, RolloutEngine, SamplingParams, SharedModel, WeightSync

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rollout.endpoint_rollout import ServedRollout
    from rollout.episodes import EpisodeRollout


class EngineWorker:
    """Wraps an engine built from the job (a `rl.types.RolloutWorker`); `shared_model` lets the local HF engine
    sample with the learner's own model (no copy and no weight sync: the same weights by construction)."""

    def __init__(self, job: JobConfig, model_dir: str, shared_model: torch.nn.Module | None = None) -> None:
        from rollout.engine import build_engine
        from trainers.adapters import lora_form_rank

        self.job = job
        self.shared = shared_model is not None
        # A vLLM engine serves LoRA only when started for it, up to the adapter's LoRA-form rank.
        max_lora_rank = lora_form_rank(job.adapter) if sync_mode(job) == "lora" else None
        self.engine: RolloutEngine = build_engine(job.rollout, model_dir, dtype=job.model.dtype, device="auto",
                                                  seed=job.seed, model=shared_model, max_lora_rank=max_lora_rank)
        self.version = 0
        self._adapter_dir: Path | None = None  # the LoRA folder the engine serves now (see _serve)
        # Multi-turn episodes run here, beside the engine: each rollout worker calls its own tools.
        self.episodes = _episodes(job, model_dir, self.engine) if job.agent is not None else None

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        if self.episodes is not None:
            return self.episodes.generate(prompts, params)
        if params.multi_answer is not None:  # GRPO-MA: thoughts, then answers per thought, on any engine
            from rollout.multi_answer import generate_multi_answer

            return generate_multi_answer(self.engine, prompts, params)
        return self.engine.generate(prompts, params)

    def load_weights(self, sync: WeightSync, version: int) -> float:
        """Serve the learner's `sync` as policy `version` from now on; returns seconds spent."""
        start = time.perf_counter()
        self.version = version
        match sync:
            case SharedModel():  # the engine samples with the learner's own model: only the version moves
                self.engine.policy_version = version
            case LoraFiles(files=files):
                self._load_lora(files, version)
            case FullWeights(tensors=tensors):
                self.engine.push_weights(tensors.items(), version)
                self._serve(None)  # full weights carry the policy now
            case _:
                raise TypeError(f"not a WeightSync: {type(sync).__name__}")
        return time.perf_counter() - start

    def _load_lora(self, files: Mapping[str, bytes], version: int) -> None:
        folder = _write_adapter(files, version)
        try:
            self.engine.push_lora(str(folder), version)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # not served: the previous adapter stays in use
            raise
        self._serve(folder)

    def _serve(self, folder: Path | None) -> None:
        """Record the adapter folder the engine serves from now on and delete the one it served before.

        vLLM reads a folder when a request with its adapter id is first scheduled, and again if its LoRA cache
        evicted it, so the served folder stays. The previous one is safe to delete: the engine has dropped that
        id (VLLMEngine.push_lora/push_weights) and no generation overlaps a load (the pipeline waits for the
        one in flight before a sync; a Ray actor runs its calls one at a time)."""
        previous, self._adapter_dir = self._adapter_dir, folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the learner trains (vLLM on GPU; no-op otherwise)."""
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        try:
            if self.episodes is not None:
                self.episodes.close()
            self.engine.close()
        finally:
            self._serve(None)  # nothing is served any more: no adapter folder outlives the worker


def _episodes(job: JobConfig, model_dir: str, engine: RolloutEngine) -> EpisodeRollout | ServedRollout:
    """The job's tool episodes, its OpenAI-client agent's or its verifiers environment's conversations, over
    `engine` (rl/config/agent.py)."""
    from envs.tool_calls import ToolEpisode
    from envs.tools import ToolBox
    from rl.models import load_tokenizer
    from rl.tool_format import detect, observation_frame
    from rollout.episodes import EpisodeRollout

    agent = job.agent
    assert agent is not None
    tokenizer = load_tokenizer(model_dir)
    if agent.verifiers is not None:  # a verifiers environment's rollouts, on the same endpoint
        from rollout.verifiers_rollout import VerifiersRollout

        return VerifiersRollout(engine, tokenizer, agent.verifiers, agent.max_turns, agent.max_total_tokens,
                                agent.tool_format)
    if agent.openai_agent is not None:  # the endpoint samples with this worker's engine: weights follow the learner
        from rl.plugins import load_callable
        from rollout.endpoint_rollout import EndpointRollout

        spec = agent.openai_agent
        run = load_callable(spec.import_path, "openai agent", ("client", "question", "fields"))
        # its signature is checked; what it returns is ignored (typed object, the agent type says None)
        return EndpointRollout(engine, tokenizer, run, spec.concurrency, spec.timeout_s,  # type: ignore[arg-type]
                               agent.max_turns, max_total_tokens=agent.max_total_tokens,
                               tool_format=agent.tool_format)
    tools = ToolBox.from_configs(agent.tools)
    fmt = detect(tokenizer, agent.tool_format)  # the template's own tool syntax, else the tag format
    frame = observation_frame(tokenizer, fmt)
    budget = agent.max_total_tokens or job.rollout.max_new_tokens * agent.max_turns
    return EpisodeRollout(engine, tokenizer,
                          lambda: ToolEpisode(tokenizer, tools, frame, agent.max_observation_tokens, call_format=fmt),
                          agent.max_turns, budget, job.rollout.max_prompt_tokens, stop=fmt.stop,
                          on_close=tools.close, prefill=agent.prefill or "")


def _write_adapter(files: Mapping[str, bytes], version: int) -> Path:
    """A fresh temporary folder holding a pushed PEFT adapter's files (vLLM loads adapters from a path)."""
    folder = Path(tempfile.mkdtemp(prefix=f"rlpost-lora-v{version}-"))
    try:
        for name, data in files.items():
            (folder / name).write_bytes(data)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
