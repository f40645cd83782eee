#!/bin/sh
# Entrypoint of the worker containers: `poe worker`, told how many training processes
# (torchrun, one per GPU) to run an extraction with. POE_TRAIN_NPROC set by the operator
# wins; otherwise one per GPU torch sees in the container (none: one CPU process).
set -eu
if [ -z "${POE_TRAIN_NPROC:-}" ]; then
  POE_TRAIN_NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
  export POE_TRAIN_NPROC
fi
exec poe worker "$@"
