"""Regenerate the Python code for pdserve's .proto files with the pinned grpcio-tools.

    python -m protos.generate            # rewrites protos/pdserve/v1/*_pb2*.py(i)

protoc runs with protos/ as the include root, so the files register under their canonical
names (``pdserve/v1/generation.proto``), the names clients use. protoc then writes imports
between generated modules as ``from pdserve.v1 import ...``; they are rewritten to
``protos.pdserve.v1`` so the code imports from the repository root without touching sys.path.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.85.1"  # keep equal to the pin in pyproject.toml's dev extra
PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("pdserve/v1/generation.proto",)
_PACKAGE_PREFIX = "protos."
_IMPORT_RE = re.compile(r"^from (pdserve\.v\d+) import ", re.MULTILINE)
# The module name protoc bakes into message classes (their __module__, used by pickle).
_MODULE_NAME_RE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(pdserve\.)")


def installed_grpcio_tools_version() -> str | None:
    try:
        return metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return None


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc for every file in PROTO_FILES; write under out_root; return written files."""
    from grpc_tools import protoc  # dev dependency, only needed here

    out_root.mkdir(parents=True, exist_ok=True)
    include_dir = Path(protoc.__file__).resolve().parent / "_proto"  # well-known types
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={include_dir}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for proto in PROTO_FILES:
        stem = out_root / proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = stem.with_name(stem.name + suffix)
            _fix_imports(path)
            written.append(path)
    return written


def _fix_imports(path: Path) -> None:
    text = path.read_text()
    fixed = _IMPORT_RE.sub(lambda m: f"from {_PACKAGE_PREFIX}{m.group(1)} import ", text)
    fixed = _MODULE_NAME_RE.sub(lambda m: f"{m.group(1)}{_PACKAGE_PREFIX}{m.group(2)}", fixed)
    if fixed != text:
        path.write_text(fixed)


def main() -> int:
    version = installed_grpcio_tools_version()
    if version != PINNED_GRPCIO_TOOLS:
        print(
            f"grpcio-tools {version} is installed but {PINNED_GRPCIO_TOOLS} is pinned; "
            f"install the pinned version so the generated code matches",
            file=sys.stderr,
        )
        return 1
    for path in generate():
        print(path.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
