#!/usr/bin/env bash
# The closed-loop demo (see README): runs `iflybot demo` inside the workspace environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/env.sh"
cd "$ROOT"
export OMP_WAIT_POLICY=PASSIVE
exec iflybot demo "$@"
