#!/usr/bin/env bash
# NPROC processes under mpiexec; ranks, local ranks and the rendezvous address come from mpi4py
# (shardgrok.init_distributed). pip install 'shardgrok[mpi]' brings mpi4py and MPICH's mpiexec;
# with a system MPI, set MPIEXEC to its launcher (it must match the MPI mpi4py was built for).
#   NPROC=4 launch/mpirun.sh --optimizer grokadamw
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${MPIEXEC:-mpiexec}" -n "${NPROC:-2}" "${PYTHON:-python}" "$here/train_sharded.py" "$@"
