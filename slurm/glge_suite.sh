#!/usr/bin/env bash
# sbatch array script: the paper's GLGE tables (python -m finetune.glge_suite), one task per array job.
#
#   MODEL=<export> GLGE=<glge root> OUT=<dir> sbatch --array=0-2 slurm/glge_suite.sh [suite flags ...]
#   e.g. ... sbatch --array=0-2 slurm/glge_suite.sh --modes ar,nar,janus --train-arg=--run.deepspeed_config=ds_configs/zero2_bf16.json
#
# Array index -> task: 0 xsum, 1 squadqg, 2 personachat (TASKS overrides the list). Every job
# finetunes its task's modes on one node (torchrun with NPROC_PER_NODE ranks), decodes, scores with
# GLGE's official protocol and rewrites OUT/tables.{md,json} from all finished tasks, so the last job
# to finish leaves the complete tables. A resubmitted job skips finished task/modes and resumes an
# interrupted finetuning from its last checkpoint.
#
# Environment: MODEL, GLGE, OUT (required); TASKS (space-separated, default "xsum squadqg personachat");
# NPROC_PER_NODE (default: GPUs Slurm gave the node, else 1); PYTHON (default: active venv, else
# REPO_DIR/.venv, else python3); DRY_RUN=1 prints the command and exits.
#SBATCH --job-name=janus-glge
#SBATCH --array=0-2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# Find the repository: sbatch runs a copy of this file from slurmd's spool directory, so fall back
# to the path the job was submitted with, then to the submission directory.
if [[ -z ${REPO_DIR:-} ]]; then
    here=$(dirname "${BASH_SOURCE[0]}")
    if [[ ! -f $here/glge_suite.sh && -n ${SLURM_JOB_ID:-} ]]; then
        here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p')")
    fi
    [[ -f $here/glge_suite.sh ]] || here=${SLURM_SUBMIT_DIR:-.}/slurm
    REPO_DIR=$(cd "$here/.." && pwd)
fi

die() { echo "glge_suite.sh: error: $*" >&2; exit 2; }

: "${MODEL:?set MODEL to the BART-JANUS (or BART) export folder}"
: "${GLGE:?set GLGE to the GLGE data root (holding easy/<task>_data/org_data)}"
: "${OUT:?set OUT to the output folder (shared by the array jobs)}"
read -r -a tasks <<< "${TASKS:-xsum squadqg personachat}"
index=${SLURM_ARRAY_TASK_ID:-0}
((index >= 0 && index < ${#tasks[@]})) || die "array index $index: only ${#tasks[@]} tasks (${tasks[*]})"
task=${tasks[$index]}

if [[ -z ${PYTHON:-} ]]; then
    if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then PYTHON=$VIRTUAL_ENV/bin/python
    elif [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=$REPO_DIR/.venv/bin/python
    else PYTHON=python3
    fi
fi
gpus=${SLURM_GPUS_ON_NODE:-0}
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}

cmd=("$PYTHON" -m finetune.glge_suite --model "$MODEL" --glge "$GLGE" --out "$OUT" --tasks "$task" --nproc "$nproc" "$@")
echo "glge_suite.sh: task $task (array index $index): ${cmd[*]}"
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
cd "$REPO_DIR"
exec "${cmd[@]}"
