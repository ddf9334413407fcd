"""Runs an LLMEngine in its own thread, so a server's event loop never blocks on a step.

Every change to the engine (add, abort, reserve, ...) runs on the engine thread between
steps, through `call`; step outputs go to a callback. The thread sleeps when there is
nothing to compute and wakes on the next call.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import RequestStatus

logger = logging.getLogger(__name__)
T = TypeVar("T")


class BackgroundEngine:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[RequestOutput]], None]) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0

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

    def _drain_calls(self, block: bool) -> None:
        try:
            fn, future = self._calls.get(block=block)
        except queue.Empty:
            return
        while True:
            self._run_call(fn, future)
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return

    def _run_call(self, fn: Callable[[LLMEngine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as err:  # handed to the caller, never kills the loop
            future.set_exception(err)

    def _run(self) -> None:
        while not self._stopping.is_set():
            # A stalled engine waits for the next call (a transfer landing, an abort) instead of
            # spinning on steps that cannot schedule anything.
            self._drain_calls(block=not self.engine.has_work() or self.engine.stalled)
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
