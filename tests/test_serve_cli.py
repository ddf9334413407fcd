"""`pdserve serve` with no flags comes up, answers health, and `pdserve client` and the HTTP API
stream text."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request

import pytest

from tests.cluster_helpers import pdserve_command, wait_for_serving

pytestmark = pytest.mark.slow


def test_serve_with_no_flags_then_client_streams_text(demo_gguf_path):
    # No flags at all: local Ray, 1 prefill + 1 decode worker, the demo model, gRPC on 50051 and
    # HTTP on 8000.
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
        # The README's first command: no --max-tokens, so no cut at 16 tokens mid-sentence.
        readme = subprocess.run(pdserve_command() + ["client", "--chat", "--temperature", "0", "--usage",
                                                     "Why is the sky blue?"],
                                capture_output=True, text=True, timeout=300)
        assert readme.returncode == 0, readme.stderr
        completion = int(re.search(r"completion=(\d+)", readme.stderr).group(1))
        assert completion > 16 and "[stop]" in readme.stderr, readme.stderr
        # The README's curl command, over the OpenAI-compatible HTTP API on its default port.
        body = json.dumps({"model": "demo", "max_tokens": 24, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        request = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] <= 24
        with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=10) as response:
            assert response.status == 200
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        assert "shutting down" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
