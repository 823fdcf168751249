# shellcheck shell=bash
# Shared launcher for slurm/pretrain.sh and slurm/finetune.sh (sourced, not run).
#
#   janus_launch ENTRY_SCRIPT [trainer args...]
#
# One `srun --kill-on-bad-exit=1` step with one task per node; each task runs
#   python -m torch.distributed.run (= torchrun) --nnodes N --node_rank $SLURM_PROCID
#          --nproc_per_node P --rdzv_endpoint MASTER_ADDR:MASTER_PORT ENTRY_SCRIPT args...
# MASTER_ADDR is the first host of the allocation, MASTER_PORT is derived from the job id.
# Outside Slurm the same command runs on this machine without srun (one node).
#
# Environment (all optional unless marked; see slurm/README.md):
#   CONFIG           trainer --config file (required unless --config is among the arguments)
#   SAVE_DIR         --run.save_dir (checkpoints, metrics, TensorBoard; a requeued job resumes from it)
#   DS_CONFIG        --run.deepspeed_config
#   EXTRA_ARGS       more trainer flags, split on whitespace (arguments after the script name also go through)
#   DEVICE           gpu (default) | cpu   (cpu: DS_ACCELERATOR=cpu, gloo, NPROC_PER_NODE ranks per node)
#   NPROC_PER_NODE   ranks per node (alias GPUS_PER_NODE); default: GPUs Slurm gave the node, 1 on cpu
#   OMP_NUM_THREADS  threads per rank; default: cpus-per-task / ranks per node (at least 1)
#   PYTHON           interpreter; default: active venv/conda, else REPO_DIR/.venv, else python3
#   MASTER_PORT      rendezvous port; default 10000 + job id % 20000
#   RDZV_BACKEND     static (default: node rank = SLURM_PROCID) | c10d
#   SOCKET_IFNAME    sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (other NCCL_*/GLOO_* pass through)
#   REQUEUE          1 (default): after a USR1 stop or a hang, `scontrol requeue` the job; 0: just exit
#   HANG_REQUEUES    requeue after a hung step only while SLURM_RESTART_COUNT is below this (default 2)
#   DRY_RUN          1: print the launch command and exit

_janus_log() { printf '[janus-slurm %(%H:%M:%S)T] %s\n' -1 "$*"; }

_janus_die() {
    _janus_log "error: $*" >&2
    exit 2
}

# Signal bookkeeping (the batch shell gets USR1 from `#SBATCH --signal=B:USR1@T`).
_JANUS_STEP_PID=""
_JANUS_VIA_SRUN=0 # the step runs under srun (several nodes)
_JANUS_STOP=0    # USR1 seen: training was asked to save and stop, the job should come back
_JANUS_TRAPS=0   # how many trapped signals interrupted `wait`
_JANUS_TERM=0    # TERM seen: scancel, the time limit or preemption; the trainer saves, the job does not requeue itself

_janus_on_usr1() {
    _JANUS_TRAPS=$((_JANUS_TRAPS + 1))
    _JANUS_STOP=1
    _janus_log "USR1 received (walltime near, or sent by hand): asking the trainer to save and stop"
    # srun forwards it to every process of its step; without srun (one node) it goes to the step's
    # process tree (torchrun starts each rank in a session of its own, so a process-group signal
    # would miss them). torchrun and the loader workers ignore it; the trainer ranks save a
    # checkpoint at the next step boundary and exit cleanly.
    if [[ -n $_JANUS_STEP_PID ]]; then
        if ((_JANUS_VIA_SRUN)); then
            kill -USR1 "$_JANUS_STEP_PID" 2>/dev/null
        else
            _janus_signal_tree USR1 "$_JANUS_STEP_PID"
        fi
    fi
    return 0
}

# Send signal $1 to process $2 and all its descendants (children first).
_janus_signal_tree() {
    local child
    for child in $(pgrep -P "$2" 2>/dev/null); do
        _janus_signal_tree "$1" "$child"
    done
    kill "-$1" "$2" 2>/dev/null || true
}

_janus_on_term() {
    _JANUS_TRAPS=$((_JANUS_TRAPS + 1))
    _JANUS_TERM=1
    # scancel / walltime (TERM and XCPU) / preemption: Slurm signals every process of the step itself; the ranks
    # save a checkpoint at the next step boundary within KillWait. Keep waiting so they can.
    _janus_log "TERM received: the trainer saves a checkpoint at the next step boundary; waiting for it"
    return 0
}

_janus_default_python() {
    if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
        echo "$VIRTUAL_ENV/bin/python"
    elif [[ -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then
        echo "$CONDA_PREFIX/bin/python"
    elif [[ -x $REPO_DIR/.venv/bin/python ]]; then
        echo "$REPO_DIR/.venv/bin/python"
    else
        command -v python3 || echo python
    fi
}

_janus_gpus_on_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ ${SLURM_GPUS_PER_NODE:-} =~ ([0-9]+)$ ]]; then  # "8" or "a100:8"
        echo "${BASH_REMATCH[1]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Number of hang reports (one folder per hung run) the step watchdog left in SAVE_DIR/hangs.
