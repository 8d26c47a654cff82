#!/usr/bin/env bash
# Run a command inside the workspace environment (env.sh written by scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/env.sh"
cd "$ROOT"
exec "$@"
