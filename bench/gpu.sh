#!/usr/bin/env bash
# The prepared GPU check: everything only a GPU can show, in one script that fits in ~8 minutes on one
# H100/H200, writing JSON and logs to OUTDIR (default: bench/results/gpu). Results and the command that made
# them are recorded in bench/README.md ("GPU").
#
#   bash bench/gpu.sh [OUTDIR]             # on the GPU machine, from the repository root
#   SMOKE=1 bash bench/gpu.sh /tmp/smoke   # the same steps at the tiny preset on the CPU: checks the script
#
# 1. bench/trainer.py: gpt2-small tokens/s, MFU, peak memory and the micro-batch the finder picks, for fp16 +
#    gradient scaler (the series' baseline precision) eager and compiled, bf16 compiled, bf16 compiled with
#    model.pad_vocab=64, and without dropout, interleaved so that each ratio is measured side by side.
# 2. bench/gpu_runs.py: three 200-step runs of the gpt2-small shape (bf16 + compile) on the embedded corpus
#    through the real worker: time to first step cold and warm, the GPU-idle gap between runs, the loss curve.
#
# Python packages the GPU image lacks can travel as wheels in .whl/ (bench/README.md says which); they are
# installed into a private directory, never into the image's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! $py -c "import pydantic, sqlalchemy, alembic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/orch-site .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/orch-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -f data/embedded/meta.json ] || $py -m trainer.prepare embedded --out data/embedded

if [ "${SMOKE:-0}" = 1 ]; then
  preset=tiny; device=cpu; steps=1; repeats=2; run_steps=10; runs=2; gpu=()
  extra=(--set model.context_length=32 --set precision.amp=fp32 --set run.batch_size=4)
  small=(--set run.batch_size=4 --set model.context_length=32)
  variants=(--variant fp32:precision.amp=fp32 --variant fp32+compile+pad64:precision.compile=true,model.pad_vocab=64)
else
  preset=gpt2-small; device=cuda; steps=6; repeats=3; run_steps=200; runs=3; gpu=(--gpu 0); extra=(); small=()
  variants=(--variant fp16:precision.amp=fp16
            --variant fp16+compile:precision.amp=fp16,precision.compile=true
            --variant bf16+compile:precision.amp=bf16,precision.compile=true
            --variant bf16+compile+pad64:precision.amp=bf16,precision.compile=true,model.pad_vocab=64
            --variant bf16+compile+nodropout:precision.amp=bf16,precision.compile=true,model.dropout=0)
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1
fi
status=0
echo "== 1. throughput: interleaved variants ($(date -u +%T))"
timeout 290 $py bench/trainer.py --preset $preset --device $device --steps $steps --warmup 3 --repeats $repeats "${small[@]}" \
  "${variants[@]}" --json "$out/gpu-throughput.json" 2>&1 | tee "$out/throughput.log" || status=1
echo "== 2. runs through the worker ($(date -u +%T))"
timeout 210 $py bench/gpu_runs.py --preset $preset "${gpu[@]}" --runs $runs --steps $run_steps "${extra[@]}" \
  --json "$out/gpu-runs.json" 2>&1 | tee "$out/runs.log" || status=1
echo "== done ($(date -u +%T)), status $status"
exit $status
