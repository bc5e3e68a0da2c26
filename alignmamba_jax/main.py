"""Command-line entry point: `python -m alignmamba_jax.main --config configs/synthetic.py --workdir DIR`.

Multi-host: pass --coordinator_address/--num_processes/--process_id, or run under SLURM, Open MPI or on a
Cloud TPU pod where `jax.distributed` detects them (any one flag given turns detection on for the rest).

Expected user errors (a missing config file, an unknown config key or variant, bad data, a workdir that holds
another run or is in use, a non-finite loss, a full disk) print one message, `error: ...`, and exit with status
1; any other exception is a bug and keeps its traceback. SIGTERM or SIGINT saves a checkpoint after the current
step and exits with status 128 + the signal number (`alignmamba_jax.preemption`).

With no platform chosen (JAX_PLATFORMS unset) on a machine with no TPU and no GPU, JAX is kept to the CPU
(`cpu_only_without_accelerators`): the `aot` extra's libtpu and CUDA plugin would otherwise start up and print
a cuDNN traceback and libtpu warnings before every run.
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

    from alignmamba_jax import preemption, train
    cpu_only_without_accelerators(jax)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if train.multihost_requested(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
            check_multihost_flags(train)
            jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (UserError, train.NonFiniteLossError) as error:
        sys.stdout.flush()
        raise SystemExit(f"error: {error}")
    except preemption.Preempted as stopped:
        sys.stdout.flush()
        print(str(stopped), file=sys.stderr)
        raise SystemExit(128 + stopped.signum)


def cpu_only_without_accelerators(jax):
    """Sets jax_platforms to "cpu" when none is set and `targets.accelerator_present()` finds no TPU or GPU;
    otherwise leaves JAX's choice alone."""
    from alignmamba_jax import targets
    if not jax.config.jax_platforms and not targets.accelerator_present():
        jax.config.update("jax_platforms", "cpu")


def check_multihost_flags(train):
    """--num_processes / --process_id name a process of a cluster that only --coordinator_address locates;
    given without it, outside a cluster jax.distributed could detect, jax.distributed fails deep inside."""
    given = [name for name in ("num_processes", "process_id") if FLAGS[name].value is not None]
    if given and FLAGS.coordinator_address is None and not train.multihost_requested(None, None, None):
        raise UserError(f"--{given[0]} is given without --coordinator_address: give all three of "
                        f"--coordinator_address, --num_processes, --process_id, or none")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
