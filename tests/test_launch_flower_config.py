"""The TOML Flower reads (``fl_server.launch.flower_config``), read back by Flower's own code."""

from __future__ import annotations

import tomllib

import pytest
from flwr.common.config import parse_config_args

from fl_server.launch.flower_config import config_args, write_connection, write_toml


def test_connection_file_is_what_flower_reads(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "bundle" / "ca.crt"
    ca.parent.mkdir()
    ca.write_text("not read here")
    path = write_connection(tmp_path / "home", "127.0.0.1:9093", "fed", root_certificates=ca)
    assert path == tmp_path / "home" / "config.toml"
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    conn = read_superlink_connection("fed")
    assert conn.address == "127.0.0.1:9093"
    assert conn.root_certificates == str(ca.resolve())
    assert not conn.insecure
    write_connection(tmp_path / "home", "127.0.0.1:1234", "factoryfed-sim", insecure=True)
    assert tomllib.loads(path.read_text()) == {
        "superlink": {
            "default": "factoryfed-sim",
            "factoryfed-sim": {"address": "127.0.0.1:1234", "insecure": True},
        }
    }
    conn = read_superlink_connection("factoryfed-sim")
    assert conn.insecure and conn.address == "127.0.0.1:1234"


def test_node_and_run_config_files_survive_quotes_and_spaces(tmp_path):
    values = {"factory-id": "f1", "data-path": '/a "quoted" path\\x.parquet', "epsilon-budget": 3.0,
              "rounds": 2, "strict": False}
    nc = write_toml(tmp_path / "sub" / "nc.toml", values)
    assert parse_config_args([str(nc)]) == values
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["nc.toml"]  # no temporary left


def test_inline_config_is_what_flower_parses():
    values = {"num-supernodes": 8, "client-resources-num-cpus": 0.5, "overrides": "a=1 b=2",
              "flag": True}
    text = config_args(values)
    assert text == 'num-supernodes=8 client-resources-num-cpus=0.5 overrides="a=1 b=2" flag=true'
    assert parse_config_args([text]) == values
    with pytest.raises(ValueError, match='a double quote cannot be passed inline'):
        config_args({"path": 'say "hi"'})
