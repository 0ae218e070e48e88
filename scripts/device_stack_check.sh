#!/usr/bin/env bash
# Runs the CPU checks against the GPU test machine's versions (DESIGN.md: torch 2.11, triton 3.6,
# transformers 5.17) before a GPU session spends its 15 minutes finding out. From the repo root, after
# `make test` has made .venv:
#
#   bash scripts/device_stack_check.sh            # the AOT compile with triton 3.6, then the whole suite
#   bash scripts/device_stack_check.sh tests/test_models.py -k gemma   # the AOT compile, then these tests
#
# The device versions go into side folders under .venv/device-stack/ (pip install --no-deps --target; the
# venv's own packages are left alone) and come first on PYTHONPATH. numpy 2.2 comes along too: triton
# 3.6's interpreter fails on numpy >= 2.3 (int() of a 1-element array), which is triton's and the
# interpreter's problem only, not the GPU's. Found this way so far: torch 2.11's dynamo refusing
# find_spec under torch.compile, and register spills that only triton 3.6 had.
#
# Expected differences, not failures of the package: cuobjdump from triton 3.6 names the cubin
# sm_90 (test_cubin_holds_sm90a_code), and the CUDA extension, built against the venv's torch, is not
# importable by torch 2.11 (its tests skip or fail on the ABI).
#
# Environment: DEVICE_TORCH (2.11.0), DEVICE_TRITON (3.6.0), DEVICE_TRANSFORMERS (5.17.0), VENV (.venv).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "device_stack_check.sh: no $PY; run 'make test' first (or set VENV)" >&2; exit 2; }

DEVICE_TORCH=${DEVICE_TORCH:-2.11.0}
DEVICE_TRITON=${DEVICE_TRITON:-3.6.0}
DEVICE_TRANSFORMERS=${DEVICE_TRANSFORMERS:-5.17.0}
SIDE="$VENV/device-stack"
paths=()
# numpy first (transformers' own dependencies bring a newer one); transformers with its dependencies
# (5.17 needs httpx, which newer ones do not); torch and triton alone (the venv has their CUDA libraries).
for spec in "numpy==2.2.6" "torch==$DEVICE_TORCH" "triton==$DEVICE_TRITON" "transformers==$DEVICE_TRANSFORMERS"; do
    folder="$SIDE/${spec/==/-}"
    deps=--no-deps
    [[ "$spec" == transformers* ]] && deps=
    if [[ ! -f "$folder/.installed" ]]; then
        echo "=== installing $spec into $folder"
        rm -rf "$folder"
        "$PY" -m pip install -q $deps --target "$folder" "$spec" && touch "$folder/.installed" || exit 2
    fi
    paths+=("$folder")
done
export PYTHONPATH="$(IFS=:; echo "${paths[*]}")"
"$PY" -c "import torch, triton, transformers, numpy
print('device stack: torch', torch.__version__, '| triton', triton.__version__, '| transformers',
      transformers.__version__, '| numpy', numpy.__version__)" || exit 2

status=0
echo "=== ahead-of-time compile of every shipped Triton config with triton $DEVICE_TRITON"
"$PY" -m llm2vec_fast.tools.aot_check --expect-triton "$DEVICE_TRITON" || status=1
echo "=== pytest on the device stack"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider "${@:-tests}" || status=1
exit $status
