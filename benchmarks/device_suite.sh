#!/usr/bin/env bash
# The GPU test-and-benchmark suite (`make device-suite`): see benchmarks/device_suite.py for the steps.
# Run from anywhere on a GPU machine whose Python has jax with its CUDA plugin; results go to $OUT (else
# runs/device_suite). PYTHON picks the interpreter (default python3); --dry_run runs it all on the CPU.
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" benchmarks/device_suite.py "$@"
