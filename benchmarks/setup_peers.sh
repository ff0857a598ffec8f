#!/usr/bin/env bash
# Create the peers' virtualenvs, isolated from the project's own environment so their pinned
# redis-py versions do not fight ours:
#   benchmarks/.venv-peers        arq, saq, streaq, dramatiq (arq pins redis<6)
#   benchmarks/.venv-peer-taskiq  taskiq + taskiq-redis: current taskiq-redis needs redis>=6,
#                                 and the older taskiq-redis that fits beside arq is broken
#                                 with current taskiq (ImportError: taskiq.compat.model_dump)
# Usage: bash benchmarks/setup_peers.sh   (re-running is safe; it upgrades in place)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

make_venv() {
  local venv="$1"
  shift
  if [[ ! -x "${venv}/bin/python" ]]; then
    "${python}" -m venv "${venv}"
  fi
  "${venv}/bin/python" -m pip install --quiet --upgrade pip
  "${venv}/bin/python" -m pip install --quiet --upgrade "$@"
  "${venv}/bin/python" -m pip check || echo "warning: pip check found conflicts in ${venv}" >&2
  echo "installed into ${venv}:"
  "${venv}/bin/python" -m pip list 2>/dev/null \
    | grep -Ei '^(arq|saq|taskiq|taskiq-redis|streaq|coredis|dramatiq|redis|hiredis|uvloop) '
}

make_venv "${here}/.venv-peers" \
  "arq" "saq[hiredis]" "streaq" "dramatiq[redis]" "redis[hiredis]" "uvloop"
make_venv "${here}/.venv-peer-taskiq" \
  "taskiq" "taskiq-redis" "redis[hiredis]" "uvloop"
