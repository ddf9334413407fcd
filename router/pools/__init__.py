"""The worker pools and the router's view of them (steps 2-3 of a request's life, the "where").

Workers are named, detached Ray actors that register themselves in the cluster registry; every
router of a cluster attaches to the same actors and routes on the same published load.
"""
from router.pools.config import PoolConfig
from router.pools.handle import WorkerHandle
from router.pools.manager import ClusterContext, ClusterStartError, WorkerPools, root_cause
from router.pools.view import RAY_NAMESPACE, ClusterView

__all__ = ["ClusterContext", "ClusterStartError", "ClusterView", "PoolConfig", "RAY_NAMESPACE",
           "WorkerHandle", "WorkerPools", "root_cause"]
