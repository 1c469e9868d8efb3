# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD over TLS: X.509 (with client certificates) and PSK credentials."""
import os

import pytest

from conftest import MiB, make_raw, requires, run

nbd = pytest.importorskip("nbd")
if not nbd.NBD().supports_tls():
    pytest.skip("libnbd without TLS", allow_module_level=True)


def openssl(*args, cwd):
    import subprocess
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate and a client certificate, in QEMU's / libnbd's file names."""
    d = tmp_path_factory.mktemp("pki")
    srv, cli = d / "server", d / "client"
    srv.mkdir()
    cli.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
            "-days", "2", "-subj", "/CN=vdisk test CA", cwd=d)
    for who, cn in (("server", "localhost"), ("client", "vdisk-client")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
                "-subj", f"/CN={cn}", cwd=d)
        ext = d / f"{who}.ext"
        ext.write_text(("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n" if who == "server"
                        else "extendedKeyUsage=clientAuth\n"))
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", str(ext), cwd=d)
    for target in (srv, cli):
        (target / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    (srv / "server-cert.pem").write_bytes((d / "server-cert.pem").read_bytes())
    (srv / "server-key.pem").write_bytes((d / "server-key.pem").read_bytes())
    (cli / "client-cert.pem").write_bytes((d / "client-cert.pem").read_bytes())
    (cli / "client-key.pem").write_bytes((d / "client-key.pem").read_bytes())
    return srv, cli


def tls_daemon(daemon_factory, tmp_path, obj):
    img = make_raw(tmp_path / "d.raw", 8 * MiB)
    sock = tmp_path / "tls.sock"
    d = daemon_factory(["--object", obj,
                        "--blockdev", f"driver=file,node-name=r0,filename={img}",
                        "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=t0",
                        "--export", "type=nbd,id=e,node-name=r0,writable=on"], nbd=False)
    return d, sock


@requires("openssl")
def test_x509(daemon_factory, tmp_path, pki):
    srv, cli = pki
    d, sock = tls_daemon(daemon_factory, tmp_path, f"tls-creds-x509,id=t0,dir={srv},endpoint=server")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(cli))
    h.set_tls_verify_peer(False)  # a unix socket has no host name to check
    h.set_export_name("r0")
    h.add_meta_context("base:allocation")
    h.connect_unix(str(sock))
    assert h.get_tls_negotiated()
    data = os.urandom(3 * MiB)
    h.pwrite(data, MiB)
    assert h.pread(len(data), MiB) == data
    h.shutdown()


@requires("openssl")
def test_x509_refuses_plain_and_untrusted(daemon_factory, tmp_path, pki):
    srv, cli = pki
    d, sock = tls_daemon(daemon_factory, tmp_path, f"tls-creds-x509,id=t0,dir={srv},endpoint=server")
    plain = nbd.NBD()
    plain.set_tls(nbd.TLS_DISABLE)
    plain.set_export_name("r0")
    with pytest.raises(nbd.Error):
        plain.connect_unix(str(sock))
    # No client certificate: verify-peer (the default) refuses the handshake.
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((cli / "ca-cert.pem").read_bytes())
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(nocert))
    h.set_tls_verify_peer(False)
    h.set_export_name("r0")
    with pytest.raises(nbd.Error):
        h.connect_unix(str(sock))
    # The daemon still serves good clients.
    ok = nbd.NBD()
    ok.set_tls(nbd.TLS_REQUIRE)
    ok.set_tls_certificates(str(cli))
    ok.set_tls_verify_peer(False)
    ok.set_export_name("r0")
    ok.connect_unix(str(sock))
    assert ok.pread(512, 0) is not None
    ok.shutdown()


def test_psk(daemon_factory, tmp_path):
    keydir = tmp_path / "psk"
    keydir.mkdir()
    key = os.urandom(32).hex()
    (keydir / "keys.psk").write_text(f"alice:{key}\n")
    d, sock = tls_daemon(daemon_factory, tmp_path, f"tls-creds-psk,id=t0,dir={keydir},endpoint=server")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_username("alice")
    h.set_tls_psk_file(str(keydir / "keys.psk"))
    h.set_export_name("r0")
    h.connect_unix(str(sock))
    assert h.get_tls_negotiated()
    h.pwrite(b"p" * 65536, 0)
    assert h.pread(65536, 0) == b"p" * 65536
    h.shutdown()
    # A wrong key fails the handshake.
    bad = tmp_path / "bad.psk"
    bad.write_text(f"alice:{os.urandom(32).hex()}\n")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_username("alice")
    h.set_tls_psk_file(str(bad))
    h.set_export_name("r0")
    with pytest.raises(nbd.Error):
        h.connect_unix(str(sock))


def test_tls_object_errors(daemon_factory, tmp_path):
    d = daemon_factory([], nbd=False)
    from conftest import QMPError
    with pytest.raises(QMPError, match="keys.psk"):
        d.qmp("object-add", qom_type="tls-creds-psk", id="p", dir=str(tmp_path), endpoint="server")
    with pytest.raises(QMPError, match="server-cert.pem|ca-cert.pem"):
        d.qmp("object-add", qom_type="tls-creds-x509", id="x", dir=str(tmp_path), endpoint="server")
