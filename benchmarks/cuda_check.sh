#!/usr/bin/env bash
# CUDA checks and GPU figures, run by hand on a GPU machine (CI has no GPU).
#
#   benchmarks/cuda_check.sh parity   # golden + batched-engine tests on the GPU (fp32), bf16 drift
#   benchmarks/cuda_check.sh model    # model_bench.py on the GPU, bf16 and fp32, KV pool or not
#   benchmarks/cuda_check.sh serve    # serve_bench.py on the GPU: serial, batched without/with KV pool
#
# It uses the Python that holds a CUDA build of torch (python3, or $PYTHON) and the source tree
# directly (PYTHONPATH=src), so it runs where the project is not pip-installed. The libvips
# golden set is skipped when pyvips cannot be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NO_VIPS=()
K_VIPS=()
if ! "$PY" -c "import pyvips" 2>/dev/null; then
    NO_VIPS=(--no-vips)
    K_VIPS=(-k "not vips")
fi

for stage in "${@:-parity}"; do
    case "$stage" in
    parity)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
        MOONDREAM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/model/test_golden.py \
            tests/engine/test_batched_model.py "${K_VIPS[@]}"
        "$PY" benchmarks/golden_check.py --device cuda --dtype bfloat16 "${NO_VIPS[@]}" || true
        ;;
    model)
        "$PY" benchmarks/model_bench.py --device cuda --dtype bfloat16,float32 --images 640x480 \
            --tokens 32 --reps 3 --batch 1,8,32 --kv-pool
        ;;
    serve)
        "$PY" benchmarks/serve_bench.py --device cuda --dtype bfloat16 --size 640x480 --tokens 32 \
            --clients 1,4,8,32 --engines serial,batched-nopool,batched --max-batch-size 32
        ;;
    *)
        echo "unknown stage $stage (parity, model, serve)" >&2
        exit 2
        ;;
    esac
done
