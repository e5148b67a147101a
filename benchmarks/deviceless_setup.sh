#!/usr/bin/env bash
# Builds an environment that compiles the Mosaic kernels for an H200 on a machine without a GPU:
# the GPU's jax (0.11.2) with XLA's CUDA plugin (it compiles ahead of time for a GPU target config,
# no GPU or CUDA libraries needed), and nvdisasm (from NVIDIA's wheel) to read the SASS.
#
#   bash benchmarks/deviceless_setup.sh [DIR]          # default DIR: /tmp/deviceless
#   PATH=DIR/bin:$PATH PYTHONPATH=$PWD DIR/bin/python benchmarks/ptxas_report.py --deviceless \
#       --variants default,overlap_late_p_named_waits_fwd --out /tmp/ptx
#   PATH=DIR/bin:$PATH python benchmarks/sass_report.py --ptx /tmp/ptx
#
# ptxas comes from the CUDA toolkit on PATH (jax's compile also looks for it there); Python 3.12 from
# PYTHON312 or `python3.12`. benchmarks/NOTES.md (2026-11-30, session 8) has what this found.
set -euo pipefail
dir=${1:-/tmp/deviceless}
jax_version=0.11.2
python=${PYTHON312:-}
if [ -z "$python" ]; then  # the first Python 3.12 that runs (a pyenv shim may not)
    for candidate in $(command -v python3.12) "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if [ -x "$candidate" ] && "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
            python=$candidate
            break
        fi
    done
fi
[ -n "$python" ] || { echo "deviceless_setup: no Python 3.12 (set PYTHON312)" >&2; exit 1; }
command -v ptxas >/dev/null || { echo "deviceless_setup: no ptxas on PATH (the CUDA toolkit's)" >&2; exit 1; }

"$python" -m venv "$dir"
"$dir/bin/python" -m pip install -q "jax==$jax_version" "jaxlib==$jax_version" \
    "jax-cuda13-plugin==$jax_version" "jax-cuda13-pjrt==$jax_version" numpy pytest jaxtyping beartype einops
# nvdisasm: the wheel's binary, into the environment's bin/.
wheels=$(mktemp -d)
"$dir/bin/python" -m pip download -q --no-deps -d "$wheels" nvidia-cuda-nvdisasm
"$dir/bin/python" -m zipfile -e "$wheels"/nvidia_cuda_nvdisasm-*.whl "$wheels/x"
install -m 755 "$(find "$wheels/x" -name nvdisasm -type f | head -1)" "$dir/bin/nvdisasm"
rm -rf "$wheels"
"$dir/bin/python" -c "import jax, jax_plugins.xla_cuda13; print('deviceless:', jax.__version__, 'with the CUDA plugin')"
echo "deviceless: $dir/bin/python, $dir/bin/nvdisasm, $(command -v ptxas)"
