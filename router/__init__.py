"""pdserve's front door and orchestrator.

Admits requests over gRPC (grpc_server) and the OpenAI-compatible HTTP API (http/), both through
intake (validation, tokenization, chat templates) and relay (incremental detokenization, stop
strings, cancellation), picks prefill and decode workers, streams decoded text back, counts what
it serves (metrics), and manages the worker pools on Ray. It owns steps 1, 2, 6 and 7 of a request's life; the `pdserve` CLI lives here.
"""
