"""Offline batch generation: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    """The whole result of one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    first_token_time_s: float | None = None
    finished_time_s: float | None = None
    arrival_time_s: float = 0.0


class LLM:
    """Runs a batch of prompts through the engine with continuous batching."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **kwargs) -> None:
        if config is None:
            config = EngineConfig(**({"model": model} if model else {}), **kwargs)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers, if any (one rank: nothing to stop)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None:
            params = SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, CompletionOutput] = {}
        order = []
        for prompt, p in zip(prompts, params_list):
            rid = f"offline-{next(self._ids)}"
            seq = self.engine.add_request(rid, prompt, p)  # type: ignore[arg-type]
            results[rid] = CompletionOutput(rid, seq.prompt_token_ids, arrival_time_s=seq.arrival_time_s)
            order.append(rid)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="generate", unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self._accumulate(results[out.request_id], out)
                if out.finished and bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [results[r] for r in order]

    @staticmethod
    def _accumulate(res: CompletionOutput, out: RequestOutput) -> None:
        res.text += out.new_text
        res.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            res.logprobs.extend(out.new_logprobs)
        res.first_token_time_s = out.first_token_time_s
        if out.finished:
            res.finish_reason = out.finish_reason
            res.stop_reason = out.stop_reason
            res.finished_time_s = out.finished_time_s
