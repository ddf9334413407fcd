"""The decode pool's worker, run as a Ray actor.

Owns steps 3 and 5 of a request's life: it reserves KV blocks for a prompt (reusing blocks it
already caches, so only the missing suffix travels), hands the prefill worker a transfer ticket,
waits for the KV to land in its cache, then decodes the request in its continuous batch and
sends every step's new tokens of all its requests to the router in one message. Run with
role "mixed" it also prefills on its own: that is colocated serving.
"""
from decode_worker.worker import DecodeWorker, Reservation, StepDelta

__all__ = ["DecodeWorker", "Reservation", "StepDelta"]
