"""Pool placement and configuration rules, without starting Ray."""
from __future__ import annotations

import pytest

from router.pools import LeastLoaded, PoolConfig, WorkerHandle, _actor_options


def test_workers_ask_for_a_gpu_only_when_the_cluster_has_them():
    assert "num_gpus" not in _actor_options("decode", {"CPU": 8.0}, ray_gpus=False)
    assert _actor_options("prefill", {"CPU": 8.0, "GPU": 2.0}, ray_gpus=True)["num_gpus"] == 1


def test_pools_pin_to_node_types_advertising_their_resource():
    cluster = {"CPU": 16.0, "prefill": 2.0, "decode": 4.0}
    assert _actor_options("prefill", cluster, False)["resources"] == {"prefill": 1}
    assert _actor_options("decode", cluster, False)["resources"] == {"decode": 1}
    assert "resources" not in _actor_options("decode", {"CPU": 16.0}, False)


def test_least_loaded_picks_fewest_in_flight_then_lowest_index():
    workers = [WorkerHandle("decode", i, actor=None) for i in range(3)]
    workers[0].in_flight, workers[1].in_flight, workers[2].in_flight = 2, 1, 1
    assert LeastLoaded().choose(workers, [1, 2, 3]).index == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "hybrid"}, "mode must be"),
    ({"num_decode_workers": 0}, "at least one decode worker"),
    ({"num_prefill_workers": 0}, "needs at least one prefill worker"),
])
def test_pool_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolConfig(**kwargs)


def test_colocated_mode_needs_no_prefill_pool():
    assert PoolConfig(mode="colocated", num_prefill_workers=0).num_prefill_workers == 0


def test_dead_workers_get_no_new_requests():
    from engine.config import EngineConfig
    from router.pools import WorkerPools

    pools = WorkerPools(PoolConfig(num_decode_workers=2), EngineConfig(), EngineConfig())
    pools.decode = [WorkerHandle("decode", i, actor=None) for i in range(2)]
    pools.decode[0].healthy = False  # idle, but dead
    pools.decode[1].in_flight = 5
    assert pools.choose(pools.decode, [1]).index == 1
    pools.decode[1].healthy = False
    assert pools.choose(pools.decode, [1]) is None
