#!/usr/bin/env bash
# Scale-out of the stage-1 training step on the GPUs of one host: d30 with FSDP over all
# GPUs (weak scaling at 32 images per GPU, strong scaling at a global batch of 256) and d16
# data parallel (weak scaling at 64 per GPU). Full step (bf16 encode, forward, backward,
# clip, AdamW) as the platform's default execution runs it (unrolled blocks,
# `dots_attention_saveable`, the Pallas kernels); random images generated on the device, so
# no input pipeline is involved.
#
#   benchmarks/scale_out.sh PART [OUT_DIR]
#     PART: d30_weak | d30_strong | d16_weak (each fits one 10-minute call on 8 H200s)
#     OUT_DIR: where the JSON goes (default benchmarks/results)
#   GPUS=4 benchmarks/scale_out.sh d30_weak   # device counts 1, 2, 4 (default: every GPU)
#   QUICK=1 benchmarks/scale_out.sh d30_weak  # CPU smoke run: tiny model, 2 host devices
#
# Each part times 1, 2, 4, ... GPUs up to GPUS and prints the efficiency against one GPU.
set -euo pipefail
# NVLink multicast stays off in every process: on a shared host a program using it can take
# the GPUs out of service for everyone.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
part="${1:?PART: d30_weak | d30_strong | d16_weak}"
out="${2:-benchmarks/results}"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"

if [[ "${QUICK:-0}" == 1 ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
  gpus=2; d30=tinyx2; d16=tinyx4; global=8; kind=cpu_quick
  common=(--quick --modes full --iters 2 --warmup 1)
else
  gpus="${GPUS:-$(nvidia-smi -L | wc -l)}"; d30=d30x32; d16=d16x64; global=256
  kind="x${gpus}_h200"
  common=(--modes full --execution tokenizer_precision=bfloat16 --iters 5 --warmup 1
          --timeout 420 --time-budget 560)
fi
counts=1
for n in 2 4 8; do
  if (( n <= gpus )); then counts="$counts,$n"; fi
done

case "$part" in
  d30_weak)
    args=(--pairs "$d30" --devices "$counts" --parallelism fsdp) ;;
  d30_strong)
    args=(--pairs "$d30" --devices "$counts" --parallelism fsdp --global-batch "$global") ;;
  d16_weak)
    args=(--pairs "$d16" --devices "$counts" --parallelism data) ;;
  *)
    echo "unknown part $part; use d30_weak, d30_strong or d16_weak" >&2; exit 2 ;;
esac
mkdir -p "$out"
exec "$python" benchmarks/train_step.py "${common[@]}" "${args[@]}" \
  --out "$out/scale_out_${part}_${kind}.json"
