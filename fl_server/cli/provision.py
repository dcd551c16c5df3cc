"""``factoryfed provision``: the CA, the SuperLink certificate and one key bundle per factory."""

from __future__ import annotations

import click


@click.command(help="create the CA, the SuperLink certificate and one key bundle per factory")
@click.option("--out", default="bundles", help="output folder (default: bundles)")
@click.option("--num-factories", type=int, help="factories factory_000 ... factory_N-1")
@click.option(
    "--factory", "factories", multiple=True, metavar="ID", help="a factory id (repeatable)"
)
@click.option(
    "--superlink-address",
    default="127.0.0.1:9093",
    metavar="HOST:PORT",
    help="address the factories dial; its host goes into the certificate (default "
    "127.0.0.1:9093)",
)
@click.option(
    "--dns",
    multiple=True,
    metavar="NAME",
    help="another host name of the SuperLink for the certificate (localhost is always in)",
)
@click.option(
    "--ip",
    multiple=True,
    metavar="ADDR",
    help="another IP address of the SuperLink for the certificate (127.0.0.1 is always in)",
)
@click.option("--cert-days", type=int, default=825, help="server certificate validity (days)")
@click.option(
    "--rotate-ca",
    is_flag=True,
    help="replace a CA whose ca.key is missing with a new one (every bundle must be re-issued)",
)
def provision(
    out: str,
    num_factories: int | None,
    factories: tuple[str, ...],
    superlink_address: str,
    dns: tuple[str, ...],
    ip: tuple[str, ...],
    cert_days: int,
    rotate_ca: bool,
) -> int:
    """Provision and print the public facts (paths, fingerprints), never a private key."""
    from fl_server.provision import ProvisionError
    from fl_server.provision import provision as make_bundles

    if factories:
        ids = list(factories)
    elif num_factories:
        ids = [f"factory_{i:03d}" for i in range(num_factories)]
    else:
        click.echo("factoryfed provision: give --num-factories N or --factory ID ...", err=True)
        return 2
    try:
        result = make_bundles(
            out,
            ids,
            superlink_address=superlink_address,
            dns_names=["localhost", *dns],
            ip_addresses=["127.0.0.1", *ip],
            cert_days=cert_days,
            rotate_ca=rotate_ca,
        )
    except (ProvisionError, OSError, ValueError) as exc:
        click.echo(f"factoryfed provision: {exc}", err=True)
        return 1
    click.echo(f"CA:        {result.ca_dir} (keep ca.key off the servers)")
    click.echo(
        f"operator:  {result.operator_dir}  (ca.crt, server.crt, server.key, factories.json)"
    )
    names, ips = ", ".join(result.dns_names), ", ".join(result.ip_addresses) or "-"
    click.echo(f"SuperLink: {result.superlink_address}; certificate SANs: DNS {names}; IP {ips}")
    for fid, bundle in result.factories.items():
        click.echo(f"factory    {fid:<16} {bundle.path}  {bundle.fingerprint}")
    click.echo(
        "next: start the SuperLink (factoryfed deploy superlink --operator-dir "
        f"{result.operator_dir} --home DIR --register-factories), give each factory its "
        "folder under factories/"
    )
    return 0
