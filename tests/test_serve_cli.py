"""`pdserve serve` with no flags comes up, answers health, and `pdserve client` streams text."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.cluster_helpers import pdserve_command, wait_for_serving

pytestmark = pytest.mark.slow


def test_serve_with_no_flags_then_client_streams_text(demo_gguf_path):
    # No flags at all: local Ray, 1 prefill + 1 decode worker, the demo model, gRPC on 50051.
    server = subprocess.Popen(pdserve_command() + ["serve"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_for_serving("127.0.0.1:50051", server, timeout_s=300)
        client = subprocess.run(
            pdserve_command() + ["client", "--chat", "--temperature", "0", "--max-tokens", "24",
                                 "--usage", "What is the capital of France?"],
            capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        assert "Paris" in client.stdout
        assert "prompt=" in client.stderr and "completion=" in client.stderr
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        assert "shutting down" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
