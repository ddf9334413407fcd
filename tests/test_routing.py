"""Routing units without Ray: resource requests, the policies, conditional disaggregation, and
which workers the view lets requests reach."""
from __future__ import annotations

import pytest

from cluster_state.load import LoadReport
from cluster_state.registry import WorkerRecord
from router.pools import ClusterView, PoolConfig, WorkerHandle
from router.pools.actors import actor_options
from router.routing import DisaggregationPolicy, RoutingRequest, make_policy
from router.routing.disaggregation import PathBias
from router.routing.policies import KVAware

BLOCK = 16


def worker(role: str, index: int, running: int = 0, queued_tokens: int = 0, unfinished: int | None = None,
           prefill_s_per_token: float = 0.001, transfer_bytes_per_s: float = 1e9) -> WorkerHandle:
    record = WorkerRecord(f"{role}-{index}", role, f"c/{role}-{index}", "127.0.0.1", 1, None, "shm",
                          {"block_size": BLOCK}, max_num_seqs=64, num_blocks=1000,
                          bytes_per_block=100_000, generation=1)
    load = LoadReport(num_running=running, num_unfinished=running if unfinished is None else unfinished,
                      max_num_seqs=64, num_free_blocks=1000, num_blocks=1000,
                      queued_prefill_tokens=queued_tokens, prefill_s_per_token=prefill_s_per_token,
                      decode_s_per_seq=0.0005, transfer_bytes_per_s=transfer_bytes_per_s, published_at=1.0)
    return WorkerHandle(record.worker_id, role, actor=None, record=record, load=load,
                        info={"generation": 1, "layout": {"block_size": BLOCK}}, registered=True)


def test_workers_ask_for_a_gpu_only_when_the_cluster_has_them():
    assert "num_gpus" not in actor_options("decode", {"CPU": 8.0}, ray_gpus=False)
    assert actor_options("prefill", {"CPU": 8.0, "GPU": 2.0}, ray_gpus=True)["num_gpus"] == 1


def test_pools_pin_to_node_types_advertising_their_resource():
    cluster = {"CPU": 16.0, "prefill": 2.0, "decode": 4.0}
    assert actor_options("prefill", cluster, False)["resources"] == {"prefill": 1}
    assert actor_options("decode", cluster, False)["resources"] == {"decode": 1}
    assert actor_options("mixed", cluster, False)["resources"] == {"decode": 1}
    assert "resources" not in actor_options("decode", {"CPU": 16.0}, False)
    # Pinned before any such node exists (an autoscaler brings them), or never.
    assert actor_options("prefill", {"CPU": 16.0}, False, pin="always")["resources"] == {"prefill": 1}
    assert "resources" not in actor_options("prefill", cluster, False, pin="never")


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "hybrid"}, "mode must be"),
    ({"num_decode_workers": 0}, "at least one decode worker"),
    ({"num_prefill_workers": 0}, "needs at least one prefill worker"),
    ({"registry_ttl_s": 6.0}, "registry lease"),
    ({"publish_interval_s": 4.0, "registry_ttl_s": 3.0}, "publish interval"),
])
def test_pool_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolConfig(**kwargs)


def test_least_loaded_counts_every_router_and_this_ones_admits_in_flight():
    workers = [worker("decode", 0, unfinished=2), worker("decode", 1, unfinished=1), worker("decode", 2, unfinished=1)]
    policy = make_policy("least_loaded")
    assert policy.choose(workers, RoutingRequest(10)).index == 1
    workers[1].pending_admissions = 2  # sent, not answered: the published load does not show them
    assert policy.choose(workers, RoutingRequest(10)).index == 2


def test_queued_prefill_counts_a_prompt_in_progress_by_what_is_left_of_it(monkeypatch):
    prefill = worker("prefill", 0, queued_tokens=300)  # its report: 300 tokens left, taken at t=1.0
    clock = iter([0.5, 1.5])
    monkeypatch.setattr("router.pools.handle.time.time", lambda: next(clock))
    in_progress = prefill.prefill_sent(720)  # sent before the report: the 300 left of it are in it
    assert prefill.queued_prefill_tokens == 300
    later = prefill.prefill_sent(100)  # sent after it: the report cannot show it yet
    assert prefill.queued_prefill_tokens == 400
    assert prefill.prefill_tokens_in_flight == 820
    prefill.prefill_done(in_progress)
    prefill.prefill_done(later)
    assert (prefill.queued_prefill_tokens, prefill.prefill_tokens_in_flight, prefill.prefill_sends) == (300, 0, {})


