#!/usr/bin/env bash
# Launch train.py on every local accelerator (or 2 CPU ranks) through the deepspeed launcher.
#
#   ./train.sh CONFIG [DS_CONFIG] [extra train.py args]
#   ./train.sh configs/demo_cpu.yaml
#   ./train.sh configs/wf42m_pfc02_r100.yaml ds_configs/zero2_fp16.json --resume
#   ./train.sh configs/ms1mv3_r50.yaml ds_configs/zero1_fp16.json --hostfile hosts --num_nodes 2 \
#       --master_addr 10.0.0.1 --master_port 29500
#
# DS_CONFIG defaults to the YAML's train.deepspeed. Launcher options (--hostfile, --num_nodes,
# --num_gpus, --master_addr, --master_port, --include, --exclude) are passed to `deepspeed`;
# everything else goes to train.py. Environment: NPROC (ranks per node), OMP_NUM_THREADS
# (threads per rank; on CPU the default is cores / ranks, because the launcher sets none and
# oversubscribed ranks run 3-5x slower), PYTHON (defaults to .venv/bin/python when present).
#
# To stop a run, send SIGTERM (or SIGINT, Ctrl-C) to this script's PID: every rank saves a
# checkpoint at the same step and the script exits 143; `--resume` continues from there. A second
# signal during that checkpoint exits at once and keeps the previous one. For automatic restarts
# after a dead rank, use torchrun --max-restarts N with --set train.auto_resume=true (README).
# An OUTPUT that holds a run's checkpoints is refused before any rank starts unless --resume
# continues it or --overwrite starts over (the old run's files move to OUTPUT/replaced/<time>/).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")"
config=$1
shift
ds_args=()
if [[ $# -gt 0 && "$1" == *.json ]]; then
    ds_args=(--deepspeed_config "$1")
    shift
fi

launcher_args=()
train_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile|--num_nodes|--num_gpus|--num_accelerators|--master_addr|--master_port|--include|--exclude)
            launcher_args+=("$1" "$2"); shift 2 ;;
        --hostfile=*|--num_nodes=*|--num_gpus=*|--num_accelerators=*|--master_addr=*|--master_port=*|--include=*|--exclude=*)
            launcher_args+=("$1"); shift ;;
        *)
            train_args+=("$1"); shift ;;
    esac
done

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
cores=$(nproc)
if [[ "$gpus" -gt 0 ]]; then
    nproc_per_node=${NPROC:-$gpus}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))}
else
    nproc_per_node=${NPROC:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))}
fi
has_node_flags=0
for a in "${launcher_args[@]+"${launcher_args[@]}"}"; do
    case "$a" in --num_gpus*|--num_accelerators*|--include*|--exclude*) has_node_flags=1 ;; esac
done
if [[ $has_node_flags -eq 0 ]]; then
    launcher_args+=(--num_gpus "$nproc_per_node")
fi
if [[ " ${launcher_args[*]+"${launcher_args[*]}"} " != *" --master_port"* ]]; then
    # A free port, so two jobs on one machine do not collide on DeepSpeed's default 29500.
    port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    launcher_args+=(--master_port "$port")
fi

# One clear line for a bad key, value or file, or an output folder holding another run's
# checkpoints, before any rank starts.
"$PYTHON" -m pfc_ds.train.cli --config "$config" "${ds_args[@]+"${ds_args[@]}"}" \
    "${train_args[@]+"${train_args[@]}"}" || exit $?

echo "train.sh: ${nproc_per_node} rank(s)/node, OMP_NUM_THREADS=${OMP_NUM_THREADS}" >&2

# Signals. DeepSpeed's runner forwards SIGTERM/SIGINT only for multi-node pdsh runs, and its
# local launch.py answers one by killing the ranks' process trees 30 s later, which can cut a
# checkpoint write short. So the launcher runs in the background, and a SIGTERM or SIGINT to this
# script goes as SIGTERM to the rank processes themselves (the children of launch.py): they stop
# after the same step, save, and exit 143, which launch.py and the runner pass back here. With
# no local launch.py (pdsh), the runner gets the signal and forwards it to every node. The
# launcher runs in its own session, so a terminal Ctrl-C reaches only this script.
setsid "$PYTHON" -m deepspeed.launcher.runner --log_level warning "${launcher_args[@]}" \
    train.py --config "$config" "${ds_args[@]+"${ds_args[@]}"}" "${train_args[@]+"${train_args[@]}"}" &
runner=$!

forward() {
    local child ranks=""
    for child in $(pgrep -P "$runner" 2>/dev/null); do
        if tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | grep -q deepspeed.launcher.launch; then
            ranks="$ranks $(pgrep -P "$child" | tr '\n' ' ')"
        fi
    done
    if [[ -n "${ranks// /}" ]]; then
        echo "train.sh: $1: asking the ranks to save and stop (pids${ranks})" >&2
        kill -TERM $ranks 2>/dev/null || true
    else
        kill -TERM "$runner" 2>/dev/null || true
    fi
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT

# `wait` returns early when a trapped signal arrives; keep waiting for the runner itself.
while true; do
    rc=0
    wait "$runner" || rc=$?
    kill -0 "$runner" 2>/dev/null || break
done
exit "$rc"
