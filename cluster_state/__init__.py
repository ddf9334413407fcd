"""The cluster's shared state in Redis, used by the routers and by the workers.

Owns what several processes must agree on: the one key schema (every key under a cluster-name
prefix, so clusters can share a Redis), the worker registry (records with generations, under
leases renewed by heartbeat), the workers' load reports, the KV block index (fed by the workers'
stored / evicted prefix-cache events, mirrored in every router), the routers' own registry and
the pool spec a joining router attaches to, and the launcher of a private `redis-server`.

It sits below the router and the workers and imports nothing of either (nor of the engine or
kv_transfer): the workers hand it plain callables and dicts.
"""
from cluster_state.connection import RedisSettings, connect, redacted_url
from cluster_state.keys import ClusterKeys

__all__ = ["ClusterKeys", "RedisSettings", "connect", "redacted_url"]