def test_round_robin_cycles_in_index_order():
    workers = [worker("decode", i) for i in (2, 0, 1)]
    policy = make_policy("round_robin")
    assert [policy.choose(workers, RoutingRequest(10)).index for _ in range(4)] == [0, 1, 2, 0]


def test_kv_aware_prefers_the_worker_caching_the_prefix():
    workers = [worker("decode", 0), worker("decode", 1)]
    request = RoutingRequest(640, cached_blocks={("decode-1", 1): 32})  # 512 of 640 tokens cached on 1
    assert request.uncached_tokens(workers[1]) == 128
    assert make_policy("kv_aware").choose(workers, request).index == 1
    # Queued work counts too: 600 queued prompt tokens outweigh the 512 cached ones.
    workers[1].load = LoadReport(**{**workers[1].load.__dict__, "queued_prefill_tokens": 600})
    assert make_policy("kv_aware").choose(workers, request).index == 0


def test_kv_aware_guard_spreads_a_hot_prefix_once_its_worker_is_busy():
    hot = RoutingRequest(640, cached_blocks={("decode-0", 1): 39})
    workers = [worker("decode", 0, running=6, unfinished=6), worker("decode", 1, running=0, unfinished=0)]
    # 6 requests vs 0 exceeds max(0 + 4, 0 * 1.5): the cache no longer decides.
    assert KVAware().choose(workers, hot).index == 1
    workers[0].load = LoadReport(**{**workers[0].load.__dict__, "num_unfinished": 3, "num_running": 3})
    assert KVAware().choose(workers, hot).index == 0  # within the margin: affinity wins


def test_cached_tokens_never_cover_the_last_prompt_token():
    request = RoutingRequest(32, cached_blocks={("decode-0", 1): 2})  # 2 full blocks = 32 tokens
    assert request.uncached_tokens(worker("decode", 0)) == 1


def test_auto_disaggregation_keeps_short_prompts_local_and_sends_long_ones_out():
    policy = DisaggregationPolicy("auto", stall_weight=1.0)  # a stall counts as much as a first token's wait
    decode, prefill = worker("decode", 0, running=1), worker("prefill", 0)
    short = policy.plan(RoutingRequest(3), decode, prefill)
    decode = worker("decode", 0, running=8)
    long = policy.plan(RoutingRequest(2000), decode, prefill)
    assert not short.remote and long.remote
    # An idle decode worker loses nothing by prefilling a long prompt itself.
    idle = worker("decode", 1, running=0)
    assert not policy.plan(RoutingRequest(2000), idle, prefill).remote
    # A busy prefill worker: its queue makes the local prefill faster.
    busy = worker("prefill", 1, queued_tokens=50_000)
    assert not policy.plan(RoutingRequest(2000), decode, busy).remote
    assert policy.decisions == {"local:auto": 3, "remote:auto": 1}


def test_fixed_disaggregation_modes_and_the_colocated_case():
    decode, prefill = worker("decode", 0), worker("prefill", 0)
    assert DisaggregationPolicy("always").plan(RoutingRequest(3), decode, prefill).remote
    assert not DisaggregationPolicy("never").plan(RoutingRequest(5000), decode, prefill).remote
    assert DisaggregationPolicy("always").plan(RoutingRequest(5000), decode, None).reason == "no prefill worker"
    with pytest.raises(ValueError, match="disaggregation must be"):
        DisaggregationPolicy("sometimes")


