"""Native CPU kernels, compiled on the machine that runs them.

`CpuDecodeStep` runs a whole decode step (every layer, the LM head) as one native call that
streams each weight once with all cores, for steps of up to MAX_NATIVE_ROWS requests; it serves
step 5 of a request's life (decode) on CPU workers and in the single-process engine.
`NativeCpuOps` does prefill's elementwise work (SwiGLU's gate, rotary embedding) in one pass
each. Weights may be float32 or stay in their stored formats (engine.model.stored): the kernels
unpack GGUF blocks and 16-bit floats in registers, and `stored_ops` runs prefill's matmuls over
them a tile at a time. Without a C compiler the engine uses torch ops for all of it (and the
gguf package's numpy dequantization for stored weights).
"""
from engine.native.build import NativeBuildError, load_library
from engine.native.cpu_ops import NativeCpuOps
from engine.native.cpu_decode import MAX_NATIVE_ROWS, CpuDecodeStep, DecodeStepOutput, stream_read, unsupported_reason

__all__ = ["MAX_NATIVE_ROWS", "CpuDecodeStep", "DecodeStepOutput", "NativeBuildError", "NativeCpuOps", "load_library", "stream_read",
           "unsupported_reason"]
