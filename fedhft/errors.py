"""The one base error of fedhft: the CLI prints its message as one line and exits non-zero."""


class FedHFTError(Exception):
    """A user-facing error whose message names the problem."""
