"""The one click group class of every fedhft command line: a FedHFTError becomes one line and exit status 1."""

from __future__ import annotations

import sys

import click

from fedhft.errors import FedHFTError


class CliInputError(FedHFTError):
    """A command-line argument that names nothing usable (a missing or unreadable file, ...)."""


class OneLineErrorGroup(click.Group):
    """Turns a FedHFTError into one `error: ...` line on stderr and exit status 1 (also for a group run alone)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except FedHFTError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
