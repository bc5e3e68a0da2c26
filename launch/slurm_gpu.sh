#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per node, each driving all of its GPUs.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config configs/mosei.py --workdir /shared/runs/mosei
#
# jax.distributed detects SLURM (SLURM_NTASKS > 1) and takes the coordinator, process count and ids from it;
# the workdir and data.path must be on a file system every node sees. Install with `pip install -e ".[cuda]"`
# into the environment named by $VENV (default: .venv in the submission directory). AOT_CHECK=1 first compiles the
# step for the job's GPUs (GPU_TARGET, default h100, times 8 a node: python -m alignmamba_jax.aot, which needs
# the `aot` extra) and ends the job before training starts if it does not compile or fit.
#SBATCH --job-name=alignmamba
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=alignmamba-%j.out
set -euo pipefail

VENV=${VENV:-$SLURM_SUBMIT_DIR/.venv}
cd "$SLURM_SUBMIT_DIR"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ -n ${AOT_CHECK:-} ]]; then
  check=()      # the training command's flags without --workdir, which the check does not take
  skip=
  for arg in "$@"; do
    if [[ -n $skip ]]; then skip=; continue; fi
    case $arg in --workdir=*) ;; --workdir) skip=1 ;; *) check+=("$arg") ;; esac
  done
  "$VENV/bin/python" -m alignmamba_jax.aot "${check[@]}" --target "${GPU_TARGET:-h100}x$((8 * SLURM_NNODES))"
fi
srun "$VENV/bin/python" -m alignmamba_jax.main "$@"
