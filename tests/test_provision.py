"""Provisioning for a deployed federation: files, modes, certificates, keys, bundles, CLI output.

Plain file and crypto checks (no network, no Flower runtime); Flower's own key and config
loaders are used where they decide whether a file is acceptable.
"""

import ipaddress
import json
import os
import stat
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.common.config import parse_config_args

from fl_server.provision import (
    ProvisionError,
    provision,
    read_bundle,
    read_factories,
    register_factories,
    ssh_fingerprint,
)

pytestmark = pytest.mark.timeout(60)

IDS = ["factory_000", "factory_001", "factory_002"]
BUNDLE_FILES = {"ca.crt", "supernode.key", "supernode.pub", "bundle.toml", "node-config.toml"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


@pytest.fixture
def bundles(tmp_path):
    return provision(tmp_path / "bundles", IDS)


def test_layout(bundles):
    out = bundles.out
    assert {p.name for p in (out / "ca").iterdir()} == {"ca.crt", "ca.key"}
    assert {p.name for p in (out / "operator").iterdir()} == {
        "ca.crt",
        "server.crt",
        "server.key",
        "factories.json",
        "factory-keys",
    }
    assert {p.name for p in (out / "operator" / "factory-keys").iterdir()} == {
        f"{f}.pub" for f in IDS
    }
    assert {p.name for p in (out / "factories").iterdir()} == set(IDS)
    for fid in IDS:
        assert {p.name for p in (out / "factories" / fid).iterdir()} == BUNDLE_FILES
    # No temporary files left behind by the atomic writes.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_private_keys_are_0600_whatever_the_umask(tmp_path, monkeypatch):
    """Keys are created 0600 (os.open with the mode), never widened and never chmod-ed."""

    def no_chmod(*args, **kwargs):
        raise AssertionError("provisioning must not chmod")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old = os.umask(0)
    try:
        result = provision(tmp_path / "b", IDS)
    finally:
        os.umask(old)
    keys = [result.ca_dir / "ca.key", result.operator_dir / "server.key"]
    keys += [b.private_key_path for b in result.factories.values()]
    for key in keys:
        assert _mode(key) == 0o600, key
    for public in [result.ca_dir / "ca.crt", result.operator_dir / "server.crt"] + [
        b.public_key_path for b in result.factories.values()
    ]:
        assert _mode(public) == 0o644, public
    # Folders that hold private keys are private too.
    assert _mode(result.ca_dir) == 0o700
    assert _mode(result.operator_dir) == 0o700
    for b in result.factories.values():
        assert _mode(b.path) == 0o700


def test_ca_and_server_certificate(bundles):
    ca = _cert(bundles.ca_dir / "ca.crt")
    server = _cert(bundles.operator_dir / "server.crt")
    assert (bundles.operator_dir / "ca.crt").read_bytes() == (
        bundles.ca_dir / "ca.crt"
    ).read_bytes()
    # CA: self-signed, a CA, P-384
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    # Server: signed by the CA, not a CA, for server authentication, default SANs
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert _sans(server) == ({"localhost"}, {"127.0.0.1"})
    assert server.public_key().curve.name == "secp384r1"
    # The server key on disk is the certificate's key.
    key = serialization.load_pem_private_key(
        (bundles.operator_dir / "server.key").read_bytes(), password=None
    )
    assert key.public_key() == server.public_key()
    ca_key = serialization.load_pem_private_key(
        (bundles.ca_dir / "ca.key").read_bytes(), password=None
    )
    assert ca_key.public_key() == ca.public_key()


def test_configurable_sans(tmp_path):
    result = provision(
        tmp_path / "b",
        ["f1"],
        superlink_address="link.example.com:9093",
        dns_names=["localhost", "superlink"],
        ip_addresses=["127.0.0.1", "10.1.2.3", "::1"],
    )
    dns, ips = _sans(_cert(result.operator_dir / "server.crt"))
    assert dns == {"localhost", "superlink", "link.example.com"}
    assert ips == {"127.0.0.1", "10.1.2.3", "::1"}
    # An IP address as the SuperLink address lands among the IP SANs.
    result = provision(tmp_path / "c", ["f1"], superlink_address="192.168.7.9:9093")
    dns, ips = _sans(_cert(result.operator_dir / "server.crt"))
    assert ipaddress.ip_address("192.168.7.9") in {ipaddress.ip_address(i) for i in ips}
    assert "192.168.7.9" not in dns


def test_factory_keys_are_p384_openssh_and_flower_accepts_them(bundles):
    from flwr.cli.supernode.register import try_load_public_key

    publics = set()
    for b in bundles.factories.values():
        raw = b.private_key_path.read_bytes()
        assert raw.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        # What flower-supernode --auth-supernode-private-key does with the file:
        key = serialization.load_ssh_private_key(raw, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp384r1"
        line = b.public_key_path.read_text().strip()
        assert line.startswith("ecdsa-sha2-nistp384 ")
        assert line == b.public_key
        pub = serialization.load_ssh_public_key(line.encode())
        assert pub == key.public_key()
        # What `flwr supernode register` does with the file:
        assert try_load_public_key(b.public_key_path)
        assert b.fingerprint == ssh_fingerprint(line)
        publics.add(line)
    assert len(publics) == len(IDS)  # one key pair per factory


def test_bundle_contents(bundles):
    ca_pem = (bundles.ca_dir / "ca.crt").read_bytes()
    for fid, b in bundles.factories.items():
        assert b.ca_cert_path.read_bytes() == ca_pem
        info = tomllib.loads((b.path / "bundle.toml").read_text())
        assert info["factory-id"] == fid
        assert info["superlink"] == "127.0.0.1:9093"
        assert info["public-key-fingerprint"] == b.fingerprint
        # The node config is what flower-supernode --node-config FILE.toml reads.
        nc = parse_config_args([str(b.node_config_path)])
        assert nc["factory-id"] == fid
        assert nc["data-path"].endswith(f"{fid}.parquet")
        assert nc["ledger-path"].endswith(".json")
        paths = read_bundle(b.path)
        for key in ("root-certificates", "private-key", "public-key", "node-config"):
            assert Path(paths[key]).is_absolute() and Path(paths[key]).is_file()
        # No other factory's key and no CA key in a bundle.
        for other in bundles.factories.values():
            if other.factory_id != fid:
                assert other.public_key not in (b.path / "supernode.pub").read_text()
        assert not (b.path / "ca.key").exists()


def test_operator_list_of_factory_keys(bundles):
    entries = read_factories(bundles.operator_dir)
    assert [e["factory-id"] for e in entries] == IDS
    for e in entries:
        b = bundles.factories[e["factory-id"]]
        assert Path(e["public-key"]).read_text() == b.public_key_path.read_text()
        assert e["fingerprint"] == b.fingerprint
    # The operator folder holds no factory private key.
    for path in bundles.operator_dir.rglob("*"):
        if path.is_file() and path.name != "server.key":
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_reprovisioning_keeps_keys_and_adds_factories(tmp_path):
    first = provision(tmp_path / "b", IDS[:2])
    keys = {f: b.private_key_path.read_bytes() for f, b in first.factories.items()}
    ca_key = (first.ca_dir / "ca.key").read_bytes()
    ca_crt = (first.ca_dir / "ca.crt").read_bytes()
    second = provision(tmp_path / "b", IDS, dns_names=["superlink"])
    assert (second.ca_dir / "ca.key").read_bytes() == ca_key
    assert (second.ca_dir / "ca.crt").read_bytes() == ca_crt
    for fid, raw in keys.items():
        assert second.factories[fid].private_key_path.read_bytes() == raw
    assert [e["factory-id"] for e in read_factories(second.operator_dir)] == IDS
    server = _cert(second.operator_dir / "server.crt")
    assert "superlink" in _sans(server)[0]
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_crt))


