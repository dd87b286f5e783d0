#!/usr/bin/env bash
# GPU smoke test: features, one epoch, evaluate and caption on Flickr8k with --device cuda.
# Run from the repository root on a machine with a CUDA GPU and the built .venv (a CUDA build of
# torch 2.13.0), with Flickr8k at $DATA (default ../shared/data/flickr8k). About 5-10 minutes
# on one modern GPU. Not yet run: it was written on a machine without a GPU.
#   scripts/gpu_smoke.sh                       # everything under $OUT (default /tmp/gpu_smoke)
#   DATA=/data/flickr8k OUT=/scratch/smoke NPROC=2 scripts/gpu_smoke.sh   # + a 2-GPU DDP epoch
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/flickr8k}
OUT=${OUT:-/tmp/gpu_smoke}
NPROC=${NPROC:-1}
WORK="$OUT/work"
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/smoke.log"; }

"$PY" - <<'PY' | tee -a "$OUT/smoke.log"
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "bf16" if torch.cuda.is_bf16_supported() else "no bf16")
PY

log "prepare + features (view 0) on the GPU"
/usr/bin/time -v "$PY" -m captioner prepare --data-dir "$DATA" --work-dir "$WORK" \
  2>>"$OUT/time_prepare.txt"
/usr/bin/time -v "$PY" -m captioner features --work-dir "$WORK" --device cuda --batch-size 128 \
  2>>"$OUT/time_features.txt" | tee -a "$OUT/smoke.log"

log "one epoch, bf16 autocast (precision auto)"
/usr/bin/time -v "$PY" -m captioner train --work-dir "$WORK" --run-dir "$OUT/run" \
  --device cuda --epochs 1 --restart 2>>"$OUT/time_train.txt" | tee -a "$OUT/smoke.log"
grep -E "Maximum resident|Elapsed" "$OUT/time_train.txt" | tee -a "$OUT/smoke.log"
cat "$OUT/run/metrics.csv" | tee -a "$OUT/smoke.log"

if [ "$NPROC" -gt 1 ]; then
  log "one epoch on $NPROC GPUs (DDP over NCCL)"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m captioner train --work-dir "$WORK" --run-dir "$OUT/run_ddp" --device cuda --epochs 1 \
    --restart | tee -a "$OUT/smoke.log"
  cat "$OUT/run_ddp/ranks.json" | tee -a "$OUT/smoke.log"
fi

log "evaluate the epoch's best model on the test split"
"$PY" -m captioner evaluate --model "$OUT/run/best" --work-dir "$WORK" --no-java \
  --device cuda --out-dir "$OUT/eval" | tee -a "$OUT/smoke.log"
grep -E '"(backend|device)"' "$OUT/eval/report_test_beam"*.json | tee -a "$OUT/smoke.log"

log "caption three test images on the GPU and on the CPU (the same captions, up to rounding)"
mapfile -t IMAGES < <("$PY" - "$WORK" <<'PY'
import sys
from captioner.data.prepare import PreparedData
data = PreparedData.load(sys.argv[1])
for name in data.splits.test[:3]:
    print(data.images_dir / name)
PY
)
for DEV in cuda cpu; do
  "$PY" -m captioner caption --model "$OUT/run/best" --backend torch --device "$DEV" \
    "${IMAGES[@]}" | tee "$OUT/caption_$DEV.txt" | tee -a "$OUT/smoke.log"
done
if diff "$OUT/caption_cuda.txt" "$OUT/caption_cpu.txt"; then
  log "GPU and CPU captions are identical"
else
  log "GPU and CPU captions differ (float rounding can change a word; see the diff above)"
fi
log "done: $OUT/smoke.log"
