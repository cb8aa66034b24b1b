#!/usr/bin/env bash
# The GPU check, prepared for a bare GPU machine with no network (python3 3.12, CuPy,
# NumPy, xarray, pandas already there). Run from the repository root with the wheels
# of everything else in .whl/ (see "Carried wheels" below):
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else /tmp/gpu-check
#
# It installs the wheels into /tmp/site, runs the GPU tests (pytest -m gpu, no Prefect
# needed) and the GPU benchmark (bench/gpu.py: dask-cuda LocalCUDACluster against a CPU
# distributed LocalCluster, same operations on the same >= 10 GB field), and writes
# OUT_DIR/gpu.json (figures and test counts), OUT_DIR/gpu.log and OUT_DIR/gpu-tests.xml.
# Budget: about 6 minutes; each phase has its own timeout and a failing phase does
# not stop the next one. Exit status: 0 when the tests passed and the benchmark ran.
#
# Knobs: PYTHON (default python3), DFM_GPU_GB (field size, default 10),
# DFM_GPU_ROUNDS (timed runs per operation, default 3),
# DFM_GPU_CHECK_FORCE_CPU=1 (benchmark the CPU backend only: the dry run of this script
# on a machine without a GPU), DFM_GPU_CHECK_NO_WHEELS=1 (use the current environment).
#
# Carried wheels (made on a developer machine, never committed):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl dask-cuda==26.10.0 dask==2026.7.1 distributed==2026.7.1 zarr==3.1.6 numcodecs==0.16.6 \
#         google-crc32c==1.9.0 donfig==0.8.1.post1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#         typing-inspection==0.4.5 typing-extensions==4.16.0 packaging==26.4 partd==1.4.2 locket==1.0.0 \
#         tblib==3.2.2 zict==3.0.0 tornado==6.6.1 xarray==2026.9.0
#     python -m bench.gpu --verify-wheels .whl     # every Requires-Dist carried or already there
set -uo pipefail

OUT_DIR=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1
PY=${PYTHON:-python3}
SIZE_GB=${DFM_GPU_GB:-10}
ROUNDS=${DFM_GPU_ROUNDS:-3}
export PYTHONUNBUFFERED=1
say() { echo "[$(date +%H:%M:%S)] $*"; }
status=0

say "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM, $($PY --version 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || say "no nvidia-smi here"

if [ "${DFM_GPU_CHECK_NO_WHEELS:-0}" != 1 ] && [ -d .whl ]; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        say "FAILED: wheel install"; exit 2
    fi
    export PYTHONPATH=/tmp/site:$PWD
    $PY -m bench.gpu --verify-wheels .whl || status=1
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' || status=1
import importlib
for name in ("numpy", "xarray", "dask", "distributed", "zarr", "pydantic", "cupy", "dask_cuda"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except ImportError as exc:
        print(f"  {name} missing: {exc}")
from site_workers.compute import gpu_unavailable
print("  GPU backend:", gpu_unavailable() or "available")
EOF

say "GPU tests (pytest -m gpu)"
timeout 180 $PY -m pytest --noconftest -p no:cacheprovider -q -rs -m gpu tests/test_compute_gpu.py \
    --junitxml="$OUT_DIR/gpu-tests.xml" -o junit_family=xunit2 || { say "GPU tests: FAILED or skipped (exit $?)"; status=1; }

say "GPU benchmark: ${SIZE_GB} GB, ${ROUNDS} timed runs per operation"
force=()
[ "${DFM_GPU_CHECK_FORCE_CPU:-0}" = 1 ] && force=(--force-cpu)
timeout 270 $PY -m bench.gpu --size-gb "$SIZE_GB" --rounds "$ROUNDS" "${force[@]}" \
    --tests-xml "$OUT_DIR/gpu-tests.xml" --out "$OUT_DIR/gpu.json" >/dev/null || { say "benchmark FAILED (exit $?)"; status=1; }

say "done (status $status): $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $status
