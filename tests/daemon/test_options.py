# SPDX-License-Identifier: GPL-2.0-or-later
"""
Strict option checking: an unknown key in --export, --nbd-server (also inside
addr), --object or block-export-add / nbd-server-start is an error that names
the key, and the daemon does not start (command line) or keeps serving
(control socket).  Misspelling an option must never be silently ignored.
"""
import pytest

from conftest import SANITIZER_MARKERS, VDISKD, QMPError, run


def cli_fails(tmp_path, *args):
    p = run([VDISKD] + [str(a) for a in args], timeout=30, check=False)
    err = p.stderr.decode(errors="replace")
    for marker in SANITIZER_MARKERS:
        assert marker not in err, err
    assert p.returncode == 1, f"exit {p.returncode}: {err}"
    return err


NULL = ["--blockdev", "driver=null-co,node-name=n0,size=1M"]


@pytest.mark.parametrize("args, key", [
    (["--export", "type=nbd,id=e0,node-name=n0,nmae=x"], "nmae"),
    (["--export", "type=nbd,id=e0,node-name=n0,writeable=on"], "writeable"),
    (["--export", "type=nbd,id=e0,node-name=n0,max_inflight=4"], "max_inflight"),
    (["--export", "type=nbd,id=e0,node-name=n0,allocation-depth.x=1"], "allocation-depth"),
], ids=["export-name", "export-writeable", "export-underscore", "export-type"])
def test_export_unknown_key(tmp_path, args, key):
    sock = tmp_path / "nbd.sock"
    err = cli_fails(tmp_path, *NULL, "--nbd-server", f"addr.type=unix,addr.path={sock}", *args)
    assert key in err


@pytest.mark.parametrize("server, key", [
    ("addr.type=unix,addr.path=SOCK,max-conections=4", "max-conections"),
    ("addr.type=unix,addr.path=SOCK,addr.tight=on", "tight"),
    ("addr.type=unix,addr.pth=SOCK", "pth"),
    ("addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.ipv9=on", "ipv9"),
], ids=["top", "unix-addr", "unix-typo", "inet-addr"])
def test_nbd_server_unknown_key(tmp_path, server, key):
    sock = tmp_path / "nbd.sock"
    err = cli_fails(tmp_path, "--nbd-server", server.replace("SOCK", str(sock)))
    assert key in err and "invalid parameter" in err
    assert not sock.exists()


@pytest.mark.parametrize("obj, key", [
    ("iothread,id=io0,poll-max-nss=5", "poll-max-nss"),
    ("tls-creds-psk,id=t0,dir=/nonexistent,endpoint=server,usrname=x", "usrname"),
    ("tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server,verify_peer=on", "verify_peer"),
])
def test_object_unknown_key(tmp_path, obj, key):
    err = cli_fails(tmp_path, "--object", obj)
    assert key in err


def test_control_unknown_keys(daemon_factory, tmp_path):
    d = daemon_factory(NULL, nbd=False)
    c = d.ctl
    with pytest.raises(QMPError, match="'adr'"):
        c.cmd("nbd-server-start", adr={"type": "unix", "path": str(tmp_path / "x.sock")})
    with pytest.raises(QMPError, match="'abstract'"):
        c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "x.sock"), "abstract": True})
    c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "nbd.sock")})
    with pytest.raises(QMPError, match="'nmae'"):
        c.cmd("block-export-add", type="nbd", id="e0", node_name="n0", nmae="x")
    # Nothing was half-created: the same id works once spelled right.
    c.cmd("block-export-add", type="nbd", id="e0", node_name="n0", name="x")
    assert [e["id"] for e in c.cmd("query-block-exports")] == ["e0"]


@pytest.mark.parametrize("blockdev, key", [
    ("driver=null-co,node-name=n0,size=1M,read-zeros=on", "read-zeros"),
    ("driver=file,node-name=f0,filename=IMG,bogus=1", "bogus"),
    ("driver=raw,node-name=r0,file.driver=file,file.filename=IMG,ofset=512", "ofset"),
    ("driver=raw,node-name=r0,file.driver=file,file.filename=IMG,file.aoi=threads", "aoi"),
    ("driver=qcow2,node-name=q0,file.driver=file,file.filename=QCOW2,l2-cache=1M", "l2-cache"),
], ids=["null-co", "file", "raw", "file-child", "qcow2"])
def test_blockdev_unknown_key(tmp_path, blockdev, key):
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    qcow2 = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "1M"])
    spec = blockdev.replace("QCOW2", str(qcow2)).replace("IMG", str(img))
    err = cli_fails(tmp_path, "--blockdev", spec)
    assert key in err


def test_blockdev_known_generic_keys_accepted(daemon_factory, tmp_path):
    """QEMU's generic node options (some without effect here) still open."""
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    d = daemon_factory(["--blockdev", f"driver=file,node-name=f0,filename={img},cache.direct=off,locking=off,"
                        "discard=unmap,detect-zeroes=off,auto-read-only=off,aio=threads",
                        "--blockdev", "driver=raw,node-name=r0,file=f0,offset=512,size=4096,read-only=on",
                        "--blockdev", "driver=null-co,node-name=n0,size=1M,read-zeroes=on,latency-ns=0"], nbd=False)
    names = {n["node-name"] for n in d.ctl.cmd("query-named-block-nodes")}
    assert {"f0", "r0", "n0"} <= names
