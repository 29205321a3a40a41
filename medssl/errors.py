"""The one exception type for user errors.

A `UserError` is something the user can fix: a missing or corrupt file, a bad manifest, a bad
config value. Its message is one line that names the file or field and the problem. The CLI
prints it without a traceback and exits with code 2.
"""


class UserError(Exception):
    """A user-fixable problem; `str(err)` is a one-line message naming the file or field."""
