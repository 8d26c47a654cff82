#!/usr/bin/env bash
# One-command set-up: system packages, .venv with pinned dependencies, colcon build, env.sh.
# Idempotent: each step is skipped when its inputs have not changed since the last run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IFLYBOT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
SECONDS=0
T0=$SECONDS

step() { printf '[setup %4ss] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# 1. Python version
command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python 3.10 or newer (apt-get install python3 python3-venv)"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  die "Python $("$PY" -c 'import platform; print(platform.python_version())') is too old; \
this project needs Python 3.10 or newer (set PYTHON=/path/to/python3.11 to choose another)"
fi
"$PY" -c 'import venv, ensurepip' 2>/dev/null || \
  die "Python's venv module is missing: apt-get install -y python3-venv"
step "python $("$PY" -c 'import platform; print(platform.python_version())') ok"

# 2. System packages: cmake and a C++ compiler (interface build), headless GL (MuJoCo rendering)
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || command -v c++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || missing+=(libegl1)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || missing+=(libgl1)
ldconfig -p 2>/dev/null | grep -q 'libOSMesa' || missing+=(libosmesa6)
if ((${#missing[@]})); then
  line="apt-get install -y --no-install-recommends ${missing[*]}"
  if [[ $(id -u) == 0 && -z "${IFLYBOT_NO_APT:-}" ]] && command -v apt-get >/dev/null; then
    step "installing system packages: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive $line -qq) >/dev/null || \
      die "apt-get failed; run by hand: sudo $line"
  else
    die "missing system packages: ${missing[*]}. Run: sudo $line   (then re-run make setup)"
  fi
fi
step "system packages ok"

# 3. Virtual environment and pinned Python dependencies
if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi
REQ_HASH="$(hash_of "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt")"
if [[ "$(cat "$VENV/.requirements-hash" 2>/dev/null)" != "$REQ_HASH" ]]; then
  step "installing pinned Python dependencies (requirements.txt; cold: ~2-4 min)"
  LOG="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip 'setuptools>=77,<80' &&
         "$VENV/bin/python" -m pip install -r "$ROOT/requirements.txt" &&
         "$VENV/bin/python" -m pip install --no-deps -r "$ROOT/requirements-nodeps.txt"; } \
       >"$LOG" 2>&1; then
    if grep -qiE 'NewConnectionError|name resolution|ConnectTimeout|unreachable|Max retries|No matching distribution' "$LOG" &&
       ! where="$("$VENV/bin/python" "$ROOT/scripts/check_index.py")"; then
      die "cannot reach the Python package index: $where. Check the network or proxy \
(pip config list shows the index in use), then re-run make setup"
    fi
    tail -n 15 "$LOG" >&2
    die "pip install failed; the full log is $LOG"
  fi
  echo "$REQ_HASH" > "$VENV/.requirements-hash"
else
  step "Python dependencies up to date"
fi

# 4. The wheels carry include paths of the machine they were built on: point them at this venv.
PYINC="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NPINC="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
mapfile -t bad < <(grep -rlE '/opt/python/cp[0-9]+' "$VENV/share" --include='*.cmake' 2>/dev/null || true)
if ((${#bad[@]})); then
  step "fixing build-machine include paths in ${#bad[@]} cmake files"
  sed -i -E \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python3\.[0-9]+#${PYINC}#g" \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#${NPINC}#g" \
    "${bad[@]}"
  if grep -qE '/opt/python/cp' "${bad[@]}"; then
    grep -hoE '/opt/python/cp[^";]*' "${bad[@]}" | sort -u | sed -n 1,5p >&2
    die "unexpected build-machine paths left in cmake files (listed above)"
  fi
fi

# 5. colcon build of src/ into install/
SRC_HASH="$(cd "$ROOT" && find src -type f \( -name '*.msg' -o -name '*.srv' -o -name '*.action' \
  -o -name 'CMakeLists.txt' -o -name 'package.xml' -o -name 'setup.py' -o -name 'setup.cfg' \
  -o -path '*/launch/*' -o -path '*/config/*' -o -path '*/graphs/*' -o -path '*/rviz/*' \) \
  -not -path '*/__pycache__/*' | sort | xargs cat | sha256sum | cut -c1-16)"
if [[ "$(cat "$ROOT/install/.src-hash" 2>/dev/null)" != "$SRC_HASH" ]]; then
  step "building src/ with colcon (cold: ~1 min)"
  mkdir -p "$ROOT/log"
  (
    cd "$ROOT"
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
    export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
    "$VENV/bin/colcon" --log-base log build --merge-install --symlink-install \
      --event-handlers console_direct+ console_start_end+ \
      --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
      >"$ROOT/log/colcon-build.log" 2>&1 || {
        tail -n 30 "$ROOT/log/colcon-build.log" >&2
        exit 1
      }
  ) || die "colcon build failed; the full log is log/colcon-build.log"
  echo "$SRC_HASH" > "$ROOT/install/.src-hash"
else
  step "workspace build up to date"
fi

# 6. Environment script: `source env.sh` to run any node by hand.
cat > "$ROOT/env.sh" <<ENV
# Generated by scripts/setup.sh: source this file to use the workspace in a shell.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export AMENT_PREFIX_PATH="$VENV\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
_iflybot_u=\$-; set +u
. "$ROOT/install/setup.bash"
[[ \$_iflybot_u == *u* ]] && set -u; unset _iflybot_u
export PATH="$ROOT/install/lib/iflybot_vla_policy:\$PATH"
export OMP_WAIT_POLICY="\${OMP_WAIT_POLICY:-PASSIVE}"
# torch's CPU allocator asks for transparent huge pages: 40x fewer page faults (docs/training.md)
export THP_MEM_ALLOC_ENABLE="\${THP_MEM_ALLOC_ENABLE:-1}"
export MUJOCO_GL="\${MUJOCO_GL:-egl}"
ENV
step "done in ${SECONDS}s: source env.sh, then e.g. 'iflybot doctor'"
