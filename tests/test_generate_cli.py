"""`pdserve generate`: offline generation streamed to stdout, on a tiny checkpoint."""
from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from router.cli import main


def test_generate_streams_the_engines_greedy_text(tiny_checkpoints, capsys):
    model = tiny_checkpoints["llama3"]
    threads = torch.get_num_threads()
    try:
        code = main(["generate", "--model", model, "--dtype", "float32", "--max-tokens", "6",
                     "--ignore-eos", "--torch-threads", "1", "hello world"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert code == 0
    expected = LLM(model, dtype="float32").generate(
        ["hello world"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert out.out == expected.text + "\n"
    assert "finish_reason=length, tokens=6" in out.err


def test_generate_refuses_bad_flags_with_exit_2(tiny_checkpoints, capsys):
    model = tiny_checkpoints["llama3"]
    assert main(["generate", "--model", model, "--torch-threads", "0", "hi"]) == 2
    assert "--torch-threads must be at least 1" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--top-p", "1.5", "hi"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_dequantize_flag_reaches_the_engine(tmp_path, capsys):
    """--dequantize loads a GGUF's weights as float32; without it they stay as stored. Both
    generate the same greedy text."""
    from engine.model.stored import StoredLinear
    from router.cli import build_parser, engine_options_from_args
    from tests.stored_models import write_format_gguf

    for argv in (["generate", "hi"], ["serve"]):
        assert engine_options_from_args(build_parser().parse_args(argv))["dequantize"] is False
        assert engine_options_from_args(build_parser().parse_args([*argv, "--dequantize"]))["dequantize"] is True
    path = write_format_gguf(str(tmp_path / "q4k.gguf"), "Q4_K")
    texts = []
    for flags in ([], ["--dequantize"]):
        assert main(["generate", "--model", path, "--max-tokens", "8", "--ignore-eos", *flags, "hello world"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    stored = LLM(path).engine.loaded.model.layers[0].mlp.down_proj
    dense = LLM(path, dequantize=True).engine.loaded.model.layers[0].mlp.down_proj
    assert isinstance(stored, StoredLinear) and not isinstance(dense, StoredLinear)
