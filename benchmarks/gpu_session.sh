#!/usr/bin/env bash
# One short session on a lent GPU: the CUDA rows of docs/performance.md and the Karras-grid
# distillation of the bundled model (docs/distillation.md), most important first, each part
# under its own time limit, everything logged to $OUT/all.log as it goes.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine (OUT, PY from the environment)
#   SMOKE=1 bash benchmarks/gpu_session.sh    # tiny sizes, on any machine: checks the script
#   PARTS="distill eval" BUDGET=480 bash benchmarks/gpu_session.sh   # only some parts, longer
#
# Needs runs/gpuK/pairs.npz (training pairs + the 64 held-out pairs per stain, from
# `bench_distill.py prep`) and runs/bench_samplers/ref-*.npz (the cached DDPM 1000 outputs).
set -u
OUT=${OUT:-runs/gpu_out}
PY=${PY:-python3}
W=runs/gpuK
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/all.log"
PARTS=${PARTS:-distill eval region paper oom ddp compile}
DEV=cuda SIZE=1024 BIG=2048 BUDGET=${BUDGET:-210} BATCH=256 OOM="--size 1536 --batch 256 --cap-gib 4"
PRESETS="tiny small paper" DDP="--presets paper --batch 8,32 --steps 6 --skip 2"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu SIZE=128 BIG=128 BUDGET=4 BATCH=4 OOM="--preset tiny --size 128 --batch 16 --fits 4"
  PRESETS="tiny" DDP="--presets tiny --batch 2 --steps 2 --skip 1"
fi

part() {  # part NAME SECONDS command...: log it, run it under a time limit (if NAME in PARTS)
  case " $PARTS " in *" $1 "*) ;; *) return 0 ;; esac
  local limit=$2
  shift 2
  echo "== $(date -u +%T) [${limit}s] $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
}

PARTS="$PARTS env"
part env 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
part env 60 "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available() and
torch.cuda.get_device_name())"

# 1. distil the bundled model on the Karras grid: DDIM 16 -> 8 -> 4
part distill $((BUDGET + 90)) "$PY" benchmarks/bench_distill.py --work $W distill --grid karras \
  --teacher-steps 16 --student-steps 4 --batch $BATCH --lr 2e-4 --warmup 50 --ema 0.995 \
  --budget-s $BUDGET --half --checkpoint-every 200 --log-every 100 --tag K --device $DEV
cp $W/studentK*.safetensors "$OUT"/ 2>/dev/null

# 2. score the students and the teacher's Karras DDIM on the 64 held-out pairs per stain
part eval 120 "$PY" benchmarks/bench_distill.py --work $W eval --reference runs/bench_samplers \
  --teacher-ddim 16 10 8 4 --no-dpm --students $W/studentK-8step.safetensors \
  $W/studentK.safetensors --device $DEV --tag K
cp $W/evalK.json "$OUT"/ 2>/dev/null

# 3. a 1024^2 region per preset and precision, 20 steps
part region 150 "$PY" benchmarks/bench_region.py --devices $DEV --presets $PRESETS \
  --precisions fp32 bf16 --size $SIZE --steps 20

# 4. the paper preset at the default 10 steps on a bigger region: the 400 Mpx projection
part paper 120 "$PY" benchmarks/bench_region.py --devices $DEV --presets paper --precisions bf16 \
  --size $BIG --steps 10

# 5. real CUDA out-of-memory: the batch halves, the pixels stay the same
part oom 90 "$PY" benchmarks/check_cuda_oom.py --device $DEV $OOM

# 6. one training step of the paper preset through DDP (NCCL, one rank)
part ddp 100 "$PY" benchmarks/bench_ddp.py --device $DEV --layouts 1 --ddp $DDP

# 7. torch.compile on the paper preset (compiled on the whole region first)
part compile 300 "$PY" benchmarks/bench_region.py --devices $DEV --presets paper \
  --precisions bf16 --size $SIZE --steps 20 --compile
echo "== $(date -u +%T) done" | tee -a "$LOG"