_janus_hang_reports() {
    [[ -n ${SAVE_DIR:-} && -d $SAVE_DIR/hangs ]] || { echo 0; return; }
    find "$SAVE_DIR/hangs" -mindepth 1 -maxdepth 1 -type d | wc -l
}

# True when the trainer exited cleanly but did not reach max_steps (it stopped on a signal).
_janus_stopped_early() {
    local summary=${SAVE_DIR:-}/train_summary.json
    [[ -n ${SAVE_DIR:-} && -f $summary ]] || return 1
    "$PYTHON" - "$summary" <<'EOF'
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("finished") is False else 1)
EOF
}

janus_launch() {
    local entry=$1
    shift
    [[ -n ${REPO_DIR:-} ]] || _janus_die "REPO_DIR is not set"
    cd "$REPO_DIR" || _janus_die "cannot cd to $REPO_DIR"
    if [[ ! -f $entry ]]; then
        [[ ${DRY_RUN:-0} == 1 ]] || _janus_die "$REPO_DIR/$entry not found"
        _janus_log "warning: $REPO_DIR/$entry not found (dry run)"
    fi

    # ---- trainer arguments: CONFIG/SAVE_DIR/DS_CONFIG, then EXTRA_ARGS, then "$@" (later wins)
    local -a args=()
    local -a extra=()
    [[ -n ${CONFIG:-} ]] && args+=(--config "$CONFIG")
    [[ -n ${SAVE_DIR:-} ]] && args+=(--run.save_dir "$SAVE_DIR")
    [[ -n ${DS_CONFIG:-} ]] && args+=(--run.deepspeed_config "$DS_CONFIG")
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    args+=("${extra[@]}" "$@")
    if [[ -z ${CONFIG:-} ]] && [[ " ${args[*]} " != *" --config "* ]]; then
        _janus_die "set CONFIG=<json> (e.g. CONFIG=pretrain/configs/tiny_cpu.json) or pass --config FILE"
    fi
    if [[ -n ${CONFIG:-} && ! -f $CONFIG && ${DRY_RUN:-0} != 1 ]]; then
        _janus_die "CONFIG=$CONFIG not found (relative paths are from $REPO_DIR)"
    fi

    # ---- device, ranks per node, threads
    local device=${DEVICE:-gpu}
    local nproc=${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}
    case $device in
        cpu)
            export DS_ACCELERATOR=cpu      # DeepSpeed CPU accelerator -> gloo backend
            export CUDA_VISIBLE_DEVICES="" # never touch a GPU on the cpu path
            nproc=${nproc:-1}
            ;;
        gpu)
            nproc=${nproc:-$(_janus_gpus_on_node)}
            [[ $nproc =~ ^[1-9][0-9]*$ ]] || _janus_die "no GPUs found on this node: request them (--gpus-per-node) or set NPROC_PER_NODE, or DEVICE=cpu"
            export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
            export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # name used by torch < 2.2
            export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
            # NCCL's flight recorder: the last collectives of every process group, dumped by the step
            # watchdog (and by NCCL's own timeout) next to the Python stacks in SAVE_DIR/hangs.
            export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
            export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
            if [[ -n ${SAVE_DIR:-} && -z ${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-} ]]; then
                mkdir -p "$SAVE_DIR/hangs" && export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=$SAVE_DIR/hangs/nccl_trace_rank_
            fi
            ;;
        *) _janus_die "DEVICE must be gpu or cpu, not '$device'" ;;
    esac
    [[ $nproc =~ ^[1-9][0-9]*$ ]] || _janus_die "NPROC_PER_NODE must be a positive integer, not '$nproc'"
    if [[ -n ${SOCKET_IFNAME:-} ]]; then
        export NCCL_SOCKET_IFNAME=$SOCKET_IFNAME GLOO_SOCKET_IFNAME=$SOCKET_IFNAME
    fi
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
        OMP_NUM_THREADS=$((cpus / nproc))
        ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
    fi
    export OMP_NUM_THREADS
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}
    PYTHON=${PYTHON:-$(_janus_default_python)}

    # ---- rendezvous: first host of the allocation, port from the job id
    local nnodes master_addr master_port
    local -a launcher=()
    nnodes=${SLURM_NNODES:-1}
    if [[ -n ${SLURM_JOB_ID:-} ]] && ((nnodes > 1)); then
        # Several nodes: one srun task per node. srun turns a TERM it receives itself (scancel, the
        # time limit and preemption signal the batch step too) into SIGKILL of every task ("srun:
        # forcing job termination"; it resets an inherited SIG_IGN), so a multi-node job saves on
        # the USR1 warning before the limit, not on TERM: see slurm/README.md.
        local hosts
        hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || _janus_die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
        master_addr=${hosts%%$'\n'*}
        [[ -n $master_addr ]] || _janus_die "no hosts in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
        master_port=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
        launcher=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
        # srun >= 22.05 no longer inherits --cpus-per-task from sbatch: pass it, or each
        # node's torchrun and all its ranks would be confined to one CPU.
        [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && launcher+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    else  # one node (a one-node allocation, or no Slurm): torchrun runs right here, without srun,
        # so a TERM from Slurm reaches the ranks (which save) and nothing turns it into SIGKILL
        nnodes=1
        master_addr=127.0.0.1
        master_port=${MASTER_PORT:-$((20000 + $$ % 10000))}
        export SLURM_PROCID=0
    fi
    local rdzv=${RDZV_BACKEND:-static}
    # torchrun handles neither TERM nor USR1 (see the node command below), so it outlives the ranks' save.
    # shellcheck disable=SC2054  # the commas separate signal names inside one argument
    local -a torchrun=(--nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend "$rdzv"
        --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "${SLURM_JOB_ID:-local}" --max_restarts 0
        --signals_to_handle SIGINT,SIGHUP,SIGQUIT)

    # Each node's task: torchrun ignores USR1, TERM and XCPU (Slurm sends them to every process of
    # the step, XCPU at the time limit; USR1's and XCPU's default actions would kill torchrun, and
    # torchrun's own TERM handling kills its ranks before they can save). The ranks install their own handlers, save at the next step
    # boundary and exit; torchrun exits when they do. Then exec torchrun with this node's rank.
    # The single quotes are deliberate: $SLURM_PROCID must expand on each node, not here.
    # shellcheck disable=SC2016
    # DeepSpeed's JIT-built ops (cpu_adam for the offload configs) go to a node-local folder unless
    # TORCH_EXTENSIONS_DIR is set (e.g. to a pre-built shared copy, see slurm/README.md): many nodes
    # compiling into one shared home directory race on its lock files.
    local node_cmd='trap "" USR1 TERM XCPU; export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions_${USER:-janus}}"; py=$1; shift; exec "$py" -m torch.distributed.run --node_rank "$SLURM_PROCID" "$@"'
    local -a cmd=("${launcher[@]}" bash -c "$node_cmd" janus-node "$PYTHON" "${torchrun[@]}" "$entry" "${args[@]}")

    _janus_log "job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}: $nnodes node(s) x $nproc rank(s), device $device, OMP_NUM_THREADS $OMP_NUM_THREADS, master $master_addr:$master_port"
    local shown=""
    ((${#launcher[@]} == 0)) || shown=$(printf '%q ' "${launcher[@]}")
    _janus_log "command: ${shown}bash -c '$node_cmd' janus-node $(printf '%q ' "$PYTHON" "${torchrun[@]}" "$entry" "${args[@]}")"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        return 0
    fi

    # Run the step in the background so the traps fire while it runs.
    trap _janus_on_usr1 USR1
    trap _janus_on_term TERM XCPU
    local hangs_before
    hangs_before=$(_janus_hang_reports)
    _JANUS_VIA_SRUN=$((${#launcher[@]} > 0))
    "${cmd[@]}" &
    _JANUS_STEP_PID=$!
    local rc traps_before
    while :; do
        traps_before=$_JANUS_TRAPS
        rc=0
        wait "$_JANUS_STEP_PID" || rc=$?
        ((_JANUS_TRAPS != traps_before)) || break # not interrupted by a trap: the step ended
    done
    trap - USR1 TERM XCPU
    _janus_log "training step exited with $rc"

    if ((_JANUS_TERM == 1)); then
        _janus_log "stopped by TERM (scancel, time limit or preemption): not requeueing; a resubmitted job with the same SAVE_DIR resumes from the last complete checkpoint"
        return "$rc"
    fi
    if ((rc != 0)) && (($(_janus_hang_reports) > hangs_before)); then
        _janus_log "a training step hung: every rank's Python stacks are in $SAVE_DIR/hangs (newest folder)"
        if [[ ${REQUEUE:-1} == 1 && -n ${SLURM_JOB_ID:-} ]] && ((${SLURM_RESTART_COUNT:-0} < ${HANG_REQUEUES:-2})); then
            _janus_log "requeueing job $SLURM_JOB_ID (HANG_REQUEUES=${HANG_REQUEUES:-2}); it resumes from the last complete checkpoint"
            scontrol requeue "$SLURM_JOB_ID" || _janus_log "scontrol requeue failed: resubmit by hand, it resumes"
        fi
        return 75
    fi
    if ((rc == 0)) && ((_JANUS_STOP == 0)) && _janus_stopped_early; then
        _JANUS_STOP=1 # the ranks were signalled directly (e.g. --signal=USR1@T without B:)
        _janus_log "the trainer stopped before max_steps on a signal"
    fi
    if ((rc == 0 && _JANUS_STOP == 1)) && [[ ${REQUEUE:-1} == 1 && -n ${SLURM_JOB_ID:-} ]]; then
        _janus_log "checkpoint saved: requeueing job $SLURM_JOB_ID; it resumes from ${SAVE_DIR:-the configured save dir}"
        scontrol requeue "$SLURM_JOB_ID" || _janus_log "scontrol requeue failed: resubmit by hand, it resumes"
    fi
    return "$rc"
}
