"""Colocated serving and layer-by-layer KV pushes give the same outputs; a KV layout mismatch is
refused at start-up."""
from __future__ import annotations

import pytest

from router.cluster_backend import RoutingConfig
from router.pools import ClusterStartError, PoolConfig
from router.serve import ServeConfig, running_cluster
from router.embedded import EmbeddedCluster, workers_idle
from tests.test_cluster_e2e import engine_config, run_concurrently, workload  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _ray(ray_local):
    pass


def test_colocated_mode_gives_the_same_greedy_outputs(demo_gguf_path, workload):  # noqa: F811
    prompts, max_tokens, expected = workload
    config = ServeConfig(engine=engine_config(demo_gguf_path),
                         pools=PoolConfig(mode="colocated", num_decode_workers=1))
    with EmbeddedCluster(config) as server:
        results = run_concurrently(server, prompts, max_tokens)
        assert [ids for ids, _, _ in results] == expected
        assert workers_idle(server.wait_for_baseline())
        assert server.backend.pools.prefill == []


def test_layer_by_layer_kv_push_gives_the_same_greedy_outputs(demo_gguf_path, workload):  # noqa: F811
    """The GPU push mode, forced on CPU: each layer's KV goes out as soon as the layer ran."""
    prompts, max_tokens, expected = workload
    config = ServeConfig(engine=engine_config(demo_gguf_path),
                         pools=PoolConfig(mode="disaggregated", kv_push="layer"),
                         routing=RoutingConfig(disaggregation="always"))
    with EmbeddedCluster(config) as server:
        assert server.backend.pools.prefill[0].info["push_granularity"] == "layer"
        results = run_concurrently(server, prompts[:8], max_tokens[:8])
        assert [ids for ids, _, _ in results] == expected[:8]
        after = server.wait_for_baseline()
        assert workers_idle(after)
        assert after["decode"][0].transfer_chunks >= 30 * 8  # at least one push per layer per request


@pytest.mark.parametrize("field,decode_overrides", [
    ("block_size", {"block_size": 32}),
    ("dtype", {"dtype": "bfloat16"}),
])
def test_layout_mismatch_is_refused_at_handshake(demo_gguf_path, field, decode_overrides):
    import asyncio

    config = ServeConfig(engine=engine_config(demo_gguf_path),
                         decode_engine=engine_config(demo_gguf_path, **decode_overrides))

    async def start():
        async with running_cluster(config):
            pass

    with pytest.raises(ClusterStartError, match=f"{field} differs") as err:
        asyncio.run(start())
    assert "prefill worker 0" in str(err.value)
