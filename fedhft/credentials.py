"""Broker passwords from files (``--password-file``), so they never show in a process list."""

from __future__ import annotations

from pathlib import Path

from fedhft.errors import FedHFTError

CREDENTIALS_HEADER = "# fedhft broker credentials: user password (keep secret; give each device its own line)"


class CredentialsError(FedHFTError):
    """A password file that cannot be used."""


def read_password_file(path: Path) -> str:
    """The first non-empty, non-``#`` line of ``path``, stripped (a device bundle's ``password`` file)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read password file {path} ({exc})") from exc
    if lines and lines[0].strip() == CREDENTIALS_HEADER:
        raise CredentialsError(
            f"{path} is the broker's credentials.txt (one `user password` line per user), not a password file: "
            "give the server <server user>.password from `fedhft broker config`, a device its bundle's password"
        )
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise CredentialsError(f"password file {path} holds no password")


def resolve_password(password: str | None, password_file: Path | None) -> str | None:
    """``--password`` or ``--password-file`` (not both)."""
    if password is not None and password_file is not None:
        raise CredentialsError("give --password or --password-file, not both")
    return read_password_file(password_file) if password_file is not None else password
