"""Command-line entry point: `python -m alignmamba_jax.main --config configs/synthetic.py --workdir DIR`.

Multi-host: pass --coordinator_address/--num_processes/--process_id, or run under SLURM, Open MPI or on a
Cloud TPU pod where `jax.distributed` detects them (any one flag given turns detection on for the rest).

Expected user errors (a missing config file, an unknown config key or variant, bad data, a workdir that holds
another run, a non-finite loss) print one message, `error: ...`, and exit with status 1; any other exception is
a bug and keeps its traceback.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from alignmamba_jax.cli import parse_flags
from alignmamba_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    import jax

    from alignmamba_jax import train
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if train.multihost_requested(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (UserError, train.NonFiniteLossError) as error:
        sys.stdout.flush()
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
