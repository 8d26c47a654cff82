#!/usr/bin/env bash
# Step time and peak memory of fine-tuning the paper preset on ONE GPU (issue 25): STEPS steps of
# `iflybot train vla` with config/train/paper_vla.yaml (bf16, activation checkpointing, EMA)
# through accelerate's FSDP2 (config/train/accelerate_fsdp_paper.yaml with 1 process), on a few
# gen-demos episodes at 224 px, at the largest per-GPU batch of BATCHES that runs.
#
#   scripts/gpu_paper_train.sh prepare   # here (CPU; MuJoCo, PyAV and the venv): ~10 min
#   scripts/gpu_paper_train.sh dry-run   # here: the run's command on CPU, a 2-layer model,
#                                        #   with mujoco/av/rclpy imports blocked
#   scripts/gpu_paper_train.sh run       # on the GPU machine (.gpu_paper and .whl carried)
#
# Status (2026-12-07): prepare and dry-run pass here; `run`'s shell and python logic passed with a
# stub nvidia-smi and a 2-layer model on CPU. It has not run on a GPU yet. Never run `run` with
# the full preset on a CPU machine: it builds 4.63 G fp32 parameters (19 GB) in host memory.
#
# The GPU machines of this workplace have Python 3.12, torch 2.11, accelerate 1.15 and
# transformers 5.17 but no MuJoCo, PyAV or ROS, and cannot download. So `prepare` records the
# demos and trains the LAM and FAST stages here, fills the vla stage's caches (frames at 224 px,
# LAM codes, VQA scenes: the GPU run never decodes video or renders) and downloads the pinned
# transformers wheel (requirements.txt) into .whl; the device call carries both:
#   run(command='scripts/gpu_paper_train.sh run', carry=['.gpu_paper', '.whl'], timeout_s=570)
# (the working tree plus both must stay under 64 MiB: prepare prints their sizes).
#
# Memory arithmetic (not a measurement): 4.63 G parameters with fp32 master weights, fp32
# gradients and AdamW's two moments are 16 B each = 74 GB, the EMA copy 18.5 GB more, before any
# activation. One process shards nothing, so on a GPU under 120 GiB `run` offloads parameters,
# gradients and optimizer state to the CPU (fsdp_offload_params; OFFLOAD=0/1 forces it).
# What `run` reports is what it measured: per-step time (median of the steps after the first
# five) and peak memory (torch's max allocated, and nvidia-smi's max used, which adds the
# caching allocator's reserve and the CUDA context).
#
# Knobs (environment): BATCHES (per-GPU batches to try, largest first), STEPS (20), OFFLOAD,
# EXTRA_SET (more KEY=VALUE config overrides for the run, space-separated, e.g.
# 'trainer.ema_decay=0'), EPISODES (2) and FPS (3) for prepare (frames at 224 px cost 300 kB
# each in the carried cache). A call has 10 minutes: model construction on the CPU takes a
# minute or two per tried batch, and with OFFLOAD the optimizer step runs on the CPU, so lower
# STEPS (or give one batch) when a first call ran out of time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
P=.gpu_paper
DATA=$P/data/pick_place
STEPS=${STEPS:-20}
# the vla stage's data and stage inputs: the same in prepare, dry-run and run (caches key on them)
VLA_SET=(--set "data.datasets=[$DATA]" --set data.vqa_scenes=8 --set "lam_dir=$P/lam"
         --set "fast_dir=$P/fast")
# a 2-layer, 64-wide paper model: fills the caches (which do not depend on the model's sizes)
SMALL_MODEL='{backbone: {hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32,
  intermediate: 128, text_vocab: 1024, vision_hidden: 32, vision_depth: 1, vision_heads: 2,
  vision_intermediate: 64}, expert: {width: 64, heads: 2}}'

exclude() { grep -qxF "$1" .git/info/exclude 2>/dev/null || echo "$1" >> .git/info/exclude; }

prepare() {
  # shellcheck disable=SC1091
  . "$ROOT/env.sh"
  exclude /.gpu_paper/
  exclude /.whl/
  iflybot gen-demos --task pick_place --episodes "${EPISODES:-2}" --out "$DATA" \
    --fps "${FPS:-3}" --image-size 224 224 --workers 2 --overwrite
  iflybot train lam --config config/train/tiny_lam.yaml --output-dir "$P/lam" --no-resume \
    --set model=paper --set "data.datasets=[$DATA]" --set trainer.steps=20 \
    --set trainer.batch_size=8 --set trainer.checkpoint_every=20 --set trainer.progress=false
  iflybot train fast --config config/train/tiny_fast.yaml --output-dir "$P/fast" --no-resume \
    --set model=paper --set "data.datasets=[$DATA]"
  iflybot train vla --config config/train/paper_vla.yaml --output-dir "$P/vla" --no-resume \
    "${VLA_SET[@]}" --set "model_overrides=$SMALL_MODEL" --set trainer.cpu=true \
    --set "trainer.mixed_precision='no'" --set trainer.steps=1 --set trainer.batch_size=2 \
    --set trainer.num_workers=0 --set trainer.ema_decay=0 --set trainer.progress=false \
    --set trainer.checkpoint_at_end=false
  rm -rf "$P/vla/checkpoints" "$P/vla/checkpoints.replaced" "$P/vla/policy" \
    "$P/vla/metrics.csv" "$P/vla/loss.png" "$P/lam/checkpoints" "$P/fast/checkpoints"
  mkdir -p .whl
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    "$(grep -E '^transformers==' requirements.txt)"
  du -sh "$P" .whl
  echo "tracked + untracked files: $(( ( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) \
    + $(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1) ) \
    / 1048576 )) MiB (the call's limit is 64 MiB with .gpu_paper and .whl)"
}

