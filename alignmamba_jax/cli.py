"""Flag parsing shared by the command-line tools (`main.py`, `aot.py`): absl + ml_collections' config file
flag, with the config mistakes that surface there as tracebacks turned into one `error: ...` line."""
import re

from absl import flags

from alignmamba_jax.errors import UserError

FLAGS = flags.FLAGS


def _user_error_in(error):
    """The first UserError in `error`'s chain: config_flags re-raises a config file's errors as a new
    exception holding the traceback text, so the original one, with the clean message, is in the chain."""
    while error is not None:
        if isinstance(error, UserError) and not str(error).startswith("Error whilst parsing config file"):
            return error
        error = error.__cause__ or error.__context__
    return None


def _unknown_override(error, argv):
    """'--config.x.y: unknown config key ...' for the override of argv that `error` (config_flags' KeyError,
    or an AttributeError wrapping it, quoting the missing key) is about; None if it is about none of them."""
    inner = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
    match = re.match(r"'([^']+)'(.*)", str(inner.args[0]) if inner.args else "", re.S)
    if match is None:
        return None
    key, hint = match.group(1), match.group(2).strip()
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0]
        keys = flag[len("--config."):].split(".")
        if flag.startswith("--config.") and key in keys:
            path = ".".join(keys[:keys.index(key) + 1])
            return f"{flag}: unknown config key {path!r}" + (f" ({hint})" if hint else "")
    return None


def parse_flags(argv):
    """absl's flag parsing, with the config mistakes that surface there as tracebacks turned into one line."""
    try:
        argv = FLAGS(argv)
    except flags.Error as error:
        user_error = _user_error_in(error)
        if user_error is not None:
            raise SystemExit(f"error: --config: {user_error}")
        raise SystemExit(f"error: {error} (--helpshort or --helpfull lists the flags)")
    except (AttributeError, KeyError) as error:  # config_flags: an override of a key the config does not have
        unknown = _unknown_override(error, argv)
        if unknown is None:
            raise
        raise SystemExit(f"error: {unknown}")
    try:
        FLAGS.config.keys()
    except OSError as error:  # config_flags defers a config file it could not read to the first access
        reason = str(error.__cause__ or error).strip().splitlines()[-1].strip()
        raise SystemExit(f"error: --config={FLAGS['config'].config_filename}: cannot load the config file: "
                         f"{reason}")
    return argv
