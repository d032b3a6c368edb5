"""The one exception type for mistakes a user can fix (bad config, bad corpus, missing file).

The CLI prints it as a short message plus a hint and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class MtkitError(Exception):
    def __init__(self, message: str, hint: str | None = None, setting: str | None = None):
        """setting: the name of the value at fault as the Python API calls it (target_lang, device,
        output, ...). The message names the concept ("the target language"), never a command-line
        flag the caller may not have typed; the CLI adds its flag (cli.FLAGS)."""
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.setting = setting
