"""The cluster's KV transfer secret: what every KV sender and receiver proves it knows (an HMAC
challenge, kv_transfer.wire) before any message is read.

From the environment (`PDSERVE_CLUSTER_SECRET`, the same on every node: a Kubernetes Secret, a
`ray up` setup command) when it is set; otherwise the first router draws one at random and keeps
it in Redis, behind Redis's own password, where workers read it when they start. Everyone who
holds it writes it back (SET NX) after a Redis that restarted empty, so a worker that starts then
still gets the secret its peers use.
"""
from __future__ import annotations

import os
import secrets

from cluster_state.keys import ClusterKeys

SECRET_ENV = "PDSERVE_CLUSTER_SECRET"


async def ensure_cluster_secret(redis, keys: ClusterKeys) -> bytes:
    """The secret: the environment's, else the one in Redis (drawn now if there is none)."""
    from_env = os.environ.get(SECRET_ENV)
    if from_env:
        return from_env.encode()
    await redis.set(keys.secret, secrets.token_hex(32), nx=True)
    return bytes(await redis.get(keys.secret))


async def restore_cluster_secret(redis, keys: ClusterKeys, secret: bytes) -> None:
    """Put the secret back if Redis lost it (a no-op when it is there or comes from the environment)."""
    if not os.environ.get(SECRET_ENV):
        await redis.set(keys.secret, secret, nx=True)
