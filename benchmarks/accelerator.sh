#!/usr/bin/env bash
# Every accelerator benchmark in one run (at most about 13 minutes on one H100/H200 or TPU host, each
# under its own time limit); prints RESULT lines.
#
#   bash benchmarks/accelerator.sh            # from the repository root, on the accelerator machine
#
# Assumes a Python with jax (CUDA or TPU), flax, optax, orbax-checkpoint, einops, transformers and
# torch; the package runs from the source tree. Wheels of anything else (diffusers, grain, imageio,
# imageio-ffmpeg) may be put in .whl/ beside this repository's root: they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/m141jax-site .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/m141jax-site"
fi
$PY -c "import jax; print('devices:', jax.devices())"

bench() {  # seconds, then the command; keeps RESULT lines and errors, never stops the others
  local limit=$1; shift
  echo "== $*"
  timeout "$limit" "$@" 2>&1 | grep -E "^RESULT|Error|error:|Traceback" || true
}

# DiT: tiny JAX vs diffusers on the device, compile time vs depth, the 13B forward at 544x960x81 (MFU)
bench 200 $PY benchmarks/dit_forward.py --sizes tiny --repeats 3
# attention at 43,242 tokens x 24 heads x 128, batch 1 and 2, fwd and fwd+bwd: splash vs blockwise on a
# TPU, cuDNN vs blockwise on a GPU (ms and TFLOP/s)
bench 300 $PY benchmarks/attention.py --repeats 3
# VAE: tiny/small vs diffusers, then the 544x960x81 decode at the real config (seconds, peak memory)
bench 120 $PY benchmarks/vae.py --repeats 1 --skip-aot
# one 4-step 544x960x81 clip with the 13B presets: seconds per clip and per second of video
bench 150 $PY benchmarks/generate.py --skip-cpu --accelerator --repeats 1
# the N:M sparse matmul where the GPU supports it
bench 30 $PY benchmarks/compress.py --skip-13b
