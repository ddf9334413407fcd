"""llama.cpp as a reference for bench/engine_throughput.py: the same GGUF file, the same thread
count, through llama-cpp-python, timed the way the engine is.

llama-cpp-python is a bench-only dependency, built from source so that llama.cpp is compiled
for this CPU (it vendors llama.cpp; cmake and a C++ compiler are needed):

    pip install --no-binary :all: llama-cpp-python diskcache

Without it the bench says so and leaves llama.cpp out. llama.cpp serves one request at a time
here, each with its own prompt evaluation and then one token per step: what a user running
llama.cpp gets without a serving layer. Greedy tokens are read from the last logits (argmax),
as the engine's greedy sampling does. On some virtual machines (an AVX-512/AMX build) llama.cpp
has crashed on prompt batches of more than one token; a probe in a child process finds that
first, and then only its decode is timed.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

import numpy as np

INSTALL_HINT = "pip install --no-binary :all: llama-cpp-python diskcache"


def available() -> str | None:
    """None when llama-cpp-python imports here, else why not (with how to install it)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err}); for the llama.cpp columns run: {INSTALL_HINT}"
    return None


_PROBE = """
import sys, llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]), n_ctx=512,
                    n_batch=256, verbose=False)
m.eval(list(range(1000, 1200)))
"""


def prompt_batches_work(path: str, threads: int) -> bool:
    """Whether llama.cpp evaluates a 200-token prompt batch here without crashing (in a child)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, path, str(threads)], capture_output=True, timeout=600)
    return done.returncode == 0


class LlamaCpp:
    def __init__(self, path: str, threads: int, n_ctx: int, batched_prompts: bool) -> None:
        import llama_cpp

        self.lib = llama_cpp
        batch = 512 if batched_prompts else 1  # one token at a time where batches crash
        self.model = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                     n_batch=batch, n_ubatch=batch, verbose=False)
        self.vocab = self.model.n_vocab()

    def _next_token(self) -> int:
        logits = self.lib.llama_get_logits_ith(self.model._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocab,))))

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens after `prompt`, from a fresh context."""
        self.model.reset()
        self.model.eval(prompt)
        out = []
        for _ in range(max_tokens):
            out.append(self._next_token())
            if len(out) < max_tokens:
                self.model.eval([out[-1]])
        return out

    def batch1_tps(self, prompt: list[int], n: int, repeats: int) -> float:
        """Decode tokens/s: (time of n new tokens - time of 1) / (n - 1), medians of repeats."""
        def timed(k: int) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.generate(prompt, k)
                times.append(time.perf_counter() - start)
            return statistics.median(times)
        self.generate(prompt, n)  # warm-up
        return (n - 1) / (timed(n) - timed(1))

    def serial_tps(self, prompts: list[list[int]], outputs: list[int]) -> float:
        """Total tokens/s (prompt + output) serving the requests one after another."""
        start = time.perf_counter()
        for prompt, n in zip(prompts, outputs):
            assert len(self.generate(prompt, n)) == n
        return (sum(map(len, prompts)) + sum(outputs)) / (time.perf_counter() - start)
