"""`pdserve down`: stop a cluster's worker pools and delete its state from Redis.

What the last router of a cluster does when it stops, for pools whose routers were killed.
Workers are found by name in Ray (`{cluster}/...` in the pdserve namespace), so this works
without Redis too; with Redis, every key under the cluster's prefix is deleted.
"""
from __future__ import annotations

import sys

from cluster_state import ClusterKeys, RedisSettings, connect, redacted_url
from cluster_state.routers import RouterRegistry
from router.pools import RAY_NAMESPACE


def _kill_workers(ray_address: str, cluster_name: str) -> int:
    import ray

    from router.serve import use_ray_token_if_present

    use_ray_token_if_present()
    try:
        ray.init(address=ray_address, logging_level="ERROR")
    except ConnectionError as err:
        print(f"pdserve down: no Ray cluster at {ray_address!r} ({err}); no workers stopped", file=sys.stderr)
        return 0
    prefix = f"{cluster_name}/"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == RAY_NAMESPACE and a["name"].startswith(prefix)]
    for name in names:
        ray.kill(ray.get_actor(name, namespace=RAY_NAMESPACE), no_restart=True)
        print(f"pdserve down: stopped {name}", file=sys.stderr)
    ray.shutdown()
    return len(names)


async def take_down_cluster(ray_address: str, redis_url: str | None, cluster_name: str) -> int:
    keys = ClusterKeys(cluster_name)
    stopped = _kill_workers(ray_address, cluster_name)
    deleted = 0
    if redis_url:
        redis = connect(RedisSettings.from_url(redis_url))
        try:
            deleted = await RouterRegistry(redis, keys, "pdserve-down").delete_cluster_keys()
        except Exception as err:
            print(f"pdserve down: cannot clean Redis at {redacted_url(redis_url)}: {err}", file=sys.stderr)
            return 1
        finally:
            await redis.aclose()
    print(f"pdserve down: cluster {cluster_name!r}: {stopped} workers stopped, {deleted} Redis keys "
          "deleted", file=sys.stderr)
    return 0
