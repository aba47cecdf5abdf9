#!/usr/bin/env bash
# Wheels for `make bench-gpu` on a lent GPU machine that has torch, onnx and onnxruntime but no internet
# and lacks the packages below. Run here, where pip reaches PyPI; it writes .whl/ (git-ignored), which the
# device tool carries over. Versions are pinned to the ones installed here; wheels are for CPython 3.12,
# manylinux x86_64 (pure-Python wheels match any platform).
#   .whl/            always installed there: av (PyAV, bundles FFmpeg), soxr, sounddevice (+ cffi, pycparser;
#                    PortAudio itself is a system library: without it `import sounddevice` fails and only
#                    tests/test_audio.py cannot be collected), espeakng-loader (bundles eSpeak NG)
#   .whl/if-missing/ installed only where `import onnxscript` fails: onnxscript, onnx-ir (torch's ONNX exporter)
# There (repository root, Python 3.12; `make bench-gpu PYTHON=python3 SKIP_SETUP=1` in place of the last command where make is):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && (python3 -c 'import onnxscript' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/if-missing/*.whl) && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
REQUIRED=(av soxr sounddevice cffi pycparser espeakng-loader)
IF_MISSING=(onnxscript onnx-ir)
LIMIT_MIB=60

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"

version() {  # the installed version of a distribution, or a message and exit
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null \
        || { echo "$1 is not installed here: pip install it first (its version is the pin)" >&2; exit 1; }
}

download() {  # download DIR NAME...: each NAME==installed version, one wheel, no dependencies
    local dir=$1; shift
    mkdir -p "$dir"
    for name in "$@"; do
        "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d "$dir" "$name==$(version "$name")"
    done
}

rm -rf "$DEST"
download "$DEST" "${REQUIRED[@]}"
download "$DEST/if-missing" "${IF_MISSING[@]}"
find "$DEST" -type f -name '*.whl' -printf '%P\t%s\n' | sort | awk -F'\t' '{printf "  %-72s %6.1f MiB\n", $1, $2 / 1048576}'
total=$(du -sb "$DEST" | cut -f1)
printf 'total %.1f MiB in %s/ (limit %d MiB)\n' "$(echo "$total / 1048576" | bc -l)" "$DEST" "$LIMIT_MIB"
if ((total > LIMIT_MIB * 1048576)); then
    echo "$DEST/ is over $LIMIT_MIB MiB: the device tool carries 64 MiB in all" >&2
    exit 1
fi
cat <<'EOF'
On the GPU machine (repository root; the device tool carries .whl; with make: make bench-gpu PYTHON=python3 SKIP_SETUP=1):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && (python3 -c 'import onnxscript' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/if-missing/*.whl) && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_check.py
EOF
