"""Routing (step 2 of a request's life): which decode worker takes a request, which prefill
worker computes its prompt, and whether it is prefilled remotely at all.

Policies sit behind one interface and are chosen by name (`--routing-policy`); the KV-aware one
reads the block index that workers publish. The disaggregation policy (`--disaggregation`)
compares predicted times to first token of a local and a remote prefill, from rates the workers
fit to their own measured steps.
"""
from router.routing.disaggregation import DisaggregationPolicy, PrefillPlan
from router.routing.policies import POLICIES, RoutingPolicy, RoutingRequest, make_policy

__all__ = ["DisaggregationPolicy", "POLICIES", "PrefillPlan", "RoutingPolicy", "RoutingRequest",
           "make_policy"]
