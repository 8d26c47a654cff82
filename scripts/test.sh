#!/usr/bin/env bash
# ruff + pytest over every package, with ROS isolated so that parallel runs do not cross-talk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/env.sh"
cd "$ROOT"

# A random domain and localhost-only discovery: two test runs on one machine never see each other.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 232) + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export OMP_WAIT_POLICY=PASSIVE
export IFLYBOT_TEST=1
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID, discovery localhost only"

echo "[test] ruff"
ruff check .

echo "[test] pytest"
set +e
python -m pytest --durations=12 "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "[test] ERROR: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit $rc
