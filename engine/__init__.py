"""pdserve's single-process engine: everything needed to run a model in one process.

Model definitions (Llama family), weight loading (HF directories, GGUF), tokenizer and chat
template, the paged KV cache with prefix caching, attention backends, sampler, and the
continuous-batching scheduler. Every pdserve worker runs this engine; in a request's life it
owns the compute of steps 4 (prefill) and 5 (decode). It knows nothing of Ray, gRPC or KV transfer.
"""
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    # Import the heavy parts (torch, model code) only when they are used.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "RequestOutput":
        from engine.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(name)
