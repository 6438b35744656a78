"""The one base class of every error mlmscope raises for a user to read.

The command line catches :class:`MlmscopeError` in one place (``mlmscope.app.cli.main``) and prints its message
without a traceback; anything else is a bug and keeps its traceback. Subclasses live next to the code that raises
them and say what went wrong in words a user can act on.
"""


class MlmscopeError(Exception):
    """An error whose message is meant for the user: bad input, a missing file, a refused configuration."""
