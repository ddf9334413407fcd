"""Engine throughput against HF transformers on the same weights, in one run on one machine.

Measures, for this engine and for HF transformers `generate`:
  * batch-1 decode tokens/s (time of N new tokens minus time of 1, over N - 1), next to the
    memory-bandwidth floor: the weight bytes one decode step must read over a measured read
    bandwidth;
  * total tokens/s (prompt + output tokens) for a mixed workload of requests with random prompt
    and output lengths. HF runs it as one left-padded static batch generating the longest output
    (its best static batching); only the tokens each request asked for are counted.

Writes bench/results/engine_throughput.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def read_bandwidth_gbps(size_mb: int = 1024, repeats: int = 7) -> float:
    """Best-of-N bandwidth of summing a buffer far larger than the last-level cache."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (a tied embedding counts once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def load_hf(model_path: str, dtype: torch.dtype):
    import transformers

    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        kwargs = {"gguf_file": name}
    else:
        folder, kwargs = model_path, {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    return model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_batch1(llm: LLM, prompt: list[int], n: int, repeats: int) -> float:
    def run(k: int):
        return lambda: llm.generate([prompt], SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))
    run(n)()  # warm-up
    return (n - 1) / (timed(run(n), repeats) - timed(run(1), repeats))


def hf_batch1(model, prompt: list[int], n: int, repeats: int) -> float:
    ids = torch.tensor([prompt])

    def run(k: int):
        def go():
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                               min_new_tokens=k, do_sample=False, pad_token_id=0)
        return go
    run(n)()
    return (n - 1) / (timed(run(n), repeats) - timed(run(1), repeats))


def mixed_workload(num: int, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(32, 256))] for _ in range(num)]
    outputs = [rng.randint(16, 128) for _ in range(num)]
    return prompts, outputs


def ours_mixed(llm: LLM, prompts, outputs) -> float:
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
    llm.engine.kv_manager.reset_prefix_cache()
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(r.token_ids) for r in results] == outputs
    return (sum(map(len, prompts)) + sum(outputs)) / elapsed


def hf_mixed(model, prompts, outputs) -> float:
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, so every row's last token is at the end
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=max(outputs),
                       min_new_tokens=max(outputs), do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return (sum(map(len, prompts)) + sum(outputs)) / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--dtype", default="float32", help="weights and KV dtype for both engines")
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens in the batch-1 runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per batch-1 figure (median)")
    parser.add_argument("--num-requests", type=int, default=32, help="requests in the mixed workload")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed workload's lengths and tokens")
    parser.add_argument("--skip-hf", action="store_true", help="measure only this engine")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "engine_throughput.json"),
                        help="where to write the JSON results")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    log(f"loading {args.model} ({args.dtype}) into this engine")
    llm = LLM(args.model, dtype=args.dtype, device="cpu")
    path = llm.engine.loaded.path
    vocab = llm.engine.loaded.config.vocab_size
    prompt = list(range(1000, 1032))

    log("measuring read bandwidth")
    bandwidth = read_bandwidth_gbps()
    wbytes = weight_bytes(llm.engine.loaded.model)
    floor = bandwidth * 1e9 / wbytes
    log(f"read bandwidth {bandwidth:.1f} GB/s, weights {wbytes / 1e6:.0f} MB, floor {floor:.1f} tok/s")

    log("batch-1 decode, this engine")
    ours_b1 = ours_batch1(llm, prompt, args.decode_tokens, args.repeats)
    prompts, outputs = mixed_workload(args.num_requests, vocab, args.seed)
    log(f"mixed workload, this engine ({args.num_requests} requests)")
    ours_mix = ours_mixed(llm, prompts, outputs)

    hf_b1 = hf_mix = None
    if not args.skip_hf:
        del llm
        log("loading the same weights into HF transformers")
        hf = load_hf(path, dtype)
        log("batch-1 decode, HF transformers")
        hf_b1 = hf_batch1(hf, prompt, args.decode_tokens, args.repeats)
        log("mixed workload, HF transformers (one left-padded batch)")
        hf_mix = hf_mixed(hf, prompts, outputs)

    device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {
        "model": args.model, "dtype": args.dtype, "device": device,
        "read_bandwidth_gbps": round(bandwidth, 2), "weight_bytes": wbytes,
        "ours_batch1_tps": round(ours_b1, 2), "hf_batch1_tps": hf_b1 and round(hf_b1, 2),
        "floor_batch1_tps": round(floor, 2),
        "ours_mixed_tps": round(ours_mix, 1), "hf_mixed_tps": hf_mix and round(hf_mix, 1),
    }
    print_table(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"
    print(f"\nmodel {r['model']} ({r['dtype']}) on {r['device']}")
    print(f"{'metric':<28}{'pdserve':>12}{'HF':>12}{'pdserve/HF':>12}{'floor':>10}{'% floor':>9}")
    print(f"{'batch-1 decode tok/s':<28}{r['ours_batch1_tps']:>12.1f}{r['hf_batch1_tps'] or 0:>12.1f}"
          f"{ratio(r['ours_batch1_tps'], r['hf_batch1_tps']):>12}{r['floor_batch1_tps']:>10.1f}"
          f"{100 * r['ours_batch1_tps'] / r['floor_batch1_tps']:>8.0f}%")
    print(f"{'mixed 32 req total tok/s':<28}{r['ours_mixed_tps']:>12.1f}{r['hf_mixed_tps'] or 0:>12.1f}"
          f"{ratio(r['ours_mixed_tps'], r['hf_mixed_tps']):>12}")


if __name__ == "__main__":
    sys.exit(main())
