"""Scheduler units: token budget, chunked prefill, preemption, transfer reservations, no leaks."""
from __future__ import annotations

import random

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import AdmissionRefusal, Scheduler

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_num_seqs=8, max_model_len=256,
                   chunked=True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             max_model_len=max_model_len, enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size), max_model_len)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, first_token: int = 10, **kw) -> Request:
    prompt = [first_token + (i % 50) for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw),
                   eos_token_ids=(EOS,))


def run_step(scheduler: Scheduler, token: int = 7):
    """One step with a fake model that always samples `token`."""
    out = scheduler.schedule()
    sampled = {s.request.request_id: (token, None) for s in out.scheduled if s.samples}
    finished = scheduler.update_from_output(out, sampled)
    return out, finished


def drain(scheduler: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while scheduler.has_unfinished_requests():
        run_step(scheduler)
        steps += 1
        assert steps < limit, "scheduler made no progress"
    return steps


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    manager = scheduler.kv_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks


def test_long_prompt_is_chunked_under_the_budget():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("a", 40))
    sizes = []
    while True:
        out, _ = run_step(scheduler)
        sizes.append(out.num_batched_tokens)
        if not scheduler.requests["a"].is_prefilling:
            break
    assert sizes == [16, 16, 8]
    assert scheduler.requests["a"].num_output_tokens == 1  # sampled only when the prompt completed
    drain(scheduler)
    assert_all_blocks_free(scheduler)


def test_decodes_share_a_step_with_a_prefill_chunk():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("short", 3, max_tokens=10))
    run_step(scheduler)  # prefill of "short", samples its first token
    scheduler.add_request(make_request("long", 60))
    out, _ = run_step(scheduler)
    by_id = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert by_id == {"short": 1, "long": 15}
    drain(scheduler)
    assert_all_blocks_free(scheduler)


def test_without_chunking_a_prompt_over_the_budget_waits():
    scheduler = make_scheduler(budget=16, chunked=False)
    scheduler.add_request(make_request("a", 10))
    scheduler.add_request(make_request("b", 10))
    out, _ = run_step(scheduler)
    assert [s.request.request_id for s in out.scheduled] == ["a"]


def test_max_num_seqs_limits_the_running_batch():
    scheduler = make_scheduler(budget=100, max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 4))
    out, _ = run_step(scheduler)
    assert len(out.scheduled) == 2
    drain(scheduler)
    assert_all_blocks_free(scheduler)


def test_preemption_recomputes_and_finishes_everything():
    # 6 blocks of 4 tokens; three requests of 8-token prompts growing by 8 tokens each cannot fit.
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 8, max_tokens=8, first_token=10 + i))
    drain(scheduler)
    assert scheduler.stats.num_preemptions > 0
    assert_all_blocks_free(scheduler)


def test_stop_conditions():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("eos", 4, max_tokens=10))
    scheduler.add_request(make_request("ignore", 4, max_tokens=3, ignore_eos=True))
    scheduler.add_request(make_request("stop_id", 4, max_tokens=10, stop_token_ids=(EOS,)))
    requests = dict(scheduler.requests)
    run_step(scheduler, token=EOS)
    assert requests["eos"].status == RequestStatus.FINISHED_STOPPED
    assert requests["stop_id"].status == RequestStatus.FINISHED_STOPPED
    assert requests["ignore"].status == RequestStatus.RUNNING
    drain(scheduler)
    assert requests["ignore"].status == RequestStatus.FINISHED_LENGTH
    assert requests["ignore"].num_output_tokens == 3
    assert_all_blocks_free(scheduler)


def test_max_model_len_limits_prompt_and_generation():
    scheduler = make_scheduler(max_model_len=12)
    with pytest.raises(ValueError, match="more than max_model_len"):
        scheduler.add_request(make_request("long", 13))
    request = make_request("fits", 10, max_tokens=50)
    scheduler.add_request(request)
    drain(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.num_tokens == 12


def test_request_larger_than_the_whole_cache_is_refused():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        scheduler.add_request(make_request("big", 10, max_tokens=10))


def test_abort_frees_blocks_at_any_point():
    scheduler = make_scheduler(budget=8)
    scheduler.add_request(make_request("a", 30))
    scheduler.add_request(make_request("b", 5))
    run_step(scheduler)
    assert scheduler.abort_request("a").status == RequestStatus.FINISHED_ABORTED
    assert scheduler.abort_request("a") is None
    scheduler.abort_request("b")
    assert_all_blocks_free(scheduler)


def test_transfer_reservation_then_decode():
    scheduler = make_scheduler(budget=16, block_size=4)
    request = make_request("d", 10, max_tokens=3)
    assert scheduler.reserve_for_transfer(request) == 0
    assert request.status == RequestStatus.WAITING_FOR_KV
    assert len(scheduler.kv_manager.get_block_ids("d")) == 3
    out, _ = run_step(scheduler)
    assert out.is_empty  # nothing to compute until the KV lands
    assert scheduler.has_unfinished_requests() and not scheduler.has_work()
    scheduler.start_after_transfer("d", 42)
    assert scheduler.has_work()
    assert request.output_token_ids == [42] and request.num_computed_tokens == 10
    out, _ = run_step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("d", 1)]
    drain(scheduler)
    assert request.num_output_tokens == 3
    # A second request with the same prompt reuses the cached full blocks (8 of 10 tokens).
    again = make_request("d2", 10, max_tokens=3)
    assert scheduler.reserve_for_transfer(again) == 8
    scheduler.abort_request("d2")
    assert scheduler.num_waiting_for_kv == 0
    assert_all_blocks_free(scheduler)


