"""The prefill pool's worker, run as a Ray actor.

Owns step 4 of a request's life: it batches prompts with chunked prefill under a token budget,
pushes the KV of every block a chunk completes into the blocks the decode worker reserved (a
sender thread moves one chunk while the engine computes the next), samples the first token and
reports it. Its own blocks stay behind as prefix cache.
"""
from prefill_worker.worker import PrefillResult, PrefillWorker

__all__ = ["PrefillResult", "PrefillWorker"]
