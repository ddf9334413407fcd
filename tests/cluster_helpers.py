"""Request builders and checks for the end-to-end tests."""
from __future__ import annotations

from protos.pdserve.v1 import generation_pb2 as pb


def greedy_request(token_ids: list[int], max_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, token_ids=pb.TokenIds(ids=token_ids),
        sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def collect(responses) -> tuple[list[int], str, pb.GenerateResponse]:
    """Token ids and text of a whole stream, and its last message."""
    ids: list[int] = []
    text = []
    last = None
    for response in responses:
        ids.extend(response.token_ids)
        text.append(response.text)
        last = response
    return ids, "".join(text), last
