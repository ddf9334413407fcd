"""Engine throughput against llama.cpp and HF transformers on the same weights, in one run on
one machine.

Measures, for this engine (weights as the file stores them, the default on the CPU), the same
engine with dequantize=True (today's float32 path), llama.cpp (llama-cpp-python, same GGUF,
same threads: bench/llama_cpp_reference.py says how to install it) and HF transformers
`generate` (same weights dequantized to float32, same process, same torch thread count):
  * batch-1 decode tokens/s (time of N new tokens minus time of 1, over N - 1), next to the
    memory-bandwidth floor: the bytes one decode step must read as stored (every weight once; a
    tied embedding once, as the LM head) over a measured read bandwidth;
  * total tokens/s (prompt + output tokens) for a mixed workload of requests with random prompt
    and output lengths. HF runs it as one left-padded static batch generating the longest output
    (its best static batching); llama.cpp serves the requests one after another; only the
    tokens each request asked for are counted;
  * prefill tokens/s of prompts alone (8 prompts of 256 tokens, one new token each), stored
    weights against the float32 path;
  * memory (bench/engine_memory.py): the growth of a fresh process loading the model, stored and
    dequantized, against the file's size; each worker's resident memory in the default cluster.

Read bandwidth, measured in every round next to the batch-1 runs:
  * "weights": a streaming read of this engine's own weight tensors as stored, the exact memory a
    decode step reads, with the native kernels' loads and thread split (when they build here). It runs
    as many passes as the batch-1 runs decode tokens, just before them and just after them;
  * "sum", "gemv", "native_sum": a fresh 1 GiB buffer read by torch's sum, by a matrix-vector
    product through torch's matmul, and by the native streaming read (the best of 5 passes).
The floor (`floor_batch1_tps`) is the weight bytes over the "weights" bandwidth sustained over
those passes (their mean), before or after the batch-1 runs, whichever is faster: a rate kept
up over seconds, as the batch-1 figure is. On the VM used here the read bandwidth drifts by
10% and more from one second to the next, so the single best pass (the "burst" floor,
`floor_burst_tps`: the best of the first 5 passes, before or after) holds the engine's
seconds-long average against the machine's best moment; it is printed and kept too. On a virtual
machine the memory behind different allocations can also stream at very different speeds (a
fresh buffer read 30% faster or slower than the weights, differently from run to run), so only
the weights' own memory gives a floor the step can be held to; the fresh-buffer floor is printed
and kept as well (`floor_fresh_buffer_tps`). Without the native kernels, the floor falls back to
the fresh buffer.

Rounds: the machine may be shared and its speed drifts, so the measurements run in rounds, each
timing the engines back to back (this engine, then the others, for each figure); every figure is the
median over the rounds, and each round's figures are kept in the JSON.

Threads: unless --threads is given, the count is picked by timing a small decode-like probe
(matmuls of a few rows plus elementwise ops) at each count up to the cores this process may use;
a larger count is taken only when it is at least 1.3x faster, because on a machine shared with
other work an intra-op thread that has to wait for a busy core makes every op slower. The chosen count is used for everything and printed with the device.

Writes bench/results/engine_throughput.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine import LLM, SamplingParams  # noqa: E402

import engine_memory  # noqa: E402
import llama_cpp_reference  # noqa: E402
from bench_machine import cpu_name, fresh_buffer_gbps, log, pick_num_threads, weight_bytes, weights_gbps  # noqa: E402


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


def ours_prefill(llm: LLM, prompts: list[list[int]]) -> float:
    """Prompt tokens/s of prefilling the prompts together, one new token each."""
    llm.engine.kv_manager.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return sum(map(len, prompts)) / (time.perf_counter() - start)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens in the batch-1 runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per batch-1 figure within a round (median)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of all measurements, the engines back to back in each (median over rounds)")
    parser.add_argument("--num-requests", type=int, default=32, help="requests in the mixed workload")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed workload's lengths and tokens")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for every engine and the bandwidth probe (0: pick)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="this engine's per-step token budget; a larger budget than the "
                             "engine's default prefills more prompts per step (0: the default)")
    parser.add_argument("--skip-hf", action="store_true", help="leave HF transformers out")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--skip-float32", action="store_true",
                        help="leave out this engine's float32 path (dequantize=True)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="leave out the memory figures (a child process per load, then the default cluster)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "engine_throughput.json"),
                        help="where to write the JSON results")
    return parser.parse_args(argv)


def load_engines(args):
    """This engine as stored, its float32 path, llama.cpp, HF: whichever are asked for and exist."""
    options = {"device": "cpu"}
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    log(f"loading {args.model} into this engine (weights as stored)")
    engines = {"ours": LLM(args.model, **options)}
    path = engines["ours"].engine.loaded.path
    if not args.skip_float32:
        log("loading it again with dequantize=True (the float32 path)")
        engines["f32"] = LLM(args.model, dequantize=True, **options)
    if not args.skip_llama_cpp:
        why_not = llama_cpp_reference.available() or (None if path.endswith(".gguf") else "the model is no GGUF file")
        if why_not:
            log(f"llama.cpp left out: {why_not}")
        else:
            batched = llama_cpp_reference.prompt_batches_work(path, torch.get_num_threads())
            if not batched:
                log("llama.cpp crashed evaluating a prompt batch of 200 tokens here: its prompts go one "
                    "token at a time and only its decode is timed")
            engines["llama_cpp"] = llama_cpp_reference.LlamaCpp(path, torch.get_num_threads(), 4096, batched)
            engines["llama_cpp_batched_prompts"] = batched
    if not args.skip_hf:
        log("loading the same weights into HF transformers")
        engines["hf"] = load_hf(path, torch.float32)
    return engines


def run_round(args, engines, prompt, prompts, outputs, prefill_prompts, r: int) -> dict[str, float]:
    llm, f32, lcpp, hf = engines["ours"], engines.get("f32"), engines.get("llama_cpp"), engines.get("hf")
    wbytes = weight_bytes(llm.engine.loaded.model)
    say = lambda what: log(f"round {r + 1}/{args.rounds}: {what}")  # noqa: E731
    say("read bandwidth, batch-1 decode of this engine, read bandwidth")
    fresh = fresh_buffer_gbps()
    before = weights_gbps(llm, args.decode_tokens)
    figures = {"ours_batch1_tps": ours_batch1(llm, prompt, args.decode_tokens, args.repeats)}
    after = weights_gbps(llm, args.decode_tokens)
    figures["floor_fresh_buffer_tps"] = max(fresh.values()) * 1e9 / wbytes
    if before is not None:
        sustained, burst = max(before[0], after[0]), max(before[1], after[1])
        figures["floor_batch1_tps"] = sustained * 1e9 / wbytes
        figures["floor_burst_tps"] = burst * 1e9 / wbytes
        figures["weights_read_gbps"], figures["weights_burst_read_gbps"] = sustained, burst
    else:
        figures["floor_batch1_tps"] = figures["floor_fresh_buffer_tps"]
    figures.update({f"{k}_read_gbps": v for k, v in fresh.items()})
    if lcpp is not None:
        say("batch-1 decode, llama.cpp")
        figures["llama_cpp_batch1_tps"] = lcpp.batch1_tps(prompt, args.decode_tokens, args.repeats)
    if f32 is not None:
        say("batch-1 decode, this engine's float32 path")
        figures["f32_batch1_tps"] = ours_batch1(f32, prompt, args.decode_tokens, args.repeats)
    if hf is not None:
        say("batch-1 decode, HF transformers")
        figures["hf_batch1_tps"] = hf_batch1(hf, prompt, args.decode_tokens, args.repeats)
    say(f"mixed workload ({args.num_requests} requests), this engine")
    figures["ours_mixed_tps"] = ours_mixed(llm, prompts, outputs)
    if lcpp is not None and engines["llama_cpp_batched_prompts"]:
        say("mixed workload, llama.cpp (one request after another)")
        figures["llama_cpp_mixed_tps"] = lcpp.serial_tps(prompts, outputs)
    if hf is not None:
        say("mixed workload, HF transformers (one left-padded batch)")
        figures["hf_mixed_tps"] = hf_mixed(hf, prompts, outputs)
    say("prefill alone, this engine as stored and its float32 path")
    figures["ours_prefill_tps"] = ours_prefill(llm, prefill_prompts)
    if f32 is not None:
        figures["f32_prefill_tps"] = ours_prefill(f32, prefill_prompts)
    figures["batch1_floor_fraction"] = figures["ours_batch1_tps"] / figures["floor_batch1_tps"]
    if "floor_burst_tps" in figures:
        figures["batch1_burst_floor_fraction"] = figures["ours_batch1_tps"] / figures["floor_burst_tps"]
    for key in ("batch1", "mixed", "prefill"):
        for other in ("llama_cpp", "hf", "f32"):
            if f"{other}_{key}_tps" in figures:
                figures[f"{key}_vs_{other}"] = figures[f"ours_{key}_tps"] / figures[f"{other}_{key}_tps"]
    log("  " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    return figures


def memory_figures(model: str) -> dict:
    log("memory: loading the model in fresh processes, stored and dequantized")
    result = {"load_stored": engine_memory.load_growth(model, False),
              "load_dequantized": engine_memory.load_growth(model, True)}
    log("memory: the default cluster serving a few requests")
    result["cluster_workers"] = engine_memory.cluster_worker_memory(model)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]  # the machine may be shared: the load is recorded
    torch.set_num_threads(args.threads or pick_num_threads())
    log(f"{torch.get_num_threads()} threads")
    engines = load_engines(args)
    llm = engines["ours"]
    vocab = llm.engine.loaded.config.vocab_size
    prompt = list(range(1000, 1032))
    wbytes = weight_bytes(llm.engine.loaded.model)
    log(f"weights as stored {wbytes / 1e6:.0f} MB; decode steps of a few requests run "
        + ("natively" if llm.engine.runner.native_decode is not None else "with torch ops"))
    prompts, outputs = mixed_workload(args.num_requests, vocab, args.seed)
    prefill_prompts = mixed_workload(8, vocab, args.seed + 1)[0]
    prefill_prompts = [(p * 8)[:256] for p in prefill_prompts]
    rounds = [run_round(args, engines, prompt, prompts, outputs, prefill_prompts, r) for r in range(args.rounds)]

    def median_of(key: str) -> float | None:
        values = [f[key] for f in rounds if key in f]
        return statistics.median(values) if values else None

    device = f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    result = {
        "model": args.model, "device": device, "weight_bytes": wbytes,
        "weight_formats": sorted({f for m in llm.engine.loaded.model.modules() if hasattr(m, "stored")
                                  for f in m.stored.formats}),
        "max_num_batched_tokens": llm.engine.config.scheduler.max_num_batched_tokens,
        "threads": torch.get_num_threads(), "native_decode": llm.engine.runner.native_decode is not None,
        "llama_cpp_batched_prompts": engines.get("llama_cpp_batched_prompts"),
    }
    for key in rounds[0]:
        value = median_of(key)
        result[key] = value if value is None else round(value, 3 if key.endswith(("fraction",)) or "_vs_" in key else 2)
    result["rounds"] = [{k: round(v, 3) for k, v in f.items()} for f in rounds]
    del engines, llm  # the memory figures run the cluster beside this process
    if not args.skip_memory:
        result["memory"] = memory_figures(args.model)
    result["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print_table(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    def num(key: str) -> str:
        return f"{r[key]:.1f}" if r.get(key) is not None else "-"

    def ratio(key: str) -> str:
        return f"{r[key]:.2f}x" if r.get(key) is not None else "-"
    print(f"\nmodel {r['model']} ({'+'.join(r['weight_formats']) or 'float32'} as stored, "
          f"{r['weight_bytes'] / 1e6:.0f} MB a step) on {r['device']}; medians over {len(r['rounds'])} rounds")
    print(f"{'tokens/s':<26}{'pdserve':>9}{'float32':>9}{'llama.cpp':>11}{'HF':>8}"
          f"{'vs llama.cpp':>14}{'vs HF':>8}{'vs float32':>12}")
    for label, key in (("batch-1 decode", "batch1"), ("mixed, total", "mixed"), ("prefill (8 x 256)", "prefill")):
        print(f"{label:<26}{num(f'ours_{key}_tps'):>9}{num(f'f32_{key}_tps'):>9}{num(f'llama_cpp_{key}_tps'):>11}"
              f"{num(f'hf_{key}_tps'):>8}{ratio(f'{key}_vs_llama_cpp'):>14}{ratio(f'{key}_vs_hf'):>8}"
              f"{ratio(f'{key}_vs_f32'):>12}")
    burst = r.get("floor_burst_tps")
    print(f"batch-1 floor over the stored bytes: {r['floor_batch1_tps']:.1f} tokens/s sustained "
          f"({100 * r['batch1_floor_fraction']:.0f}% reached)"
          + (f", {burst:.1f} burst ({100 * r['batch1_burst_floor_fraction']:.0f}%)" if burst else "")
          + f"; fresh-buffer floor {r['floor_fresh_buffer_tps']:.1f}")
    memory = r.get("memory")
    if memory:
        mb = 1e6
        for label, key in (("stored", "load_stored"), ("dequantized", "load_dequantized")):
            m = memory[key]
            print(f"loading, {label:<12} grows the process by {m['growth_bytes'] / mb:7.0f} MB "
                  f"({m['growth_bytes'] / m['file_bytes']:.2f}x the {m['file_bytes'] / mb:.0f} MB file)")
        for role, m in sorted(memory["cluster_workers"].items()):
            print(f"{role:<14} resident {m['rss_bytes'] / mb:6.0f} MB: {m['private_and_file_bytes'] / mb:.0f} MB "
                  f"private and file pages + {m['shared_kv_bytes'] / mb:.0f} MB of the shared KV cache")


if __name__ == "__main__":
    sys.exit(main())