def test_the_stall_weight_trades_first_token_time_against_steady_decoding():
    """A 3-token prompt beside one decoding request would stall it 3 ms and saves itself the
    remote path's 5 ms hop: kept at weight 1, sent out at the default 4. An idle worker keeps it
    at any weight, and so does a busy one whose cache holds all of a long prompt but 3 tokens."""
    prefill = worker("prefill", 0)
    one, idle, busy = worker("decode", 0, running=1), worker("decode", 1), worker("decode", 2, running=4)
    assert not DisaggregationPolicy("auto", stall_weight=1.0).plan(RoutingRequest(3), one, prefill).remote
    default = DisaggregationPolicy("auto")
    assert default.stall_weight == 4.0
    assert default.plan(RoutingRequest(3), one, prefill).remote
    assert not DisaggregationPolicy("auto", stall_weight=100.0).plan(RoutingRequest(3), idle, prefill).remote
    suffix = RoutingRequest(2000 + 3, cached_blocks={("decode-2", 1): 2000 // BLOCK})
    assert not default.plan(suffix, busy, prefill).remote
    with pytest.raises(ValueError, match="stall weight"):
        DisaggregationPolicy("auto", stall_weight=-1.0)


def test_observed_first_token_times_correct_the_path_prediction():
    policy = DisaggregationPolicy("auto", stall_weight=1.0)
    decode, prefill = worker("decode", 0, running=4), worker("prefill", 0)
    request = RoutingRequest(600, cached_blocks={})
    plan = policy.plan(request, decode, prefill)
    assert plan.remote
    for _ in range(30):  # the remote path is in fact 4 s slower than its prediction
        policy.observe(plan, plan.remote_ttft_s - plan.bias_s + 4.0)
    assert policy.bias.correction(True, plan.remote_ttft_s - plan.bias_s) == pytest.approx(4.0, rel=0.05)
    assert not policy.plan(request, decode, prefill).remote


def test_a_correction_learned_on_long_prompts_scales_down_to_short_ones():
    """Local prefills of long prompts take 30 % longer than predicted, short ones 10 ms more:
    the short prompt's correction stays near its own error, the long one's near 30 %."""
    bias = PathBias()
    for _ in range(10):
        bias.observe(False, 2.0, 2.6)
        bias.observe(False, 0.05, 0.06)
    assert bias.correction(False, 0.05) == pytest.approx(0.01, abs=0.02)
    assert bias.correction(False, 2.0) == pytest.approx(0.6, abs=0.05)
    assert bias.correction(True, 1.0) == pytest.approx(0.005)  # the remote path learned nothing
    # One request size only: intercept and slope share its error, which is corrected whole.
    single = PathBias()
    for _ in range(20):
        single.observe(True, 0.2, 0.3)
    assert single.correction(True, 0.2) == pytest.approx(0.1, abs=0.01)
    # A path far slower than predicted: the slope stops at its bound, the intercept takes the rest.
    slow = PathBias()
    for _ in range(20):
        slow.observe(False, 1.0, 10.0)
        slow.observe(False, 2.0, 20.0)
    assert slow.fit[False][1] == PathBias.SLOPE_RANGE[1]
    assert slow.correction(False, 1.5) == pytest.approx(12.0, rel=0.1)


def test_dead_or_unregistered_workers_get_no_new_requests():
    view = ClusterView(registry=None, lease_ttl_s=3.0)
    view.registry = object()  # routability now follows the registry, as in a real router
    workers = [view.add(worker("decode", i)) for i in range(2)]
    assert view.of_role("decode") == workers
    view.note_failure(workers[0], RuntimeError("actor died"))
    assert view.of_role("decode") == [workers[1]]
    workers[1].registered = False  # its lease lapsed
    assert view.of_role("decode") == []
    view.note_alive(workers[0], 1)  # a call succeeded on the same incarnation
    assert view.of_role("decode") == [workers[0]]


def test_recent_routes_count_as_cached_until_they_expire():
    from router.routing.recent import RecentRoutes

    now = [100.0]
    recent = RecentRoutes(ttl_s=10.0, max_blocks_per_worker=4, clock=lambda: now[0])
    recent.record(("prefill-0", 1), [11, 12, 13])
    assert recent.longest_prefixes([11, 12, 99], [("prefill-0", 1), ("prefill-1", 1)]) == {
        ("prefill-0", 1): 2, ("prefill-1", 1): 0}
    recent.record(("prefill-0", 1), [21, 22])  # over the bound: the oldest block goes
    assert recent.longest_prefixes([11, 12], [("prefill-0", 1)]) == {("prefill-0", 1): 0}
    now[0] += 11.0
    assert recent.longest_prefixes([21, 22], [("prefill-0", 1)]) == {("prefill-0", 1): 0}


def test_recent_routes_stop_speaking_for_blocks_once_the_index_shows_them():
    """After the index has shown a worker holding a block, only the index speaks for it: when
    the worker evicts it, the router stops counting it as cached there."""
    from router.routing.recent import RecentRoutes

    recent = RecentRoutes(ttl_s=10.0, clock=lambda: 100.0)
    key = ("decode-0", 1)
    recent.record(key, [11, 12, 13])
    recent.confirmed(key, [11, 12])
    assert recent.longest_prefixes([11, 12, 13], [key]) == {key: 0}
    recent.record(key, [11])  # sent there again: counts again until the index catches up
    assert recent.longest_prefixes([11, 12], [key]) == {key: 1}


def test_a_local_prefill_pays_for_slowing_every_decode_step_it_joins():
    """Where a step that carries prefill tokens costs much more than a decode-only one (a CPU:
    torch instead of the native decode call), even a short prompt is sent out once a few
    requests decode on the worker, and kept when none does."""
    policy = DisaggregationPolicy("auto")
    prefill = worker("prefill", 0)
    busy, idle = worker("decode", 0, running=4), worker("decode", 1, running=0)
    for w in (busy, idle, prefill):
        w.load = LoadReport(**{**w.load.__dict__, "mixed_step_s": 0.15, "max_num_batched_tokens": 256})
    assert policy.plan(RoutingRequest(24), busy, prefill).remote
    assert not policy.plan(RoutingRequest(24), idle, prefill).remote
    # 600 tokens in chunks of 256: three mixed steps for each of the 4 decoding requests.
    from router.routing.cost import decode_slowdown_s
    assert decode_slowdown_s(busy, 600) == pytest.approx(4 * (600 * 0.001 + 3 * 0.15))


def test_a_local_prefill_pays_for_the_requests_that_arrive_while_it_runs():
    """An idle decode worker keeps a long prompt while nothing arrives; once requests arrive at
    a measured rate, they would decode beside its chunks, and it goes to the prefill worker."""
    policy = DisaggregationPolicy("auto")
    idle, prefill = worker("decode", 0, running=0), worker("prefill", 0)
    assert not policy.plan(RoutingRequest(2000), idle, prefill).remote
    for second in range(60):  # one request taken in per second, as its load reports count them
        idle.update_load(LoadReport(**{**idle.load.__dict__, "requests_taken": second,
                                       "published_at": 2.0 + second}))
    assert idle.arrivals.per_s == pytest.approx(1.0, rel=0.05)
    assert policy.plan(RoutingRequest(2000), idle, prefill).remote
    from router.routing.cost import decode_slowdown_s
    assert decode_slowdown_s(idle, 2000) == pytest.approx(idle.arrivals.per_s * 2.0 ** 2 / 2)
    # A restart counts from zero again: no arrivals until its next reports.
    idle.update_load(LoadReport(**{**idle.load.__dict__, "requests_taken": 3, "published_at": 70.0}))
    idle.update_load(LoadReport(**{**idle.load.__dict__, "requests_taken": 3, "published_at": 100.0}))
    assert idle.arrivals.per_s < 0.1


def test_an_idle_decode_worker_prefills_a_long_prompt_rather_than_wait_long_behind_another():
    """On an idle decode worker a local prefill pays the weighted delay of the requests expected
    to arrive during it. A long prompt that would wait on the prefill worker longer than that is
    prefilled by the decode worker; a shorter wait, or a worker with decodes running, sends it."""
    policy = DisaggregationPolicy("auto")
    idle, prefill = worker("decode", 0), worker("prefill", 0)
    for second in range(60):  # one request a second
        idle.update_load(LoadReport(**{**idle.load.__dict__, "requests_taken": second,
                                       "published_at": 2.0 + second}))
    long = RoutingRequest(730)
    assert policy.plan(long, idle, prefill).remote  # nothing queued there
    shorter_wait = policy.plan(long, idle, worker("prefill", 1, queued_tokens=800))
    assert shorter_wait.remote and shorter_wait.stall_s == 0.0
    assert shorter_wait.remote_ttft_s < shorter_wait.local_ttft_s + 4 * shorter_wait.arrivals_stall_s
    long_wait = policy.plan(long, idle, worker("prefill", 2, queued_tokens=1500))
    assert not long_wait.remote
    assert long_wait.remote_ttft_s > long_wait.local_ttft_s + 4 * long_wait.arrivals_stall_s
    running = worker("decode", 1, running=2)
    running.arrivals = idle.arrivals
    assert policy.plan(long, running, worker("prefill", 2, queued_tokens=1500)).remote