def test_a_ca_certificate_without_its_key_is_not_silently_replaced(tmp_path):
    first = provision(tmp_path / "b", IDS[:2])
    ca_crt = (first.ca_dir / "ca.crt").read_bytes()
    (first.ca_dir / "ca.key").rename(tmp_path / "ca.key.offline")
    with pytest.raises(ProvisionError, match=r"ca\.key is missing.*--rotate-ca"):
        provision(tmp_path / "b", IDS)
    # Nothing was replaced: the CA certificate and the issued bundles are as they were.
    assert (first.ca_dir / "ca.crt").read_bytes() == ca_crt
    assert not (first.ca_dir / "ca.key").exists()
    assert (first.factories[IDS[0]].ca_cert_path).read_bytes() == ca_crt


def test_rotating_the_ca_is_explicit_and_reissues_everything(tmp_path):
    first = provision(tmp_path / "b", IDS[:2])
    old_crt = (first.ca_dir / "ca.crt").read_bytes()
    (first.ca_dir / "ca.key").unlink()
    second = provision(tmp_path / "b", IDS[:2], rotate_ca=True)
    new_crt = (second.ca_dir / "ca.crt").read_bytes()
    assert new_crt != old_crt
    new_ca = x509.load_pem_x509_certificate(new_crt)
    _cert(second.operator_dir / "server.crt").verify_directly_issued_by(new_ca)
    for b in second.factories.values():
        assert b.ca_cert_path.read_bytes() == new_crt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"factory_ids": ["../evil"]},
        {"factory_ids": ["a b"]},
        {"factory_ids": []},
        {"factory_ids": ["f1", "f1"]},
        {"factory_ids": ["f1"], "ip_addresses": ["not-an-ip"]},
        {"factory_ids": ["f1"], "superlink_address": "no-port"},
    ],
)
def test_bad_input_is_refused(tmp_path, kwargs):
    with pytest.raises(ProvisionError):
        provision(tmp_path / "b", **kwargs)


def _fake_flwr(folder: Path, script: str) -> dict[str, str]:
    """A stand-in ``flwr`` on PATH that answers like ``flwr supernode register --format json``."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "flwr"
    exe.write_text(f"#!{sys.executable}\n{script}")
    exe.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{folder}{os.pathsep}{env['PATH']}"
    return env


def test_register_factories_runs_flwr_per_factory(bundles, tmp_path):
    calls = tmp_path / "calls.jsonl"
    env = _fake_flwr(
        tmp_path / "bin",
        f"""
import json, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
name = sys.argv[sys.argv.index("--name") + 1]
if name == "factory_001":
    msg = "[code: 23] Public key already in use."
    print(json.dumps({{"success": False, "error-message": msg}}, indent=2))
    sys.exit(1)
if name == "factory_002":
    print(json.dumps({{"success": False, "error-message": "connection refused"}}, indent=2))
    sys.exit(1)
print(json.dumps({{"success": True, "node-id": 1234}}, indent=2))
""",
    )
    regs = register_factories(bundles.operator_dir, "factoryfed", env)
    assert [(r.factory_id, r.ok, r.node_id) for r in regs] == [
        ("factory_000", True, 1234),
        ("factory_001", True, None),
        ("factory_002", False, None),
    ]
    assert regs[1].message == "already registered"
    assert "connection refused" in regs[2].message
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argv[0][:3] == [
        "supernode",
        "register",
        str(bundles.operator_dir.resolve() / "factory-keys" / "factory_000.pub"),
    ]
    assert argv[0][3] == "factoryfed"
    with pytest.raises(ProvisionError):
        register_factories(bundles.operator_dir, "factoryfed", env, ["factory_999"])
