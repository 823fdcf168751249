#!/usr/bin/env bash
# sbatch script: AR/NAR finetuning on GLGE (finetune/train.py) with DeepSpeed, one or more nodes.
#
#   GPU cluster:  CONFIG=<cfg.json> SAVE_DIR=<dir> sbatch --nodes=4 slurm/finetune.sh [--section.field value ...]
#   CPU (tests):  DEVICE=cpu NPROC_PER_NODE=2 CONFIG=... SAVE_DIR=... sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/finetune.sh
#
# sbatch flags given on the command line (or SBATCH_* variables) override the defaults below.
# Everything else is environment variables, documented in slurm/README.md and slurm/common.sh.
# On USR1 (sent 120 s before the walltime) the trainer saves a checkpoint and stops, and the
# job requeues itself; a requeued or resubmitted job resumes from SAVE_DIR (--run.resume auto).
#SBATCH --job-name=janus-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# Find the repository: sbatch runs a copy of this file from slurmd's spool directory, so
# fall back to the path the job was submitted with, then to the submission directory.
if [[ -z ${REPO_DIR:-} ]]; then
    here=$(dirname "${BASH_SOURCE[0]}")
    if [[ ! -f $here/common.sh && -n ${SLURM_JOB_ID:-} ]]; then
        here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p')")
    fi
    [[ -f $here/common.sh ]] || here=${SLURM_SUBMIT_DIR:-.}/slurm
    REPO_DIR=$(cd "$here/.." && pwd)
fi
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"

janus_launch finetune/train.py "$@"
