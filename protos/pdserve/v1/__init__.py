"""``pdserve.v1``: the Generation service (streamed generation, model listing).

Generated modules: generation_pb2 (messages), generation_pb2_grpc (stubs and servicer base).
"""
