"""The TOML that Flower reads: CLI connections, node configs, run configs and ``k=v`` options.

Everything is written with ``tomli_w``, so any path or Hydra override survives quoting. Files
are the safe route for values with spaces or quotes; :func:`config_args` is for the short
``--federation-config``/``--run-config``/``--node-config`` strings of plain values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import tomli_w

#: Name of the ``[superlink.<name>]`` connection the operator launcher writes.
DEFAULT_CONNECTION = "factoryfed"


def write_toml(path: str | Path, document: Mapping[str, object], private: bool = False) -> Path:
    """Write ``document`` as a TOML file (parent folders created; replaced in one step).

    ``private``: readable by the owner only (0600) from the moment it exists, for a file that
    may hold a secret.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if private:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    tmp.write_text(tomli_w.dumps(dict(document)))
    os.replace(tmp, path)
    return path


def config_args(values: Mapping[str, object]) -> str:
    """``key=value`` pairs with TOML values, as Flower's ``--*-config`` options read them.

    Flower splits the string at spaces outside quotes and does not honour escaped quotes, so a
    string value may not hold a double quote: write a TOML file instead
    (:func:`write_toml`), which Flower accepts in the same option.
    """
    pairs = []
    for key, value in values.items():
        if isinstance(value, str) and '"' in value:
            raise ValueError(
                f"config value {key}={value!r}: a double quote cannot be passed inline; "
                "write a TOML file instead"
            )
        pairs.append(tomli_w.dumps({key: value}).strip().replace(" = ", "=", 1))
    return " ".join(pairs)


def write_connection(
    flwr_home: str | Path,
    address: str,
    name: str = DEFAULT_CONNECTION,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one ``[superlink.<name>]`` entry, the default.

    With ``root_certificates`` (absolute path of the CA certificate) the CLI talks TLS;
    ``insecure=True`` is only for a SuperLink started without TLS. Returns the file.
    """
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    document = {"superlink": {"default": name, name: entry}}
    return write_toml(Path(flwr_home) / "config.toml", document)
