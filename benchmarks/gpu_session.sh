#!/usr/bin/env bash
# Every GPU check of medcam in one call, for a lent GPU machine with little time (about 8 minutes on an H100/H200).
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu-results)
#
# 1. tests/test_gpu.py: CUDA maps equal the CPU maps, cpu_thresh stitching, AMP;
# 2. the README's GPU table (brats and ct cases, fp16 autocast);
# 3. the open question (3 targets at sw_batch 4): the sw_batch 4 cases again with cuDNN autotuning and with
#    channels_last_3d (both sides get the same setting), and a profile of the 3-target case.
# Each step writes its own file, so a step that fails or runs out of time leaves the others' results.
#
# The lent machine's image has torch, pytest, tqdm and psutil but no MONAI: download its wheel here first
# (`pip download --no-deps -d .whl monai==1.6.1`; .whl/ is git-ignored) and carry .whl. It is installed with
# --no-deps into /tmp/site; nothing is downloaded on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
if ! python3 -c "import monai, tqdm" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "no MONAI here and no wheel of it in .whl/" >&2; exit 2; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, monai; print(torch.__version__, monai.__version__)" >> "$out/gpu.txt" 2>&1

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $?" >> "$out/steps.txt"
}

step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step table 200 python3 benchmarks/sliding_window.py --device cuda --amp
step cudnn_benchmark 80 python3 benchmarks/sliding_window.py --device cuda --amp --cudnn-benchmark \
    --cases brats_sw4_sphere1,brats_sw4_sphere3
step channels_last 80 python3 benchmarks/sliding_window.py --device cuda --amp --channels-last \
    --cases brats_sw4_sphere1,brats_sw4_sphere3
step profile 60 python3 benchmarks/profile_sliding.py --device cuda --amp --case brats_sw4_sphere3
# issue 27: predicted regions in one pass against the given-logits case (1 and 3 targets), BraTS-sized volume;
# nnU-Net runs its GPU predictor under float16 autocast, so on a GPU it keeps the two-pass path (stats say so)
step one_pass 150 python3 benchmarks/one_pass.py --device cuda --parts sliding --volume 240 240 155 \
    --roi 128 128 128 --sw-batch 4 --init-filters 16 --repeats 3 --out "$out/one_pass.json"
cat "$out/steps.txt"
