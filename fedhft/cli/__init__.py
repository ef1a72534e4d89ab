"""The `fedhft` command line: the main group; each command family lives in a module of this package.

Command modules import only click and light fedhft modules at import time (each command imports its
machinery when it runs), so `fedhft edge run` on a device never imports torch or transformers.
"""

from __future__ import annotations

import click

from fedhft.cli.broker import broker_group
from fedhft.cli.device import device_group
from fedhft.cli.edge import edge_group
from fedhft.cli.errors import OneLineErrorGroup
from fedhft.cli.export import export, plan, profiles_group
from fedhft.cli.loadgen import loadgen
from fedhft.cli.server import server_group
from fedhft.cli.simulate import report, simulate
from fedhft.logs import setup_logging


@click.group(cls=OneLineErrorGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="fedhft")
def main(verbose: int) -> None:
    """Federated fine-tuning of language models on heterogeneous edge devices."""
    setup_logging(verbose)


main.add_command(profiles_group)
main.add_command(plan)
main.add_command(export)
main.add_command(edge_group)
main.add_command(server_group)
main.add_command(broker_group)
main.add_command(device_group())
main.add_command(simulate)
main.add_command(report)
main.add_command(loadgen)
