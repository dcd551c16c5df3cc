"""The ``factoryfed`` command line (click): data, reward ledger, provisioning, deployment.

One module per command group; each command calls the library function that does the work
(:mod:`standard_models.datafiles`, :mod:`fl_server.rewards.ledger`, :mod:`fl_server.provision`,
:mod:`fl_server.launch`) and turns its outcome into lines and an exit code. Heavy imports (torch,
the task catalogue, cryptography) happen inside the commands so that ``factoryfed --help``
stays instant.

Exit codes: 0 done; 1 the command failed (the reason is on stderr); 2 a usage error (a group
without its action shows its help); 130 interrupted while starting.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from fl_server.cli.data import data
from fl_server.cli.deploy import deploy
from fl_server.cli.ledger import ledger, statement
from fl_server.cli.provision import provision


@click.group(
    help="Federated learning for manufacturing firms: data, runs and operations.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def factoryfed() -> None:
    """The root group; its commands are added below."""


for _command in (data, ledger, statement, provision, deploy):
    factoryfed.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``factoryfed`` console script; returns the exit code.

    ``argv`` defaults to the process's arguments. Usage errors print click's message and give
    2, as does a group called without its action (after showing the group's help).
    """
    try:
        code = factoryfed.main(
            args=list(argv) if argv is not None else None,
            prog_name="factoryfed",
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 130
    return int(code or 0)
