#!/usr/bin/env bash
# The GPU check, built for the machine we can borrow: one command of at most 600 s, no network,
# what it lacks carried as wheels, at most 8 files back. Also runs on an ordinary GPU box.
#
#   tools/gpu_check.sh --prepare     on a machine with network: the wheels the GPU machine lacks
#                                    (Python 3.12, manylinux x86_64, CUDA 13) into .whl/ (ignored)
#   tools/gpu_check.sh --plan        the steps and their budgets (they add up to <= 540 s)
#   tools/gpu_check.sh --dry-run     every command line, each module and config it names checked
#   tools/gpu_check.sh               the check: OUT=dir (default $OUT or gpu_check_out) gets
#                                    summary.txt, results.json, logs.tar.gz and BENCHMARKS.md
#
# The check itself: exits 3 without CUDA; installs .whl/*.whl (if any) into a target folder put
# first on PYTHONPATH, never over the machine's torch; then runs tools/gpu_check.py's plan, each
# step under its own timeout, correctness first (the gpu tests, the fp16/ZeRO trainer smoke with
# an injected inf and a resume, banks on CUDA), then throughput and GPU JPEG decode. Its exit
# status is the number of failed steps. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=.whl
# What the lent machine (torch 2.11+cu130, Python 3.12) lacks; pins match requirements.txt's
# DeepSpeed and the pydantic that DeepSpeed 0.19.8 was tested with here.
DEEPSPEED=deepspeed==0.19.8
BINARY_WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
               typing-inspection==0.4.5 typing-extensions==4.16.0 nvidia-nvimgcodec-cu13 "nvidia-nvjpeg>=13,<14")
MAX_WHEEL_MB=60

prepare() {
    local pip=${PIP:-$PY -m pip}
    rm -rf "$WHL" && mkdir -p "$WHL"
    grep -qx '/.whl/' .gitignore || echo '/.whl/' >>.gitignore
    # DeepSpeed ships a source archive only: a pure-Python wheel, its ops left to JIT.
    DS_BUILD_OPS=0 $pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$DEEPSPEED" || return 1
    $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d "$WHL" "${BINARY_WHEELS[@]}" || return 1
    local total=0 size
    echo "wheels in $WHL:"
    for w in "$WHL"/*.whl; do
        size=$(stat -c %s "$w")
        total=$((total + size))
        printf '  %-72s %6.1f MB\n' "$(basename "$w")" "$(echo "$size / 1048576" | bc -l)"
        # What each wheel needs (the GPU machine's preflight imports them all).
        unzip -p "$w" '*/METADATA' 2>/dev/null | grep '^Requires-Dist' | grep -v 'extra ==' \
            | sed 's/^Requires-Dist: /      needs /'
    done
    local mb=$((total / 1048576))
    echo "total: ${mb} MB (at most ${MAX_WHEEL_MB} MB)"
    [[ $mb -le $MAX_WHEEL_MB ]]
}

install_wheels() {
    ls "$WHL"/*.whl >/dev/null 2>&1 || return 0
    local site=${GPU_CHECK_SITE:-/tmp/pfc_ds_gpu_check_site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHL"/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls "$WHL"/*.whl | wc -l) wheel(s) into $site"
}

case "${1:-}" in
    --prepare) prepare; exit $? ;;
    --plan) exec "$PY" tools/gpu_check.py plan ;;
    --dry-run) exec "$PY" tools/gpu_check.py dry-run ;;
    ""|--run) ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch ($PY); nothing to check" >&2
    exit 3
fi
export PYTHONUNBUFFERED=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
install_wheels || { echo "gpu_check: installing $WHL/*.whl failed" >&2; exit 4; }
OUT=${OUT:-gpu_check_out}
exec "$PY" tools/gpu_check.py run --out "$OUT"
