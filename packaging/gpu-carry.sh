#!/usr/bin/env bash
# Fill .whl/site (ignored by git) with what a bare GPU machine without network lacks for packaging/gpu-check.sh:
# bitsandbytes, gguf, zstandard, platformdirs, diskcache and llama-cpp-python (the tokenizer; ctypes, so this
# machine's build runs on any Python 3), unpacked for PYTHONPATH. bitsandbytes keeps only the CUDA library the
# GPU's torch needs (--cuda, default 130 for torch 2.11+cu130): every one of them is over the 64 MiB a run may
# carry in all. Run it here, where pip reaches PyPI; then on the GPU machine:
#     export PYTHONPATH=$PWD/.whl/site; bash packaging/gpu-check.sh --out $OUT/gpu-check.json --deadline-s 515
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=130
python=3.12
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) cuda="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        *) echo "usage: $0 [--cuda 130] [--python 3.12]" >&2; exit 2 ;;
    esac
done
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl/wheels .whl/site
mkdir -p .whl/wheels .whl/site
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp "${platforms[@]}" \
    -d .whl/wheels bitsandbytes==0.50.2 gguf==0.19.0 zstandard==0.25.0 platformdirs diskcache
# llama-cpp-python publishes no binary wheel: the one pip built here (about 6 minutes if it is not cached yet)
python3 -m pip wheel -q --no-deps -w .whl/wheels llama-cpp-python==0.3.36
# unpacked as they are (pip here would refuse another Python's wheels; PYTHONPATH needs only the files)
python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(".whl/site") for w in sys.argv[1:]]' .whl/wheels/*.whl
find .whl/site/bitsandbytes -name 'libbitsandbytes_cuda*' ! -name "libbitsandbytes_cuda${cuda}.so" -delete
# what nothing imports: llama-cpp-python's copies of its libraries and headers at the top (it loads llama_cpp/lib),
# zstandard's cffi backend (the C one is the default)
rm -rf .whl/site/bin .whl/site/lib .whl/site/include .whl/site/zstandard/_cffi.* .whl/wheels
echo "$(du -sm .whl | cut -f1) MiB in .whl/site (carry [\".whl\"], at most 64 MiB with the checkout)"
