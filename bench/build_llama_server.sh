#!/usr/bin/env bash
# Build the reference `llama-server` from exactly the llama.cpp sources that are
# vendored in the llama-cpp-python sdist our server links against, so that the
# benchmark compares serving layers, not two different inference kernels; and
# `llama-batched-bench` from the same sources, the raw decode ceiling.
#
# Output: <repo>/.bench/llama-server and <repo>/.bench/llama-batched-bench
# (statically linked, self-contained binaries).
# Idempotent: does nothing if both binaries already exist (delete one to rebuild).
#
# Environment:
#   CMAKE_ARGS            extra CMake flags; default "-DGGML_NATIVE=OFF", i.e. the
#                         same default the llama-cpp-python build uses here. On a
#                         CUDA host pass the same value as for the pip install,
#                         e.g. CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF".
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36).
#   BUILD_JOBS            parallel compile jobs (default 2).
#   PYTHON                interpreter used for `pip download` (default: repo .venv).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
BENCH_DIR="${REPO_ROOT}/.bench"
OUT_BIN="${BENCH_DIR}/llama-server"
CEILING_BIN="${BENCH_DIR}/llama-batched-bench"

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${BUILD_JOBS:-2}"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"

if [[ -x "${OUT_BIN}" && -x "${CEILING_BIN}" ]]; then
    echo "llama-server and llama-batched-bench already built in ${BENCH_DIR} (delete one to rebuild)"
    exit 0
fi

die() { echo "build_llama_server.sh: error: $*" >&2; exit 1; }

for tool in cmake tar; do
    command -v "${tool}" >/dev/null 2>&1 || die "'${tool}' not found in PATH"
done
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || die "no C++ compiler found"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
        PYTHON="${REPO_ROOT}/.venv/bin/python"
    else
        PYTHON="$(command -v python3 || true)"
    fi
fi
[[ -n "${PYTHON}" ]] || die "no python interpreter found for 'pip download'"

SDIST_DIR="${BENCH_DIR}/sdist"
SRC_PARENT="${BENCH_DIR}/src"
SRC_DIR="${SRC_PARENT}/llama_cpp_python-${VERSION}"
LLAMA_DIR="${SRC_DIR}/vendor/llama.cpp"
BUILD_DIR="${BENCH_DIR}/build-llama-server"
SDIST="${SDIST_DIR}/llama_cpp_python-${VERSION}.tar.gz"

mkdir -p "${SDIST_DIR}" "${SRC_PARENT}"

if [[ ! -f "${SDIST}" ]]; then
    echo "==> downloading llama-cpp-python==${VERSION} sdist"
    "${PYTHON}" -m pip download --no-deps --no-binary :all: \
        "llama-cpp-python==${VERSION}" -d "${SDIST_DIR}" \
        || die "pip download of llama-cpp-python==${VERSION} failed"
    [[ -f "${SDIST}" ]] || die "expected sdist not found at ${SDIST}"
fi

if [[ ! -f "${LLAMA_DIR}/CMakeLists.txt" ]]; then
    echo "==> unpacking ${SDIST}"
    rm -rf "${SRC_DIR}"
    tar -xzf "${SDIST}" -C "${SRC_PARENT}"
    [[ -f "${LLAMA_DIR}/CMakeLists.txt" ]] || die "vendored llama.cpp missing in ${SRC_DIR}"
fi

# Word-split CMAKE_ARGS like scikit-build-core does for the pip build.
read -r -a USER_ARGS <<< "${CMAKE_ARGS}"

echo "==> configuring (CMAKE_ARGS: ${CMAKE_ARGS})"
# Fixed flags: Release like the wheel build; curl off as in llama-cpp-python;
# static libs so the binary can be copied alone; no web UI (it would try to
# download prebuilt assets, and is irrelevant to serving speed).
# User flags come last so they can override any of these.
cmake -S "${LLAMA_DIR}" -B "${BUILD_DIR}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    "${USER_ARGS[@]}"

echo "==> building llama-server and llama-batched-bench with ${JOBS} jobs"
cmake --build "${BUILD_DIR}" --config Release --target llama-server llama-batched-bench -j "${JOBS}"

printf '%s\n' "llama-cpp-python ${VERSION}" "CMAKE_ARGS=${CMAKE_ARGS}" > "${OUT_BIN}.build-info"
for target in llama-server llama-batched-bench; do
    BUILT="${BUILD_DIR}/bin/${target}"
    [[ -x "${BUILT}" ]] || die "build finished but ${BUILT} is missing"
    # Copy atomically so an interrupted copy never looks like a finished build.
    cp "${BUILT}" "${BENCH_DIR}/${target}.tmp"
    mv "${BENCH_DIR}/${target}.tmp" "${BENCH_DIR}/${target}"
    echo "==> built ${BENCH_DIR}/${target}"
done
"${OUT_BIN}" --version 2>&1 | head -n 4 || true
