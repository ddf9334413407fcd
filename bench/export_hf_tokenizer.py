"""Write a model's tokenizer (the demo GGUF's by default) as an HF tokenizer directory
(tokenizer.json, tokenizer_config.json), for third-party load tools that load tokenizers with
transformers (aiperf, guidellm) and must not reach the Hugging Face Hub. The directory
round-trips: engine.tokenizer.Tokenizer.from_hf_dir reads back the same ids."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--out", required=True, help="the directory to write")
    args = parser.parse_args(argv)
    print(export(args.model, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
