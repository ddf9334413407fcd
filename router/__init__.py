"""pdserve's front door and orchestrator.

Admits requests over gRPC (validation, tokenization, chat templates), picks prefill and decode
workers, streams decoded text back (incremental detokenization, stop strings), and manages the
worker pools on Ray. It owns steps 1, 2, 6 and 7 of a request's life; the `pdserve` CLI lives here.
"""
