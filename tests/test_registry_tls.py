"""The registry and discovery against an etcd with TLS (client certs) and user/password."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.discovery import Endpoint, EtcdAccess, discover
from supervisor.events import EventBus
from tests.etcd_fixture import EtcdServer, etcd_binary
from tests.registry_helpers import Settings, events_of, reader, running, service, worker
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

USER = "svcd"
PASSWORD = "s3cret"
ROOT_PASSWORD = "rootpw"
CERT_DAYS = 2


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    if not ca:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svcd test CA")])
    ca = _issue("svcd test CA", ca_key, ca_name, ca_key, ca=True)
    pki = Pki(
        d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem", d / "client-key.pem"
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cert_path, key_path, name, server in (
        (pki.server_cert, pki.server_key, "etcd", True),
        (pki.client_cert, pki.client_key, "svcd-client", False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, ca_name, ca_key, server=server)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return pki


def etcdctl(server: EtcdServer, pki: Pki, *args: str, user: str | None = None) -> None:
    argv = [
        str(Path(etcd_binary()).with_name("etcdctl")),
        f"--endpoints={server.endpoint}",
        f"--cacert={pki.ca}",
        f"--cert={pki.client_cert}",
        f"--key={pki.client_key}",
        "--command-timeout=5s",
        *([f"--user={user}"] if user else []),
        *args,
    ]
    subprocess.run(argv, check=True, timeout=30, capture_output=True)


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, Pki]]:
    pki = make_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    server = EtcdServer(
        tmp_path / "etcd-data",
        scheme="https",
        ssl_context=ctx,
        extra_args=[
            f"--cert-file={pki.server_cert}",
            f"--key-file={pki.server_key}",
            f"--trusted-ca-file={pki.ca}",
            "--client-cert-auth",
        ],
    )
    try:
        server.start()
        etcdctl(server, pki, "user", "add", f"root:{ROOT_PASSWORD}")
        etcdctl(server, pki, "role", "add", "root")
        etcdctl(server, pki, "user", "grant-role", "root", "root")
        etcdctl(server, pki, "role", "add", "svcd")
        etcdctl(
            server, pki, "role", "grant-permission", "svcd", "--prefix=true", "readwrite", "/svcd/"
        )
        etcdctl(server, pki, "user", "add", f"{USER}:{PASSWORD}")
        etcdctl(server, pki, "user", "grant-role", USER, "svcd")
        etcdctl(server, pki, "auth", "enable")
        yield server, pki
    finally:
        server.stop()


def _settings(server: EtcdServer, pki: Pki, password: str = PASSWORD) -> Settings:
    return Settings(
        (server.endpoint,),
        username=USER,
        password=password,
        ca_cert=pki.ca,
        cert=pki.client_cert,
        key=pki.client_key,
    )


async def test_tls_and_password(secure_etcd: tuple[EtcdServer, Pki]) -> None:
    server, pki = secure_etcd
    settings = _settings(server, pki)
    async with running(settings) as reg:
        reg.publish([service("api", [worker("api", 0)], advertise="10.0.0.1:80")])
        assert await reg.wait_synced(15)
        assert reg.state == "connected"
        creds = {
            "username": USER,
            "password": PASSWORD,
            "ca_cert": pki.ca,
            "cert": pki.client_cert,
            "key": pki.client_key,
        }
        async with reader(server.endpoint, **creds) as r:
            assert sorted(await r.keys("/svcd/")) == [
                "/svcd/agents/web-1",
                "/svcd/services/api/web-1/0-1",
            ]
        access = EtcdAccess((server.endpoint,), **creds)  # type: ignore[arg-type]
        assert await discover(access, "api") == [Endpoint("10.0.0.1:80", "web-1", 1, "passing")]


async def test_wrong_password_stays_disconnected(secure_etcd: tuple[EtcdServer, Pki]) -> None:
    server, pki = secure_etcd
    bus = EventBus()
    async with running(_settings(server, pki, password="wrong"), bus=bus) as reg:
        reg.publish([service("api", [worker("api", 0)])])
        events = await wait_for(
            lambda: events_of(bus, "registry_disconnected"), timeout=15, what="disconnected"
        )
        assert "authenticat" in events[0].message.lower()
        assert reg.state == "disconnected"


async def test_tls_without_ca_is_refused(secure_etcd: tuple[EtcdServer, Pki]) -> None:
    server, _ = secure_etcd
    bus = EventBus()
    settings = Settings((server.endpoint,), username=USER, password=PASSWORD)
    async with running(settings, bus=bus) as reg:
        await wait_for(
            lambda: events_of(bus, "registry_disconnected"), timeout=15, what="disconnected"
        )
        assert reg.state == "disconnected"
