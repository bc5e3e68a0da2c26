"""`UserError`: a mistake in what the user supplied (config, data files, workdir), as opposed to a bug.

`main.py` prints a UserError's message alone, without a traceback, and exits non-zero; any other exception
keeps its traceback. It subclasses ValueError, so callers that catch ValueError keep working. The message is
the whole report: it names the file / key / workdir, the expected and the found value, and what to do.
"""


class UserError(ValueError):
    """Bad config, bad data or a workdir that does not fit the run: fixable by the user, not a bug."""
