"""pdserve's public API: versioned .proto files and the Python code generated from them.

The router's servicers and the client are the only users of the generated code; inside the
cluster, requests travel as small dataclasses. Regenerate with ``python -m protos.generate``.
"""
