#!/usr/bin/env bash
# One entry point that sets up a fresh machine and then runs pdserve or its tests.
#   deploy/quickstart.sh serve [ARGS]    install, then start the cluster on its defaults
#                                        (local Ray, 1 prefill + 1 decode worker, demo model, gRPC :50051)
#   deploy/quickstart.sh test [ARGS]     install with the test extras, then run the test suite
#                                        (ARGS go to pytest)
#   deploy/quickstart.sh demo [PROMPT]   install, then generate offline, in one process
#   deploy/quickstart.sh pdserve ARGS    install, then run any pdserve command
#   deploy/quickstart.sh install [EXTRAS] install only (EXTRAS: a comma list such as dev or cluster)
#
# Everything goes into a virtual environment, .venv in the repository root (PDSERVE_VENV moves
# it; an existing one is reused), so the system interpreter is never touched: Debian and Ubuntu
# refuse `pip install` into it (PEP 668, "externally-managed-environment"). PYTHON picks the
# interpreter that creates the venv (default python3). After `serve`, run the other commands
# from the venv: .venv/bin/pdserve client ..., or `source .venv/bin/activate` first.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_PY=${PYTHON:-python3}
VENV=${PDSERVE_VENV:-.venv}
TORCH_PIN="torch==2.13.0"  # a CPU build here; unpinned, pip would pull GBs of CUDA packages

log() { echo "[quickstart] $*" >&2; }
die() { echo "[quickstart] error: $*" >&2; exit 1; }

create_venv() {
  command -v "$BASE_PY" >/dev/null 2>&1 || die "no '$BASE_PY' on PATH; install Python 3.10 or newer (or set PYTHON)"
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$BASE_PY" -V 2>&1) is too old; pdserve needs Python 3.10 or newer (set PYTHON to another interpreter)"
  if ! "$BASE_PY" -c 'import venv, ensurepip' 2>/dev/null; then
    local ver
    ver=$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    die "$BASE_PY has no working 'venv' module (ensurepip is missing), so the virtual environment
  $VENV cannot be created. On Debian or Ubuntu install it with:
      sudo apt-get install python3-venv      (or python$ver-venv)
  then run this command again."
  fi
  log "creating the virtual environment $VENV with $("$BASE_PY" -V 2>&1)"
  "$BASE_PY" -m venv "$VENV" || die "'$BASE_PY -m venv $VENV' failed (see above)"
  echo '*' > "$VENV/.gitignore"  # git leaves the venv alone, wherever it is
}

# Installs pdserve (editable) with the given extras into the venv, once per pyproject.toml;
# the stamp lives inside the venv, so a new venv installs afresh.
install_python_deps() {
  local extras=${1:-}
  [ -x "$VENV/bin/python" ] || create_venv
  PY="$VENV/bin/python"
  if ! "$PY" -c "import torch" 2>/dev/null; then
    log "installing $TORCH_PIN (CPU build) into $VENV"
    "$PY" -m pip install -q "$TORCH_PIN"
  fi
  local spec="." tag="base"
  if [ -n "$extras" ]; then spec=".[$extras]"; tag=${extras//,/-}; fi
  local stamp="$VENV/.pdserve-install-$tag-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ] || ! "$PY" -c "import engine, router" 2>/dev/null; then
    log "installing pdserve and its dependencies (pip install -e '$spec') into $VENV"
    "$PY" -m pip install -q -e "$spec"
    touch "$stamp"
  fi
  # As if the venv were activated: the tests and the cluster's own processes find pdserve,
  # ray and redis-server on PATH.
  export VIRTUAL_ENV="$PWD/$VENV"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
}

cmd=${1:-serve}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve)
    install_python_deps
    log "serving; from another shell: $VENV/bin/pdserve client --chat \"Why is the sky blue?\""
    exec "$PY" -m router.cli serve "$@" ;;
  demo)
    install_python_deps
    prompt=${1:-"Explain in two sentences why the sky is blue."}
    exec "$PY" -m router.cli generate --chat "$prompt" ;;
  test)
    install_python_deps dev
    exec "$PY" -m pytest -q "$@" ;;
  pdserve)
    install_python_deps
    exec "$PY" -m router.cli "$@" ;;
  install)
    install_python_deps "${1:-}"
    log "installed into $VENV; run pdserve as $VENV/bin/pdserve (or: source $VENV/bin/activate)" ;;
  *)
    echo "usage: deploy/quickstart.sh serve [ARGS] | test [PYTEST ARGS] | demo [PROMPT] | pdserve ARGS | install [EXTRAS]" >&2
    exit 2 ;;
esac