def test_random_workload_never_leaks_blocks():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=24, block_size=4, budget=24, max_num_seqs=6)
    live = []
    for step in range(300):
        if rng.random() < 0.3:
            rid = f"r{step}"
            scheduler.add_request(make_request(rid, rng.randint(1, 30), max_tokens=rng.randint(1, 12),
                                               first_token=rng.randint(10, 20)))
            live.append(rid)
        if live and rng.random() < 0.05:
            scheduler.abort_request(live.pop(rng.randrange(len(live))))
        run_step(scheduler, token=rng.choice([7, 8, EOS]))
        scheduler.kv_manager.check_invariants()
    drain(scheduler)
    assert_all_blocks_free(scheduler)


def test_reservation_keeps_headroom_for_running_decodes():
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64)
    scheduler.add_request(make_request("run", 4, max_tokens=20))
    run_step(scheduler)  # "run" decodes and holds 1 block; 5 are free
    # 5 blocks for KV in flight would leave none for "run"'s next block.
    refusal = scheduler.reserve_for_transfer(make_request("big", 20, first_token=30))
    assert isinstance(refusal, AdmissionRefusal) and refusal.limit == "KV blocks"
    assert "decoding requests" in refusal.detail
    assert scheduler.reserve_for_transfer(make_request("fits", 16, first_token=30)) == 0
    scheduler.abort_request("fits")
    drain(scheduler)
    assert_all_blocks_free(scheduler)


def test_refused_reservation_leaves_no_stale_prefix_state():
    scheduler = make_scheduler(num_blocks=8, block_size=4, budget=64)
    first = make_request("x", 12, max_tokens=1)
    assert scheduler.reserve_for_transfer(first) == 0
    scheduler.start_after_transfer("x", 7)  # its 3 full blocks are now in the prefix cache
    scheduler.add_request(make_request("hog", 20, max_tokens=8, first_token=30))
    run_step(scheduler)  # "hog" holds the 5 uncached blocks; only "x"'s 3 cached ones are free
    # Same prompt as "x": its hits would take every free block, so it is refused, and
    # nothing of its lookup may stay behind.
    assert isinstance(scheduler.reserve_for_transfer(make_request("r", 12)), AdmissionRefusal)
    scheduler.abort_request("hog")
    # The id comes back with another prompt: no hit may come from the refused lookup.
    assert scheduler.reserve_for_transfer(make_request("r", 12, first_token=40)) == 0
    scheduler.abort_request("r")
    assert_all_blocks_free(scheduler)


def test_prefix_cache_stats_count_each_admission_once():
    """A queue head that cannot get blocks yet is looked up again every step; its lookup must
    count once, when it is admitted, or the hit rate is skewed under memory pressure."""
    scheduler = make_scheduler(num_blocks=5, budget=100, max_num_seqs=4)
    scheduler.add_request(make_request("a", 12, max_tokens=5))
    drain(scheduler)  # a's full prompt blocks are now cached
    scheduler.add_request(make_request("b", 12, max_tokens=5, first_token=200))
    c = make_request("c", 12, max_tokens=5)  # a's prompt again
    scheduler.add_request(c)
    run_step(scheduler)
    assert [r.request_id for r in scheduler.waiting] == ["c"]  # no blocks left for c yet
    run_step(scheduler)
    drain(scheduler)
    stats = scheduler.kv_manager.stats()
    assert stats.queries == 3 * 12  # a, b and c admitted once each, none preempted
    assert stats.hits == c.num_cached_tokens  # only c shares a prefix (b's prompt differs)
    assert_all_blocks_free(scheduler)


def test_admission_refuses_past_max_num_seqs_naming_the_slots():
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2)
    assert scheduler.admit(make_request("a", 4)) is None
    assert scheduler.reserve_for_transfer(make_request("b", 4, first_token=20)) == 0
    # Two requests held (one queued, one waiting for KV): both paths refuse a third.
    for refusal in (scheduler.admit(make_request("c", 4, first_token=30)),
                    scheduler.reserve_for_transfer(make_request("d", 4, first_token=40))):
        assert isinstance(refusal, AdmissionRefusal) and refusal.limit == "sequence slots"
        assert "max_num_seqs 2" in str(refusal)
    assert set(scheduler.requests) == {"a", "b"}
    scheduler.abort_request("a")
    scheduler.abort_request("b")
    assert_all_blocks_free(scheduler)


def test_local_admission_counts_blocks_promised_to_queued_prompts():
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=8)
    assert scheduler.admit(make_request("a", 16)) is None  # 4 blocks promised, none taken yet
    refusal = scheduler.admit(make_request("b", 12, first_token=30))  # needs 3, 2 left
    assert isinstance(refusal, AdmissionRefusal) and refusal.limit == "KV blocks"
    assert "needs 3 blocks, 2 are free" in refusal.detail
    assert scheduler.admit(make_request("c", 8, first_token=40)) is None
    drain(scheduler)
    assert_all_blocks_free(scheduler)
