#!/usr/bin/env bash
# The one GPU check (issue 21): on a fresh GPU machine, with no network, in at most 8 minutes, run the GPU tests,
# the Triton kernels against their torch references (compiled, tests/test_kernels.py and friends), the kernel
# timings (python -m edgectx.bench.kernels), `edgectx bench speed --synthetic llama-3.1-8b --context 32768,131072
# --gpu-mem-cap-gib 24 --json` and `edgectx plan` for the same run, and write every figure to one JSON file
# (steps with exit status, seconds, parsed figures and output tails; issue 21's acceptance at 131,072 tokens;
# plan against measured peak). Each step has its share of the deadline: a hang costs that step, not the file.
#
# Usage (from anywhere; it runs in the checkout):
#   bash packaging/gpu-check.sh [--out FILE] [--wheels DIR] [--cpu] [--deadline-s N] [--work DIR]
#   --wheels DIR  install the carried wheels in DIR (no index, no network) into a private folder first; carry
#                 what the machine lacks (bitsandbytes, gguf, zstandard, platformdirs, llama-cpp-python, ...).
#   --work DIR    the steps' logs (NAME.out, NAME.err) and JUnit files (default: beside --out)
#   --cpu         the same harness at CPU size (tiny model, no GPU steps): how tests/test_gpu_check.py tests it.
# edgectx itself need not be installed: without an installed edgectx the checkout's folders are linked into the
# edgectx namespace (tui/, quant/, kernels/ live at the top level) in a temporary folder put on PYTHONPATH.
# Exit status 0 when every step passed; the JSON is written either way.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/gpu-check.json"; wheels=""; mode=gpu; deadline=470; work=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$(realpath -m "$2"); shift 2 ;;
    --wheels) wheels=$(realpath "$2"); shift 2 ;;
    --cpu) mode=cpu; shift ;;
    --deadline-s) deadline="$2"; shift 2 ;;
    --work) work=(--work "$(realpath -m "$2")"); shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network, ever
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export EDGECTX_HOME="$scratch/home"  # the check writes nothing into the user's data

if [ -n "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$scratch/site" "$wheels"/*.whl \
    || { echo "gpu-check: the carried wheels in $wheels did not install" >&2; exit 2; }
  export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! (cd "$scratch" && "$python" -c "import edgectx.quant, edgectx.kernels" 2>/dev/null); then
  mkdir -p "$scratch/ns/edgectx"
  for f in "$root"/edgectx/*; do ln -s "$f" "$scratch/ns/edgectx/"; done
  for d in tui quant kernels; do ln -s "$root/$d" "$scratch/ns/edgectx/$d"; done
  export PYTHONPATH="$scratch/ns${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"
timeout $((${deadline%.*} + 20)) "$python" packaging/gpu_check.py --out "$out" --mode "$mode" --deadline-s "$deadline" "${work[@]}"
