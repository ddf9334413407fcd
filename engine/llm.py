"""The offline Python API: `LLM(model).generate(prompts, params)` and a streaming form."""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate with a model in this process.

    `options` are engine settings (block_size, num_blocks, kv_cache_memory_gb,
    enable_prefix_caching, max_num_seqs, max_num_batched_tokens, max_model_len,
    enable_chunked_prefill, attention_backend, decode_kernel, dequantize, seed); an unknown
    option is an error.
    """

    def __init__(self, model: str = "demo", dtype: str = "auto", device: str = "auto", **options: Any):
        self.engine = LLMEngine(EngineConfig.from_options(model, dtype=dtype, device=device, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; returns one final output per prompt, in order."""
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        requests = [self.engine.add_request(p, sp) for p, sp in zip(prompt_list, param_list)]
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if use_tqdm:
                        print(f"\rfinished {len(final)}/{len(requests)}", end="", file=sys.stderr)
        if use_tqdm:
            print(file=sys.stderr)
        return [final[r.request_id] for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output each time the request gains text or tokens; the last one is finished.

        Closing the iterator early aborts the request and frees its KV blocks.
        """
        request = self.engine.add_request(prompt, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request.request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(request.request_id)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat conversation rendered with the model's chat template."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_param_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
