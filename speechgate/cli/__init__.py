"""The `speechgate` command line: one module per command group (see speechgate/cli/common.py for
the conventions they share)."""

from __future__ import annotations

import sys

import click

from speechgate.cli.clients import clients
from speechgate.cli.common import EXIT_CODES
from speechgate.cli.keys import keys
from speechgate.cli.quotas import quotas
from speechgate.cli.serve import dev, relay_command, token_service
from speechgate.cli.stream import stream_command
from speechgate.cli.tokens import tokens
from speechgate.cli.upstreams import upstreams
from speechgate.core import logs


@click.group(epilog=EXIT_CODES)
def main() -> None:
    """speechgate: Azure Speech for apps that hold no Azure key."""
    logs.configure("info", "text")  # until a command reads its settings


for command in (dev, token_service, relay_command, keys, clients, tokens, quotas, upstreams, stream_command):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
