"""Provisioning a deployed federation: a CA, the SuperLink's TLS certificate, factory key pairs.

One job (the federation's identities: certificates, keys and their registration with the
SuperLink); most of its length is the certificate fields and the refusals that keep an existing
CA and issued bundles valid.

``factoryfed provision --out bundles --num-factories 3 --superlink-address link.example:9093``
writes everything an operator and the factories need to run Flower with TLS and SuperNode
authentication (Flower 1.42: the SuperLink serves its APIs over HTTPS and accepts only
SuperNodes whose ECDSA public key was registered with ``flwr supernode register``)::

    <out>/
      ca/                         the certificate authority: keep it off the servers
        ca.crt                    self-signed CA certificate (ECDSA P-384)
        ca.key                    its private key (0600); needed only to issue new certificates
      operator/                   what the SuperLink host gets
        ca.crt                    the CA certificate (SuperLink --ssl-ca-certfile)
        server.crt                SuperLink certificate signed by the CA; SAN = the host names
                                  and IP addresses factories dial (default localhost, 127.0.0.1,
                                  plus the host of --superlink-address)
        server.key                its private key (0600)
        factories.json            the factories: id, public-key file, SHA-256 fingerprint
        factory-keys/<id>.pub     each factory's public key (OpenSSH), for registration
      factories/<id>/             one bundle per factory, handed to that factory only
        ca.crt                    to verify the SuperLink (SuperNode --root-certificates)
        supernode.key             the factory's private key, ECDSA P-384, OpenSSH format (0600)
                                  (SuperNode --auth-supernode-private-key)
        supernode.pub             its public key, OpenSSH format (``ecdsa-sha2-nistp384 ...``)
        bundle.toml               factory id, SuperLink address and the file names above
        node-config.toml          the SuperNode's node config; ``data-path`` and
                                  ``ledger-path`` are placeholders (the container paths of
                                  docker/compose.yaml) the factory sets to its own files

Private keys are created with ``os.open(..., 0o600)`` (through a temporary file renamed into
place) and are never printed. Running provisioning again on the same folder keeps the CA and
every existing key, re-issues the server certificate (new SANs take effect) and adds bundles
for new factories, so bundles already handed out stay valid.

Registering the factories with a running SuperLink (:func:`register_factories`) runs
``flwr supernode register <factory-keys/id.pub> <connection> --name <id>`` per factory, the
Flower 1.42 CLI route; ``<connection>`` is a ``[superlink.<name>]`` entry of
``$FLWR_HOME/config.toml`` (see :func:`fl_server.launch.flower_config.write_connection`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DIR, OPERATOR_DIR, FACTORIES_DIR = "ca", "operator", "factories"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
FACTORY_KEY, FACTORY_PUB = "supernode.key", "supernode.pub"
NODE_CONFIG, BUNDLE_FILE = "node-config.toml", "bundle.toml"
FACTORIES_JSON, FACTORY_KEYS_DIR = "factories.json", "factory-keys"

#: Default SuperLink address written into bundles (host:port the factories dial).
DEFAULT_SUPERLINK = "127.0.0.1:9093"
#: Placeholders of a bundle's node config: where docker/compose.yaml mounts data and ledgers.
DATA_PLACEHOLDER = "/srv/factoryfed/data/{factory_id}.parquet"
LEDGER_PLACEHOLDER = "/srv/factoryfed/ledger/{factory_id}-privacy.json"

_FACTORY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CURVE = ec.SECP384R1


class ProvisionError(ValueError):
    """Bad provisioning input (a factory id, an address, an existing key of the wrong kind)."""


@dataclass(frozen=True)
class FactoryBundle:
    """One factory's bundle folder and the public facts about it."""

    factory_id: str
    path: Path
    public_key: str  # the OpenSSH public key line
    fingerprint: str  # "SHA256:<base64>" as ssh-keygen -l prints it

    @property
    def private_key_path(self) -> Path:
        return self.path / FACTORY_KEY

    @property
    def public_key_path(self) -> Path:
        return self.path / FACTORY_PUB

    @property
    def ca_cert_path(self) -> Path:
        return self.path / CA_CERT

    @property
    def node_config_path(self) -> Path:
        return self.path / NODE_CONFIG


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` wrote."""

    out: Path
    superlink_address: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    factories: dict[str, FactoryBundle] = field(default_factory=dict)

    @property
    def ca_dir(self) -> Path:
        return self.out / CA_DIR

    @property
    def operator_dir(self) -> Path:
        return self.out / OPERATOR_DIR


# ----------------------------------------------------------------------------- file helpers


def write_private(path: Path, data: bytes) -> None:
    """Write secret ``data`` to ``path`` with mode 0600 from the moment the file exists.

    The file is created with ``os.open(..., O_CREAT | O_EXCL, 0o600)`` under a temporary name
    and renamed over ``path``, so no reader ever sees a partial or wider-permission key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes | str) -> None:
    """Write a public file (certificate, public key, config) atomically, mode 0644."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mkdir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c >= " " or c == "\t" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


# ----------------------------------------------------------------------------- keys and certs


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE())


def _load_or_create_key(path: Path, openssh: bool) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The P-384 key at ``path``, or a new one written there (mode 0600). Returns (key, new)."""
    if path.exists():
        raw = path.read_bytes()
        key = (
            serialization.load_ssh_private_key(raw, password=None)
            if openssh
            else serialization.load_pem_private_key(raw, password=None)
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != _CURVE.name:
            raise ProvisionError(f"{path}: existing key is not an ECDSA {_CURVE.name} key")
        return key, False
    key = _new_key()
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    write_private(
        path,
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()),
    )
    return key, True


def openssh_public_key(key: ec.EllipticCurvePublicKey, comment: str = "") -> str:
    """The OpenSSH public-key line (``ecdsa-sha2-nistp384 AAAA... comment``)."""
    line = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return f"{line} {comment}".rstrip()


def ssh_fingerprint(public_line: str) -> str:
    """``SHA256:...`` fingerprint of an OpenSSH public-key line, as ``ssh-keygen -l`` shows."""
    blob = base64.b64decode(public_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "factoryfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension that allows exactly the ``allowed`` uses (KeyUsage's field names)."""
    uses = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    unknown = set(allowed) - set(uses)
    if unknown:
        raise ValueError(f"unknown key usage {sorted(unknown)}; known: {', '.join(uses)}")
    return x509.KeyUsage(**{use: use in allowed for use in uses})


def make_ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (may sign leaf certificates only)."""
    name = _name("factoryfed federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("digital_signature", "key_cert_sign", "crl_sign"), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )


def make_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int,
) -> x509.Certificate:
    """The SuperLink's TLS server certificate, signed by the CA, with the given SANs."""
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if not sans:
        raise ProvisionError("the server certificate needs at least one host name or IP address")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature", "key_agreement"), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------------------- inputs


def check_factory_id(factory_id: str) -> str:
    """``factory_id`` if it is a safe folder and node-config name (letters, digits, ``_.-``)."""
    if not _FACTORY_ID.match(factory_id) or factory_id in {".", ".."}:
        raise ProvisionError(
            f"factory id {factory_id!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return factory_id


def split_host_port(address: str) -> tuple[str, int]:
    """``("host", port)`` of ``host:port`` or ``[v6]:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProvisionError(f"address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def subject_alt_names(
    superlink_address: str, dns_names: Iterable[str], ip_addresses: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """DNS names and IP addresses for the server certificate, the address's host included."""
    dns = list(dict.fromkeys(n.strip() for n in dns_names if n.strip()))
    ips = []
    for a in ip_addresses:
        a = a.strip()
        if not a:
            continue
        if not _is_ip(a):
            raise ProvisionError(f"{a!r} is not an IP address (give host names as DNS names)")
        ips.append(str(ipaddress.ip_address(a)))
    host, _ = split_host_port(superlink_address)
    if _is_ip(host):
        ips.append(str(ipaddress.ip_address(host)))
    else:
        dns.append(host)
    return tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips))


# ----------------------------------------------------------------------------- bundles


def node_config_text(factory_id: str, data_path: str, ledger_path: str) -> str:
    """A factory's node-config TOML (what ``flower-supernode --node-config FILE.toml`` reads)."""
    return (
        f"# Node config of {factory_id}'s SuperNode: flower-supernode --node-config <this file>\n"
        "# (factoryfed deploy supernode writes a copy with --data-path/--ledger-path filled in).\n"
        "# data-path: this factory's Parquet file; ledger-path: its privacy ledger (JSON), kept\n"
        "# across runs. Both stay on the factory's machine. The defaults below are the paths of\n"
        "# docker/compose.yaml; change them to your own files.\n"
        f"factory-id = {toml_string(factory_id)}\n"
        f"data-path = {toml_string(data_path)}\n"
        f"ledger-path = {toml_string(ledger_path)}\n"
        "# This factory's privacy policy (the server can ask for more privacy, never less);\n"
        "# unset keys take the defaults shown:\n"
        "# epsilon-budget = 8.0\n"
        "# delta = 1e-5\n"
        '# accountant = "rdp"\n'
        "# Optional limits: min-noise-multiplier, max-round-epsilon, min-grad-norm,\n"
        '# max-grad-norm, and privacy-unit (a unit coarser than the task\'s, e.g. "machine").\n'
    )


def bundle_text(factory_id: str, superlink_address: str, fingerprint: str) -> str:
    return (
        f"# factoryfed bundle of {factory_id}: start its SuperNode with\n"
        f"#   factoryfed deploy supernode --bundle <this folder> --data-path FILE "
        "--ledger-path FILE\n"
        "# The private key never leaves this folder; give the operator only the public key.\n"
        f"factory-id = {toml_string(factory_id)}\n"
        f"superlink = {toml_string(superlink_address)}\n"
        f"root-certificates = {toml_string(CA_CERT)}\n"
        f"private-key = {toml_string(FACTORY_KEY)}\n"
        f"public-key = {toml_string(FACTORY_PUB)}\n"
        f"public-key-fingerprint = {toml_string(fingerprint)}\n"
    )


def read_bundle(bundle_dir: str | Path) -> dict[str, str]:
    """A factory bundle's ``bundle.toml`` with its file entries made absolute paths."""
    import tomllib

    folder = Path(bundle_dir)
    path = folder / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a factory bundle (no {BUNDLE_FILE})")
    data = {k: str(v) for k, v in tomllib.loads(path.read_text()).items()}
    for key in ("root-certificates", "private-key", "public-key"):
        if key in data:
            data[key] = str((folder / data[key]).resolve())
    data["node-config"] = str((folder / NODE_CONFIG).resolve())
    return data


def read_factories(operator_dir: str | Path) -> list[dict[str, str]]:
    """The operator's list of factories (``factories.json``), public-key paths made absolute."""
    folder = Path(operator_dir)
    entries = json.loads((folder / FACTORIES_JSON).read_text())["factories"]
    for entry in entries:
        entry["public-key"] = str((folder / entry["public-key"]).resolve())
    return entries


def provision(
    out: str | Path,
    factory_ids: Sequence[str],
    superlink_address: str = DEFAULT_SUPERLINK,
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1",),
    ca_days: int = 3650,
    cert_days: int = 825,
    data_placeholder: str = DATA_PLACEHOLDER,
    ledger_placeholder: str = LEDGER_PLACEHOLDER,
    rotate_ca: bool = False,
) -> Provisioned:
    """Create (or extend) the CA, the SuperLink certificate and the factories' bundles.

    Parameters
    ----------
    out : path
        Root folder (``bundles/`` by convention; git-ignored).
    factory_ids : sequence of str
        The factories; each gets ``factories/<id>/`` and one P-384 key pair (kept if present).
    superlink_address : str
        ``host:port`` the factories dial; its host is added to the certificate's SANs.
    dns_names, ip_addresses : iterables of str
        Further SANs of the server certificate (default ``localhost`` and ``127.0.0.1``).
    ca_days, cert_days : int
        Validity of a new CA and of the server certificate.
    data_placeholder, ledger_placeholder : str
        Node-config placeholders (``{factory_id}`` is filled in).
    rotate_ca : bool
        Replace a CA whose ``ca.key`` is missing with a new one. Every bundle issued under the
        old CA stops verifying the SuperLink, so this is refused unless asked for explicitly.
    """
    ids = [check_factory_id(str(f)) for f in factory_ids]
    if not ids:
        raise ProvisionError("no factories to provision")
    if len(set(ids)) != len(ids):
        raise ProvisionError(f"duplicate factory ids in {ids}")
    dns, ips = subject_alt_names(superlink_address, dns_names, ip_addresses)
    root = _mkdir(Path(out))
    ca_dir = _mkdir(root / CA_DIR, 0o700)
    op_dir = _mkdir(root / OPERATOR_DIR, 0o700)
    keys_dir = _mkdir(op_dir / FACTORY_KEYS_DIR)

    ca_cert_path = ca_dir / CA_CERT
    if ca_cert_path.exists() and not (ca_dir / CA_KEY).exists():
        if not rotate_ca:
            raise ProvisionError(
                f"{ca_cert_path} exists but its key {ca_dir / CA_KEY} is missing: put the key "
                "back to extend this CA, or pass --rotate-ca to replace it with a new CA (every "
                "factory bundle issued so far must then be handed out again)"
            )
        ca_cert_path.unlink()
    ca_key, new_ca = _load_or_create_key(ca_dir / CA_KEY, openssh=False)
    if new_ca or not ca_cert_path.exists():
        ca_cert = make_ca_certificate(ca_key, ca_days)
        write_public(ca_cert_path, _pem(ca_cert))
    else:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        if ca_cert.public_key() != ca_key.public_key():
            raise ProvisionError(f"{ca_cert_path} does not belong to {ca_dir / CA_KEY}")
    ca_pem = _pem(ca_cert)

    server_key, _ = _load_or_create_key(op_dir / SERVER_KEY, openssh=False)
    server_cert = make_server_certificate(server_key, ca_key, ca_cert, dns, ips, cert_days)
    write_public(op_dir / SERVER_CERT, _pem(server_cert))
    write_public(op_dir / CA_CERT, ca_pem)

    result = Provisioned(root, superlink_address, dns, ips)
    fac_root = _mkdir(root / FACTORIES_DIR)
    for fid in ids:
        folder = _mkdir(fac_root / fid, 0o700)
        key, _ = _load_or_create_key(folder / FACTORY_KEY, openssh=True)
        public = openssh_public_key(key.public_key(), comment=f"factoryfed-{fid}")
        fingerprint = ssh_fingerprint(public)
        write_public(folder / FACTORY_PUB, public + "\n")
        write_public(folder / CA_CERT, ca_pem)
        write_public(folder / BUNDLE_FILE, bundle_text(fid, superlink_address, fingerprint))
        write_public(
            folder / NODE_CONFIG,
            node_config_text(
                fid,
                data_placeholder.format(factory_id=fid),
                ledger_placeholder.format(factory_id=fid),
            ),
        )
        write_public(keys_dir / f"{fid}.pub", public + "\n")
        result.factories[fid] = FactoryBundle(fid, folder, public, fingerprint)

    # The operator's list covers every bundle in the folder, earlier provisioning included.
    listed: dict[str, dict[str, str]] = {}
    for pub in sorted(keys_dir.glob("*.pub")):
        line = pub.read_text().strip()
        listed[pub.stem] = {
            "factory-id": pub.stem,
            "public-key": f"{FACTORY_KEYS_DIR}/{pub.name}",
            "fingerprint": ssh_fingerprint(line),
        }
    write_public(
        op_dir / FACTORIES_JSON,
        json.dumps({"superlink": superlink_address, "factories": list(listed.values())}, indent=2)
        + "\n",
    )
    return result


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    """Outcome of registering one factory's key with the SuperLink."""

    factory_id: str
    ok: bool
    node_id: int | None
    message: str


def register_factories(
    operator_dir: str | Path,
    connection: str,
    env: Mapping[str, str],
    factory_ids: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> list[Registration]:
    """``flwr supernode register <key> <connection> --name <id>`` for each listed factory.

    ``env`` must hold the ``FLWR_HOME`` whose ``config.toml`` defines ``connection`` (see
    :func:`fl_server.launch.flower_config.write_connection`) and a PATH with Flower's CLI. A
    key the SuperLink already knows counts as registered (``ok``, message ``already
    registered``), so running it again is harmless; any other failure is reported with
    Flower's message, never raised.
    """
    entries = read_factories(operator_dir)
    if factory_ids is not None:
        wanted = set(factory_ids)
        unknown = wanted - {e["factory-id"] for e in entries}
        if unknown:
            raise ProvisionError(f"not provisioned: {sorted(unknown)}")
        entries = [e for e in entries if e["factory-id"] in wanted]
    out = []
    for entry in entries:
        fid = entry["factory-id"]
        cmd = [
            "flwr",
            "supernode",
            "register",
            entry["public-key"],
            connection,
            "--name",
            fid,
            "--format",
            "json",
        ]
        proc = subprocess.run(
            cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
        node_id, message = None, (proc.stdout + proc.stderr).strip()
        start = proc.stdout.find("{")
        if start >= 0:
            try:
                data = json.loads(proc.stdout[start:])
            except json.JSONDecodeError:
                data = {}
            if data.get("node-id") is not None:
                node_id = int(data["node-id"])
            message = str(data.get("error-message", message))
        already = "already in use" in message
        ok = (proc.returncode == 0 and node_id is not None) or already
        out.append(Registration(fid, ok, node_id, "already registered" if already else message))
    return out
