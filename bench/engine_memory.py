"""Memory of the engine, for bench/engine_throughput.py (or alone: `python bench/engine_memory.py`).

* Load growth: in a fresh child process that has imported torch and the engine (and loaded the
  native kernels), the resident memory before and after `LLM(model)` with a 16-block KV cache
  (the KV cache aside), for the weights as stored and with dequantize=True.
* Cluster workers: the default cluster (1 prefill + 1 decode worker, the demo model, a 1 GiB KV
  cache over shared memory) serves a few requests; then each worker's resident memory is read
  from /proc, split into its private and file-backed pages and the shared KV cache, which the
  decode worker's KV receiver zero-fills and the prefill worker maps for its pushes (one copy in
  RAM, counted in the RSS of both).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

_LOAD = """
import gc, json, sys
import torch
from engine.native import load_library
load_library()
import engine.tokenizer, engine.loader
def rss():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return {k: int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'RssAnon', 'RssFile')}
from engine import LLM
before = rss()
llm = LLM(sys.argv[1], device='cpu', num_blocks=16, dequantize=sys.argv[2] == '1')
gc.collect()
after = rss()
print(json.dumps({'path': llm.engine.loaded.path, 'growth_bytes': after['VmRSS'] - before['VmRSS'],
                  'anon_growth_bytes': after['RssAnon'] - before['RssAnon'], 'rss_bytes': after['VmRSS']}))
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_growth(model: str, dequantize: bool) -> dict:
    """RSS growth of loading `model` in a fresh process (see the module docstring)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", _LOAD, model, "1" if dequantize else "0"], capture_output=True,
                          text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"the load probe failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["file_bytes"] = os.path.getsize(result["path"]) if os.path.isfile(result["path"]) else None
    return result


def _worker_memory() -> dict[str, dict[str, int]]:
    """role -> resident bytes of each Ray worker actor of this machine (ray::PrefillWorker, ...)."""
    found = {}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            # Ray titles an actor's process "ray::Class" or, while a method runs, "ray::Class.method".
            title = open(f"{proc}/cmdline").read().split("\0")[0].strip()
            name = title.split(".")[0].split()[0] if title.startswith("ray::") else ""
            if name not in ("ray::PrefillWorker", "ray::DecodeWorker"):
                continue
            status = dict(line.split(":", 1) for line in open(f"{proc}/status"))
        except OSError:
            continue
        kb = {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        found[name.removeprefix("ray::")] = {"rss_bytes": kb["VmRSS"], "private_and_file_bytes": kb["RssAnon"] + kb["RssFile"],
                                             "shared_kv_bytes": kb["RssShmem"]}
    return found


def cluster_worker_memory(model: str, requests: int = 4) -> dict[str, dict[str, int]]:
    """Each worker's resident memory after the default cluster served `requests` requests."""
    os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of our own, not one already running here
    sys.path.insert(0, ROOT)
    from engine.config import EngineConfig
    from protos.pdserve.v1 import generation_pb2 as pb
    from router.embedded import EmbeddedCluster
    from router.serve import ServeConfig

    with EmbeddedCluster(ServeConfig(engine=EngineConfig.from_options(model))) as server:
        stub = server.stub()
        for i in range(requests):
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(1000 + i, 1256 + i))),
                                         sampling_params=pb.SamplingParams(max_tokens=32, temperature=0.0,
                                                                           ignore_eos=True))
            assert sum(len(r.token_ids) for r in stub.Generate(request)) == 32
        return _worker_memory()


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else "demo"
    print(json.dumps({"stored": load_growth(model, False), "dequantized": load_growth(model, True),
                      "workers": cluster_worker_memory(model)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
