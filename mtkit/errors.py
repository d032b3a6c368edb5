"""The one exception type for mistakes a user can fix (bad config, bad corpus, missing file).

The CLI prints it as a short message plus a hint and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class MtkitError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