# mujoco, av and rclpy made unimportable, as on the GPU machine
block_imports() {
  local dir=$P/blocked
  for name in mujoco av rclpy; do
    mkdir -p "$dir/$name"
    echo "raise ImportError('$name is blocked: the GPU machine has none')" > "$dir/$name/__init__.py"
  done
  export PYTHONPATH=$ROOT/$dir${PYTHONPATH:+:$PYTHONPATH}
}

run_dir() {   # a fresh output directory that reads the carried caches
  local run=$1
  rm -rf "$run"
  mkdir -p "$run"
  ln -s "$ROOT/$P/vla/cache" "$run/cache"
}

dry_run() {
  # shellcheck disable=SC1091
  . "$ROOT/env.sh"
  block_imports
  run_dir "$P/dry"
  python -m iflybot_vla_policy.cli train vla --config config/train/paper_vla.yaml \
    --output-dir "$P/dry" "${VLA_SET[@]}" --set "model_overrides=$SMALL_MODEL" \
    --set trainer.cpu=true --set "trainer.mixed_precision='no'" --set trainer.steps=2 \
    --set trainer.batch_size=4 --set trainer.num_workers=0 --set trainer.progress=false \
    --set trainer.checkpoint_at_end=false
  cat "$P/dry/metrics.csv"
  if [[ -e $P/dry/checkpoints || -e $P/dry/policy ]]; then
    echo 'dry-run: a checkpoint or export was written' >&2
    exit 1
  fi
  rm -rf "$P/dry" "$P/blocked"
}

gpu_run() {
  if compgen -G '.whl/*.whl' > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$ROOT/src/iflybot_vla_policy${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  local out=${OUT:-$P/out}
  mkdir -p "$out"
  python3 -c 'import torch, transformers, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, torch.cuda.get_device_name(0))'
  local total_mib
  total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  local offload=${OFFLOAD:-$(( total_mib < 122880 ? 1 : 0 ))}
  local batches=${BATCHES:-$( (( offload )) && echo '16 8 4' || echo '32 16 8')}
  python3 - "$P/accelerate_1gpu.yaml" "$offload" <<'EOF'
import sys

import yaml

cfg = yaml.safe_load(open('config/train/accelerate_fsdp_paper.yaml'))
cfg.update(num_processes=1, main_process_port=29561)
cfg['fsdp_config']['fsdp_offload_params'] = sys.argv[2] == '1'
yaml.safe_dump(cfg, open(sys.argv[1], 'w'))
EOF
  echo "GPU memory ${total_mib} MiB, offload=${offload}, batches to try: ${batches}"
  local extra=() item
  for item in ${EXTRA_SET:-}; do extra+=(--set "$item"); done
  local done_batch='' run=''
  for batch in $batches; do
    run=$P/run_b$batch
    run_dir "$run"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$run/smi.csv" &
    local smi=$!
    local rc=0
    python3 -m accelerate.commands.launch --config_file "$P/accelerate_1gpu.yaml" \
      -m iflybot_vla_policy.cli train vla --config config/train/paper_vla.yaml \
      --output-dir "$run" "${VLA_SET[@]}" --set "trainer.batch_size=$batch" \
      --set "trainer.steps=$STEPS" --set trainer.checkpoint_at_end=false \
      --set trainer.progress=false "${extra[@]}" > "$run/train.log" 2>&1 || rc=$?
    kill "$smi" 2> /dev/null || true
    cp "$run/train.log" "$out/train_b$batch.log"
    if (( rc == 0 )); then
      done_batch=$batch
      break
    fi
    if ! grep -qiE 'out of memory|OutOfMemoryError' "$run/train.log"; then
      tail -40 "$run/train.log"
      echo "batch $batch failed (not out of memory): see train_b$batch.log" >&2
      exit 1
    fi
    echo "batch $batch: out of memory"
  done
  if [[ -z $done_batch ]]; then
    echo "no batch of '$batches' fits" >&2
    exit 1
  fi
  cp "$run/metrics.csv" "$out/metrics_b$done_batch.csv"
  python3 - "$run" "$done_batch" "$offload" <<'EOF' | tee "$out/summary.txt"
import csv
import statistics
import sys
from pathlib import Path

run, batch, offload = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == '1'
rows = list(csv.DictReader(open(run / 'metrics.csv')))
elapsed = [float(r['time_s']) for r in rows]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])][4:]
smi = [int(x) for x in (run / 'smi.csv').read_text().split() if x.isdigit()]
print(f'paper preset, 1 GPU, FSDP2 (offload {offload}), bf16, activation checkpointing, '
      f'per-GPU batch {batch}, {len(rows)} steps')
print(f'step time: median {statistics.median(steps):.3f} s, mean {statistics.mean(steps):.3f} s '
      f'(steps 6..{len(rows)}), first step {elapsed[0]:.1f} s')
peak = max((float(r['peak_mem_gib']) for r in rows if r.get('peak_mem_gib')), default=float('nan'))
print(f'peak memory: {peak:.1f} GiB allocated by torch, '
      f'{max(smi) / 1024 if smi else float("nan"):.1f} GiB used (nvidia-smi)')
print(f'last loss {float(rows[-1]["loss"]):.3f}')
EOF
}

case ${1:-} in
  prepare) prepare ;;
  dry-run) dry_run ;;
  run) gpu_run ;;
  *) echo "usage: $0 prepare|dry-run|run" >&2; exit 2 ;;
esac
