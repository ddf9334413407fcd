#!/usr/bin/env bash
# One entry point that sets up a fresh machine and then runs pdserve or its tests.
#   deploy/quickstart.sh serve [ARGS]    install, then start the cluster on its defaults
#                                        (local Ray, 1 prefill + 1 decode worker, demo model, gRPC :50051)
#   deploy/quickstart.sh test [ARGS]     install, then run the test suite (ARGS go to pytest)
#   deploy/quickstart.sh demo [PROMPT]   install, then generate offline, in one process
#   deploy/quickstart.sh pdserve ARGS    install, then run any pdserve command
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

log() { echo "[quickstart] $*" >&2; }

install_python_deps() {
  # A CPU build of torch, pinned, before anything else can pull the multi-GB CUDA build.
  if ! "$PY" -c "import torch" 2>/dev/null; then
    log "installing torch==2.13.0 (CPU build)"
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  local stamp_dir="${XDG_CACHE_HOME:-$HOME/.cache}/pdserve"
  local stamp="$stamp_dir/install-$(sha256sum pyproject.toml | cut -c1-16)-$(pwd | sha256sum | cut -c1-8)"
  if [ ! -f "$stamp" ] || ! "$PY" -c "import engine, router" 2>/dev/null; then
    log "installing pdserve and its dependencies (pip install -e .[dev])"
    "$PY" -m pip install -q -e ".[dev]"
    mkdir -p "$stamp_dir" && touch "$stamp"
  fi
}

cmd=${1:-serve}
[ $# -gt 0 ] && shift
install_python_deps
case "$cmd" in
  serve)
    exec "$PY" -m router.cli serve "$@" ;;
  demo)
    prompt=${1:-"Explain in two sentences why the sky is blue."}
    exec "$PY" -m router.cli generate --chat "$prompt" ;;
  test)
    exec "$PY" -m pytest -q "$@" ;;
  pdserve)
    exec "$PY" -m router.cli "$@" ;;
  *)
    echo "usage: deploy/quickstart.sh serve [ARGS] | test [PYTEST ARGS] | demo [PROMPT] | pdserve ARGS" >&2
    exit 2 ;;
esac
