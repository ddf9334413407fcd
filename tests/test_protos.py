"""The committed generated code matches a fresh generation, and the API follows its conventions."""
from __future__ import annotations

from pathlib import Path

import pytest

from protos import generate as gen
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from router.convert import InvalidArgument, sampling_params_from_proto, sampling_params_to_proto

_version = gen.installed_grpcio_tools_version()
pinned_tools = pytest.mark.skipif(
    _version != gen.PINNED_GRPCIO_TOOLS,
    reason=f"grpcio-tools {_version} installed, generated code is pinned to {gen.PINNED_GRPCIO_TOOLS}",
)


@pinned_tools
def test_committed_code_matches_fresh_generation(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)
    assert len(written) == 3 * len(gen.PROTO_FILES)
    for fresh in written:
        committed = gen.PROTO_ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing; run python -m protos.generate"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} differs from a fresh generation; run python -m protos.generate"
        )


@pinned_tools
def test_generated_imports_use_repository_package(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    grpc_code = (tmp_path / "pdserve/v1/generation_pb2_grpc.py").read_text()
    assert "from protos.pdserve.v1 import generation_pb2" in grpc_code
    assert "\nfrom pdserve." not in grpc_code


def test_enums_start_with_unspecified() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.name} zero value is {zero}"


def test_unset_optional_sampling_fields_differ_from_zero() -> None:
    params = pb.SamplingParams()
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs", "repetition_penalty"):
        assert not params.HasField(name)
    params.temperature = 0.0
    assert params.HasField("temperature")
    restored = pb.SamplingParams.FromString(params.SerializeToString())
    assert restored.HasField("temperature") and restored.temperature == 0.0


def test_input_is_a_oneof() -> None:
    req = pb.GenerateRequest(prompt="hi")
    assert req.WhichOneof("input") == "prompt"
    req.token_ids.ids.extend([1, 2])
    assert req.WhichOneof("input") == "token_ids"
    assert req.prompt == ""


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "pdserve.v1.Generation"
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert not service.methods_by_name["ListModels"].server_streaming


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, min_p=0.1, seed=0,
                       stop=("x", "yz"), stop_token_ids=(4,), ignore_eos=True, logprobs=0,
                       repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=0.5,
                       include_stop_str_in_output=True),
    ],
)
def test_sampling_params_round_trip(params: SamplingParams) -> None:
    assert sampling_params_from_proto(sampling_params_to_proto(params)) == params


def test_unset_sampling_fields_take_engine_defaults() -> None:
    assert sampling_params_from_proto(pb.SamplingParams()) == SamplingParams()


def test_invalid_sampling_field_is_named() -> None:
    with pytest.raises(InvalidArgument) as info:
        sampling_params_from_proto(pb.SamplingParams(max_tokens=4, min_p=1.5))
    assert info.value.field == "sampling_params.min_p"
