"""Native CPU kernels, compiled on the machine that runs them.

The decode step of a few requests is bound by reading weights; `CpuDecodeStep` runs it as one
native call (every layer, the LM head) that streams each weight once with all cores. It serves
step 5 of a request's life (decode) on CPU workers and in the single-process engine. Without a C
compiler the engine decodes with torch ops instead.
"""
from engine.native.build import NativeBuildError, load_library
from engine.native.cpu_decode import MAX_NATIVE_ROWS, CpuDecodeStep, stream_sum, unsupported_reason

__all__ = ["MAX_NATIVE_ROWS", "CpuDecodeStep", "NativeBuildError", "load_library", "stream_sum",
           "unsupported_reason"]
