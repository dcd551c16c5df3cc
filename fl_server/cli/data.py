"""``factoryfed data make``: a task's federation data, one Parquet file per factory."""

from __future__ import annotations

import click


def print_table(rows: list[tuple[str, str]], header: tuple[str, str]) -> None:
    """Two columns, the first left-aligned to its widest cell, the second right-aligned."""
    width = max(len(r[0]) for r in [header, *rows])
    click.echo(f"{header[0]:<{width}}  {header[1]:>8}")
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value:>8}")


@click.group(help="create federation data (one Parquet file per factory)")
def data() -> None:
    """The ``data`` group."""


@data.command(help="generate a task's factories, validation and test files plus a manifest")
@click.option("--task", required=True, help="standard model name, e.g. tep_fault")
@click.option("--num-factories", type=int, required=True, help="number of factories")
@click.option("--seed", type=int, required=True, help="generation seed (>= 0)")
@click.option("--out", required=True, help="output directory")
@click.option(
    "--scheme",
    type=click.Choice(["natural", "dirichlet", "iid"]),
    default="natural",
    help="how data is split into factories (default: natural)",
)
@click.option("--alpha", type=float, default=0.5, help="Dirichlet concentration")
@click.option(
    "--quantity-skew", type=float, default=0.5, help="log-normal sigma of factory sizes"
)
@click.option(
    "--feature-shift", type=float, default=0.0, help="scale of per-factory sensor shift"
)
@click.option("--force", is_flag=True, help="regenerate even if identical data exists")
def make(
    task: str,
    num_factories: int,
    seed: int,
    out: str,
    scheme: str,
    alpha: float,
    quantity_skew: float,
    feature_shift: float,
    force: bool,
) -> int:
    """Write the files (or keep identical ones) and print their row counts."""
    from standard_models.base import DataValidationError, PartitionConfig
    from standard_models.datafiles import data_matches, make_federated_data, read_manifest

    partition = PartitionConfig(
        scheme=scheme, alpha=alpha, quantity_skew=quantity_skew, feature_shift=feature_shift
    )
    params = (task, num_factories, seed, partition)
    try:
        if not force and data_matches(out, *params):
            status = "up to date (same parameters), kept"
        else:
            make_federated_data(*params, out_dir=out)
            status = "written"
        manifest = read_manifest(out)
    except (ValueError, DataValidationError, RuntimeError, OSError) as exc:
        click.echo(f"factoryfed data make: {exc}", err=True)
        return 1
    print_table([(e["name"], str(e["rows"])) for e in manifest["files"]], ("file", "rows"))
    click.echo(f"{task}: {num_factories} factories, seed {seed}, {partition}")
    click.echo(f"{out}: {status}")
    return 0
