#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VM, copy this repository to every worker, install, and start
# the same command on all workers at once (one JAX process per host; jax.distributed finds the others).
#
#   TPU_NAME=alignmamba ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     launch/tpu_pod.sh --config configs/mosei.py [--config.x=y ...]
#
# Data: build the TFDS dataset once on any machine (a single-host run with --config.data.name=tfds
# --config.data.path=DIR builds it from DIR/downloads/manual/unaligned_50.pkl) and copy DIR to
# $BUCKET/tensorflow_datasets; every worker syncs it to local disk before training.
# The workdir ($BUCKET/runs/$RUN) is shared by all hosts: Orbax writes checkpoints there, process 0 the logs.
# AOT_CHECK=1 first compiles the step for $ACCELERATOR on this machine (python -m alignmamba_jax.aot; needs
# `pip install -e ".[aot]"` here, $PYTHON) and stops before creating anything if it does not compile or fit.
# Steps can be skipped with SKIP_CREATE=1 / SKIP_INSTALL=1. Delete the TPU afterwards:
#   gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE"
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
RUN=${RUN:-$(date -u +%Y%m%d-%H%M%S)}
TFDS_DIR=${TFDS_DIR:-$BUCKET/tensorflow_datasets}
WORKDIR=${WORKDIR:-$BUCKET/runs/$RUN}
tpu=(gcloud compute tpus tpu-vm --zone "$ZONE")

if [[ -n ${AOT_CHECK:-} ]]; then
  "${PYTHON:-python3}" -m alignmamba_jax.aot "$@" --target "$ACCELERATOR"
fi

if [[ -z ${SKIP_CREATE:-} ]]; then
  "${tpu[@]}" create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$VERSION"
fi

archive=$(mktemp --suffix .tar.gz)
git archive --format=tar.gz -o "$archive" HEAD
"${tpu[@]}" scp "$archive" "$TPU_NAME:~/alignmamba-jax.tar.gz" --worker=all

if [[ -z ${SKIP_INSTALL:-} ]]; then
  "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command "
    set -e
    rm -rf ~/alignmamba-jax && mkdir ~/alignmamba-jax && tar -xzf ~/alignmamba-jax.tar.gz -C ~/alignmamba-jax
    cd ~/alignmamba-jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -e '.[tpu]' gcsfs google-cloud-storage"
fi

# --num_processes turns on jax.distributed; the coordinator and process ids come from the TPU metadata.
num_workers=$("${tpu[@]}" describe "$TPU_NAME" --format=json |
  python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))')
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command "
  set -e
  mkdir -p ~/tensorflow_datasets && gcloud storage rsync -r $TFDS_DIR ~/tensorflow_datasets
  cd ~/alignmamba-jax && .venv/bin/python -m alignmamba_jax.main $* --num_processes=$num_workers \
    --config.data.name=tfds --config.data.path=\$HOME/tensorflow_datasets --workdir=$WORKDIR"
echo "results: $WORKDIR/results.json (tensorboard --logdir $WORKDIR/tensorboard)"
