#!/usr/bin/env bash
# Set up a CUDA 13.0 build toolchain from NVIDIA's PyPI wheels, so that
# `cargo build --release --features cuda` works on a machine with no GPU, no driver and no
# system CUDA toolkit. The binary is then carried to a GPU machine (see docs/gpu.md).
#
#   scripts/setup_cuda.sh            install (idempotent) and print the exports
#   scripts/setup_cuda.sh --build    ... then run the release cuda build with them
#   source "$ADAPTERD_CUDA_DIR/env.sh"   the exports, for building by hand
#
# Everything goes under $ADAPTERD_CUDA_DIR (default ~/.cache/adapterd/cuda13), never into the
# repository. Versions are pinned to CUDA 13.0 Update 2: the GPU machines run driver 580
# (CUDA 13.0), which cannot load PTX from a newer nvcc (13.1+ emits a newer PTX ISA).
set -euo pipefail

CUDA_DIR="${ADAPTERD_CUDA_DIR:-$HOME/.cache/adapterd/cuda13}"
SITE="$CUDA_DIR/site"          # pip --target tree; the wheels all unpack into nvidia/cu13
ROOT="$CUDA_DIR/root"          # CUDA_ROOT laid out the way cudarc and cudaforge look for it
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"   # H100/H200; cudaforge turns 90 into sm_90a
PYTHON="${PYTHON:-python3}"

# nvcc + its front end (crt), the NVVM back end (cicc, libdevice), headers and libraries.
# Only the .so files' names matter at link time: at run time the GPU machine's own CUDA 13
# libraries are used (sonames libcudart.so.13, libcublas.so.13, libnvrtc.so.13, libcurand.so.10).
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)

build=0
for arg in "$@"; do
  case "$arg" in
    --build) build=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# 1. Wheels (skipped when the stamp matches the pins).
stamp="$CUDA_DIR/.pins"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "${PINS[*]}" ]]; then
  echo ">> installing ${PINS[*]} into $SITE" >&2
  rm -rf "$SITE"
  mkdir -p "$SITE"
  "$PYTHON" -m pip install --quiet --no-deps --no-compile --target "$SITE" "${PINS[@]}"
  printf '%s' "${PINS[*]}" > "$stamp"
fi
CU="$SITE/nvidia/cu13"
[[ -x "$CU/bin/nvcc" ]] || { echo "nvcc missing under $CU" >&2; exit 1; }

# 2. CUDA_ROOT: bin/, include/, nvvm/ point into the wheels; lib64/ holds the unversioned
#    names the linker wants (-lcudart -> libcudart.so), which the wheels do not ship.
mkdir -p "$ROOT/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$ROOT/$d"; done
#    The sonames too, so that ld can follow libcublas.so.13's own DT_NEEDED (libcublasLt.so.13).
for l in cudart:13 cublas:13 cublasLt:13 nvrtc:13 curand:10; do
  ln -sfn "$CU/lib/lib${l%%:*}.so.${l##*:}" "$ROOT/lib64/lib${l%%:*}.so"
  ln -sfn "$CU/lib/lib${l%%:*}.so.${l##*:}" "$ROOT/lib64/lib${l%%:*}.so.${l##*:}"
done

# 3. libcuda (the driver API) comes with the NVIDIA driver, not with any wheel, and candle
#    links it (cudarc's `dynamic-linking`). Build a link-time stub like the toolkit's
#    lib64/stubs/libcuda.so: soname libcuda.so.1, every driver entry point that cuda.h 13.0
#    or cudarc 0.19 declares, each returning CUDA_ERROR_NO_DEVICE (100). At run time the
#    driver's real libcuda.so.1 is found instead; the stub is never installed as libcuda.so.1.
stub="$ROOT/lib64/stubs/libcuda.so"
if [[ ! -f "$stub" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  printf '#include <cuda.h>\n' > "$tmp/h.c"
  # Names after cuda.h's own #defines (cuMemAlloc -> cuMemAlloc_v2), default and per-thread stream.
  for ptds in 0 1; do
    gcc -E -P -I"$CU/include" $([[ $ptds = 1 ]] && echo -D__CUDA_API_PER_THREAD_DEFAULT_STREAM=1) "$tmp/h.c" \
      | tr '\n' ' ' | grep -oE '\bCUresult +cu[A-Za-z0-9_]+ *\(' | grep -oE 'cu[A-Za-z0-9_]+'
  done > "$tmp/syms"
  # Plus the names cudarc's bindings declare (the union is harmless: a stub only has to resolve).
  cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1 || true)"
  if [[ -n "$cudarc_src" ]]; then
    grep -oE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$cudarc_src" | awk '{print $NF}' >> "$tmp/syms"
  fi
  sort -u "$tmp/syms" | awk '{print "int " $1 "(void) { return 100; }"}' > "$tmp/stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stub" "$tmp/stub.c"
  echo ">> built link stub $stub ($(wc -l < "$tmp/stub.c") symbols)" >&2
fi

# 4. The environment the build needs.
cat > "$CUDA_DIR/env.sh" <<EOF
# source me: CUDA 13.0 build environment for \`cargo build --release --features cuda\`
export CUDA_ROOT="$ROOT"          # cudarc: link search (lib64, lib64/stubs)
export CUDA_HOME="$ROOT"          # cudaforge fallback when nvcc is not on PATH
export PATH="$ROOT/bin:\$PATH"      # nvcc (cudaforge; cudarc reads \`nvcc --version\`)
export CUDARC_CUDA_VERSION=13000  # pin cudarc's bindings to CUDA 13.0
export CUDA_COMPUTE_CAP=$COMPUTE_CAP       # no nvidia-smi here; 90 = H100/H200 (sm_90a)
export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-1}   # nvcc jobs in candle-kernels' build script
EOF
echo "# environment written to $CUDA_DIR/env.sh:" >&2
cat "$CUDA_DIR/env.sh"

if [[ $build = 1 ]]; then
  # shellcheck disable=SC1091
  source "$CUDA_DIR/env.sh"
  cd "$(dirname "$0")/.."
  echo ">> cargo build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)" >&2
  start=$(date +%s)
  cargo build --release --features cuda
  echo ">> cuda build finished in $(( $(date +%s) - start ))s: target/release/adapterd" >&2
fi
