"""Runs an LLMEngine in its own thread, so a server's event loop never blocks on a step.

Every change to the engine (add, abort, reserve, ...) runs on the engine thread between
steps, through `call`; step outputs go to a callback. The thread sleeps when there is
nothing to compute and wakes on the next call. `load` is a snapshot of the engine's queues and
pool, refreshed on the engine thread, that other threads may read at any time.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import RequestStatus
from engine.step_stats import EngineLoad

logger = logging.getLogger(__name__)
T = TypeVar("T")

LOAD_REFRESH_S = 0.005  # while busy, the load snapshot is retaken at most this often


class BackgroundEngine:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[RequestOutput]], None]) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0
        self.load: EngineLoad = engine.load_snapshot()
        self._load_taken_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._calls.put((lambda engine: None, Future()))  # wake the loop
        self._thread.join(timeout)

    def call(self, fn: Callable[[LLMEngine], T]) -> "Future[T]":
        """Run fn(engine) on the engine thread before its next step."""
        future: Future = Future()
        self._calls.put((fn, future))
        return future

    def _drain_calls(self, block: bool) -> bool:
        """Run every queued call (waiting for one when block); whether any ran."""
        try:
            fn, future = self._calls.get(block=block)
        except queue.Empty:
            return False
        while True:
            self._run_call(fn, future)
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return True

    def _run_call(self, fn: Callable[[LLMEngine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as err:  # handed to the caller, never kills the loop
            future.set_exception(err)

    def _refresh_load(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._load_taken_at >= LOAD_REFRESH_S:
            self.load = self.engine.load_snapshot()
            self._load_taken_at = now

    def _run(self) -> None:
        while not self._stopping.is_set():
            # A stalled engine waits for the next call (a transfer landing, an abort) instead of
            # spinning on steps that cannot schedule anything.
            idle = not self.engine.has_work() or self.engine.stalled
            self._refresh_load(force=idle)
            if self._drain_calls(block=idle):
                self._refresh_load(force=True)  # admissions and aborts change the load at once
            if self._stopping.is_set():
                break
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed; aborting its requests")
                outputs = self._abort_computing()
            self.steps += 1
            if outputs:
                try:
                    self.on_outputs(outputs)
                except Exception:  # a consumer's bug must not stop the loop for everyone
                    logger.exception("output callback failed")

    def _abort_computing(self) -> list[RequestOutput]:
        """After a failed step, end the requests it computed so that no stream waits forever.

        Requests still waiting for KV took no part in the step; their blocks may be being
        written by a peer, so they are left to their owner.
        """
        ids = [rid for rid, request in self.engine.scheduler.requests.items()
               if request.status != RequestStatus.WAITING_FOR_KV]
        outputs = [self.engine.abort_request(request_id) for request_id in ids]
        return [out for out in outputs if out is not None]
