#!/usr/bin/env bash
# CUDA checks and GPU figures, run by hand on a GPU machine (CI has no GPU).
#
#   benchmarks/cuda_check.sh parity     # golden, batched-engine and decode-graph tests on the GPU
#                                       # (fp32, every speed path on), bf16 drift
#   benchmarks/cuda_check.sh model      # model_bench.py, bf16, decode graphs off and on
#   benchmarks/cuda_check.sh serve      # serve_bench.py: short answers about fresh 640x480 images,
#                                       # 1 and 64 clients, batched engine with and without graphs
#   benchmarks/cuda_check.sh reference  # the official reference on the same GPU (REF_SRC=its checkout)
#   benchmarks/cuda_check.sh reference-compiled  # the same after its compile() (torch.compile)
#   benchmarks/cuda_check.sh profile    # one short request through the scheduler, under the profiler
#   benchmarks/cuda_check.sh serve-caption  # the older serving benchmark (captions, serial engine too)
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
            tests/engine/test_batched.py tests/model/test_cuda_graphs.py "${K_VIPS[@]}"
        "$PY" benchmarks/golden_check.py --device cuda --dtype bfloat16 "${NO_VIPS[@]}" || true
        ;;
    model)
        "$PY" benchmarks/model_bench.py --device cuda --dtype bfloat16 --graphs off,on --images 640x480 \
            --tokens 32 --reps 3 --batch 1,8,64 --kv-pool --sections decode,caption
        ;;
    serve)
        "$PY" benchmarks/serve_bench.py --device cuda --dtype bfloat16 --size 640x480 --task query \
            --tokens 8 --format jpeg --clients 1,64 --per-client 2 --single-reps 15 --no-mix-b \
            --engines batched,batched-nographs --max-batch-size 64
        ;;
    serve-caption)
        "$PY" benchmarks/serve_bench.py --device cuda --dtype bfloat16 --size 640x480 --tokens 32 \
            --clients 1,4,8,32 --engines serial,batched-nopool,batched --max-batch-size 32
        ;;
    reference)
        "$PY" benchmarks/reference_bench.py --ref-src "${REF_SRC:?set REF_SRC to the reference checkout}" \
            --device cuda --size 640x480 --tokens 32 --short-tokens 8 --reps 10
        ;;
    reference-compiled)
        "$PY" benchmarks/reference_bench.py --ref-src "${REF_SRC:?set REF_SRC to the reference checkout}" \
            --device cuda --size 640x480 --tokens 32 --short-tokens 8 --reps 10 --compile
        ;;
    profile)
        "$PY" benchmarks/profile_request.py --device cuda --dtype bfloat16 --size 640x480 --tokens 8 \
            --slots 64 --concurrent 64
        ;;
    *)
        echo "unknown stage $stage (parity, model, serve, serve-caption, reference, reference-compiled, profile)" >&2
        exit 2
        ;;
    esac
done
