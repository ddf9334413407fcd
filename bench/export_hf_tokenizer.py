"""Write a model's tokenizer (the demo GGUF's by default) as an HF tokenizer directory
(tokenizer.json, tokenizer_config.json), for third-party load tools that load tokenizers with
transformers (aiperf, guidellm) and must not reach the Hugging Face Hub. The directory
round-trips: engine.tokenizer.Tokenizer.from_hf_dir reads back the same ids.

With --hf-cache DIR --repo-id ORG/NAME it is written as a snapshot of that repo in a Hugging Face
hub cache laid out as huggingface_hub lays it out, so a tool that resolves tokenizer names only
through the hub cache when HF_HUB_OFFLINE=1 (aiperf 0.13 does, even for local paths) finds it
there with HF_HUB_CACHE=DIR and --tokenizer ORG/NAME, and nothing is downloaded."""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router.serve import load_tokenizer  # noqa: E402


def export(model: str, out_dir: str) -> str:
    tokenizer = load_tokenizer(model)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.backend.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos_token,
              "model_max_length": 8192, "clean_up_tokenization_spaces": False, **tokenizer.special_tokens}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out_dir


def export_to_hub_cache(model: str, cache_dir: str, repo_id: str, revision: str = "main") -> str:
    """The tokenizer as snapshot `0 * 40` of `repo_id` in the hub cache at `cache_dir`."""
    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", revision), "w") as f:
        f.write(commit)
    return export(model, os.path.join(repo_dir, "snapshots", commit))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--out", help="the directory to write")
    parser.add_argument("--hf-cache", help="a hub cache directory to write a snapshot into (with --repo-id)")
    parser.add_argument("--repo-id", default="pdserve/demo-tokenizer", help="the repo name in --hf-cache")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.hf_cache):
        parser.error("give one of --out and --hf-cache")
    print(export(args.model, args.out) if args.out else export_to_hub_cache(args.model, args.hf_cache, args.repo_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
