"""The one exception type users see.

Every problem a user can cause (a bad path, a mismatched adapter, an empty prompt...) is raised as
:class:`KangarooError` with a one-line message; the CLI prints that line and exits with status 2
instead of showing a traceback.
"""


class KangarooError(Exception):
    """A user-facing error with a one-line, actionable message."""
