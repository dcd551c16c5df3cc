"""The ``factoryfed`` command line (``fl_server.cli``): commands, options, output and exit codes.

The deployment commands that start processes are run end to end by ``test_deployment.py``;
here they are checked up to the point where they would start one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from fl_server import cli
from fl_server.cli.data import make
from fl_server.launch.flower_config import write_toml
from standard_models import PartitionConfig
from standard_models.datafiles import data_matches

# ------------------------------------------------------------------------------ data


def test_data_make(tmp_path, capsys) -> None:
    out = tmp_path / "tep"
    argv = ["data", "make", "--task", "tep_fault", "--num-factories", "6", "--seed", "3",
            "--out", str(out), "--feature-shift", "0.2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert (out / entry["name"]).is_file()
        assert entry["name"] in printed and str(entry["rows"]) in printed
    assert "written" in printed
    partition = PartitionConfig(feature_shift=0.2)
    assert data_matches(out, "tep_fault", 6, 3, partition)
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main([*argv, "--force"]) == 0
    assert "written" in capsys.readouterr().out


def test_data_make_errors_and_defaults(tmp_path, capsys) -> None:
    argv = ["data", "make", "--task", "nope", "--num-factories", "2", "--seed", "0",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "valid names" in capsys.readouterr().err
    defaults = {p.name: p.default for p in make.params}
    default = PartitionConfig()
    assert (
        defaults["scheme"], defaults["alpha"], defaults["quantity_skew"], defaults["feature_shift"]
    ) == (default.scheme, default.alpha, default.quantity_skew, default.feature_shift)
    assert cli.main(["data", "make", "--task", "rul"]) == 2  # required options missing
    assert "Missing option" in capsys.readouterr().err
    assert cli.main([*argv[:-2], "--out", str(tmp_path), "--scheme", "nope"]) == 2


def test_a_group_without_its_action_shows_its_help(capsys) -> None:
    assert cli.main(["data"]) == 2
    assert "make" in capsys.readouterr().err
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in ("data", "ledger", "statement", "provision", "deploy"):
        assert command in err
    assert cli.main(["deploy", "--help"]) == 0
    out = capsys.readouterr().out
    for action in ("superlink", "register", "mlflow", "supernode"):
        assert action in out
    assert cli.main(["nope"]) == 2


def test_the_console_script_gives_the_exit_code(tmp_path) -> None:
    script = Path(sys.executable).parent / "factoryfed"
    for argv, code in ((["--help"], 0), (["data"], 2), (["ledger", "verify", "/nonexistent"], 2)):
        proc = subprocess.run(
            [str(script), *argv], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == code, (argv, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------ reward ledger


def test_ledger_verify_and_statement_refuse_a_file_that_is_no_ledger(tmp_path, capsys) -> None:
    bogus = tmp_path / "not-a-ledger.sqlite"
    bogus.write_text("hello")
    assert cli.main(["ledger", "verify", str(bogus)]) == 2
    assert capsys.readouterr().err.startswith("factoryfed ledger verify: ")
    argv = ["statement", "--factory", "f1", "--ledger", str(bogus), "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("factoryfed statement: ")
    assert cli.main(["statement", "--factory", "f1"]) == 2  # --ledger and --out missing


# ------------------------------------------------------------------------------ provisioning


def test_provision_never_prints_a_private_key(tmp_path, capsys):
    out = tmp_path / "bundles"
    code = cli.main(["provision", "--out", str(out), "--num-factories", "2", "--dns", "superlink"])
    assert code == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "PRIVATE KEY" not in text
    for key in out.rglob("*.key"):
        body = [
            line for line in key.read_text().splitlines() if line and not line.startswith("-----")
        ]
        assert body and not any(line in text for line in body), key
    assert "factory_001" in text and "SHA256:" in text
    assert (out / "factories" / "factory_001" / "supernode.key").is_file()
    cert = x509.load_pem_x509_certificate((out / "operator" / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}


def test_provision_needs_factories(tmp_path, capsys):
    assert cli.main(["provision", "--out", str(tmp_path / "b")]) == 2
    assert "--num-factories" in capsys.readouterr().err


def test_provision_takes_repeated_factory_ids(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["provision", "--out", str(out), "--factory", "plant_a", "--factory", "plant_b"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in (out / "factories").iterdir()) == ["plant_a", "plant_b"]


# ------------------------------------------------------------------------------ deployment


def test_provision_rotates_a_keyless_ca_only_when_told(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["provision", "--out", str(out), "--num-factories", "1"]) == 0
    ca_crt = next(out.rglob("ca.key")).with_name("ca.crt")
    old = ca_crt.read_bytes()
    ca_crt.with_name("ca.key").unlink()
    capsys.readouterr()
    assert cli.main(["provision", "--out", str(out), "--num-factories", "1"]) == 1
    assert "--rotate-ca" in capsys.readouterr().err
    assert ca_crt.read_bytes() == old
    argv = ["provision", "--out", str(out), "--num-factories", "1", "--rotate-ca"]
    assert cli.main(argv) == 0
    assert ca_crt.read_bytes() != old


def test_deploy_register_needs_a_connection(tmp_path, capsys):
    argv = ["deploy", "register", "--home", str(tmp_path / "operator")]
    assert cli.main(argv) == 2
    assert "give --superlink HOST:PORT" in capsys.readouterr().err


def test_deploy_superlink_refuses_a_missing_operator_folder(tmp_path, capsys):
    home = tmp_path / "operator"
    argv = ["deploy", "superlink", "--operator-dir", str(tmp_path / "none"), "--home", str(home)]
    assert cli.main(argv) == 1
    assert "run 'factoryfed provision' first" in capsys.readouterr().err
    assert not (home / "ready").exists()


def test_deploy_supernode_refuses_a_missing_data_file(tmp_path, capsys):
    assert cli.main(["provision", "--out", str(tmp_path / "b"), "--num-factories", "1"]) == 0
    argv = ["deploy", "supernode", "--bundle", str(tmp_path / "b" / "factories" / "factory_000"),
            "--home", str(tmp_path / "node"), "--data-path", str(tmp_path / "missing.parquet")]
    capsys.readouterr()
    assert cli.main(argv) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--port", "--max-retries"])
def test_deploy_options_are_typed(tmp_path, option, capsys):
    argv = ["deploy", "supernode", "--bundle", "b", "--home", str(tmp_path), option, "many"]
    assert cli.main(argv) == 2
    assert "is not a valid integer" in capsys.readouterr().err


def test_deploy_supernode_refuses_a_bad_record_sketch_key_file(tmp_path, capsys):
    assert cli.main(["provision", "--out", str(tmp_path / "b"), "--num-factories", "1"]) == 0
    short = tmp_path / "sketch.key"
    short.write_text("too-short\n")
    argv = ["deploy", "supernode", "--bundle", str(tmp_path / "b" / "factories" / "factory_000"),
            "--home", str(tmp_path / "node"), "--record-sketch-key-file"]  # fmt: skip
    capsys.readouterr()
    assert cli.main([*argv, str(short)]) == 1
    assert f"--record-sketch-key-file {short}: the key must be 16 to 64 bytes, got 9" in (
        capsys.readouterr().err
    )
    assert cli.main([*argv, str(tmp_path / "absent.key")]) == 1
    assert "--record-sketch-key-file" in capsys.readouterr().err


def test_a_private_toml_file_is_the_owner_s_alone_from_the_start(tmp_path):
    path = write_toml(tmp_path / "node-config.toml", {"record-sketch-key": "x" * 16}, private=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert tomllib.loads(path.read_text()) == {"record-sketch-key": "x" * 16}
