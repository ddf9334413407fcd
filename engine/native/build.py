"""Compiles the native kernels with the machine's C compiler, once, and loads them.

The library is built with `-march=native` for the CPU it runs on, so it is compiled where it is
used and cached under the user cache directory, keyed by the source, the flags, the compiler and
the CPU's feature flags; a second process (another worker, the next run) loads the cached file.
Builds are written to a temporary name and renamed, so workers starting together never load a
half-written library.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "decode_step.c", HERE / "elementwise.c", HERE / "stored_ops.c", HERE / "stored_gemm.c")
HEADERS = tuple(sorted(HERE.glob("*.h")))
# No FMA contraction: unpacking a stored weight must round its product and its sum apart, as the
# format's float32 dequantization does (stored_formats.h); fused multiply-adds are written out.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
# Extra compiler flags, after FLAGS: PDSERVE_NATIVE_CFLAGS="-mno-avx512f" builds the AVX2 kernels
# on a CPU that has AVX-512 (where 512-bit code slows the clock, or to compare the two).
EXTRA_FLAGS_VAR = "PDSERVE_NATIVE_CFLAGS"


def flags() -> tuple[str, ...]:
    return FLAGS + tuple(os.environ.get(EXTRA_FLAGS_VAR, "").split())


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded here."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def find_compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise NativeBuildError("no C compiler found (set CC, or install gcc)")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def library_path(compiler: str) -> Path:
    from engine.loader import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join(
        [*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(flags()).encode(), version.encode(),
         _cpu_flags().encode()]
    )).hexdigest()[:16]
    return Path(cache_dir()) / "kernels" / f"pdserve-cpu-{key}.so"


def compile_library(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [compiler, *flags(), "-o", str(partial), *map(str, SOURCES), "-lm"]
    logger.info("compiling the native CPU kernels: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeBuildError(f"compiling the native CPU kernels failed:\n{done.stderr.strip()}")
    os.replace(partial, target)


def load_library() -> ctypes.CDLL:
    """The compiled kernels, built on first use; raises NativeBuildError when that fails.

    Load it after torch: the library links the OpenMP runtime by its soname, so it shares the
    copy torch already loaded (one thread pool, not two competing for the cores).
    """
    global _library
    with _lock:
        if _library is None:
            compiler = find_compiler()
            path = library_path(compiler)
            if not path.exists():
                compile_library(compiler, path)
            try:
                _library = ctypes.CDLL(str(path))
            except OSError as err:
                raise NativeBuildError(f"loading {path} failed: {err}") from err
        return _library
