"""The decode pool's worker, run as a Ray actor.

Owns steps 3 and 5 of a request's life: it admits a request when a sequence slot and the KV
blocks are free, reserves KV blocks for its prompt (reusing blocks it already caches, so only
the missing suffix travels) and hands the prefill worker a transfer ticket, or prefills the
prompt itself when the router decides that is faster; it waits for the KV to land, decodes the
request in its continuous batch and sends every step's new tokens of each router's requests to
that router in one message. It registers itself in the cluster's registry, publishes its load
and prefix-cache events, and aborts the requests of a router that stopped polling. Run with role
"mixed" it prefills everything itself: that is colocated serving.
"""
from decode_worker.outbox import StepDelta
from decode_worker.worker import AdmitReply, DecodeWorker, OutputBatch, Reservation, StaleGenerationError

__all__ = ["AdmitReply", "DecodeWorker", "OutputBatch", "Reservation", "StaleGenerationError", "StepDelta"]
