# SPDX-License-Identifier: GPL-2.0-or-later
"""The JSON control socket: commands, their errors, events."""
import json
import socket
import time

import pytest

from conftest import MiB, QMPError, make_raw, nbd_handle, requires

nbd = pytest.importorskip("nbd")


@pytest.fixture
def empty_daemon(daemon_factory):
    return daemon_factory(["--object", "iothread,id=io0"], nbd=False)


def test_greeting_and_capabilities(empty_daemon):
    c = empty_daemon.ctl
    assert "QMP" in c.greeting
    assert c.cmd("qmp_capabilities") == {}
    assert "vdiskd" in c.cmd("query-version")
    names = {x["name"] for x in c.cmd("query-commands")}
    assert {"blockdev-add", "blockdev-del", "block-export-add", "block-export-del", "query-block-exports",
            "query-named-block-nodes", "query-iothreads", "query-stats", "quit"} <= names


def test_malformed_input_keeps_serving(empty_daemon):
    c = empty_daemon.ctl
    for bad in (b"{not json\n", b"[1, 2]\n", b'{"execute": 5}\n', b'{"arguments": {}}\n',
                b'{"execute": "query-iothreads", "arguments": []}\n', b'{"execute": "x", "bogus": 1}\n',
                b"\xff\xfe garbage\n"):
        c.send_raw(bad)
        r = c.reply()
        assert r["error"]["class"] == "GenericError", (bad, r)
    r = c.cmd_raw("no-such-command")
    assert r["error"]["class"] == "CommandNotFound"
    c.send_raw(b"\n   \n")  # blank lines are ignored
    assert c.cmd("query-iothreads")
    c.send_raw(b'{"execute": "' + b"x" * (5 * MiB) + b'"}\n')  # longer than any command
    assert "too long" in c.reply()["error"]["desc"]
    assert c.cmd("query-iothreads")


def test_id_is_echoed(empty_daemon):
    c = empty_daemon.ctl
    c.send_raw(json.dumps({"execute": "query-iothreads", "id": {"any": ["json", 1]}}).encode() + b"\n")
    assert c.reply()["id"] == {"any": ["json", 1]}
    c.send_raw(b'{"execute": "nope", "id": "abc"}\n')
    r = c.reply()
    assert r["id"] == "abc" and "error" in r


def test_wrong_argument_types(empty_daemon, tmp_path):
    c = empty_daemon.ctl
    with pytest.raises(QMPError, match="node-name"):
        c.cmd("blockdev-add", driver="file", node_name=5, filename="x")
    with pytest.raises(QMPError, match="missing"):
        c.cmd("blockdev-del")
    with pytest.raises(QMPError, match="invalid parameter"):
        c.cmd("blockdev-del", node_name="a", extra=1)
    with pytest.raises(QMPError):
        c.cmd("block-export-add", type="nbd", id="e", node_name="n", writable="maybe")
    with pytest.raises(QMPError, match="unknown export type"):
        c.cmd("block-export-add", type="no-such-type", id="e", node_name="n")


def test_blockdev_lifecycle(empty_daemon, tmp_path):
    c = empty_daemon.ctl
    img = make_raw(tmp_path / "a.raw", 8 * MiB)
    c.cmd("blockdev-add", driver="file", node_name="f0", filename=str(img))
    c.cmd("blockdev-add", driver="raw", node_name="r0", file="f0")
    with pytest.raises(QMPError, match="duplicate"):
        c.cmd("blockdev-add", driver="file", node_name="f0", filename=str(img))
    with pytest.raises(QMPError, match="No such file|cannot|not"):
        c.cmd("blockdev-add", driver="file", node_name="f9", filename=str(tmp_path / "missing"))
    with pytest.raises(QMPError, match="in use by node 'r0'"):
        c.cmd("blockdev-del", node_name="f0")
    nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes")}
    assert nodes["r0"]["drv"] == "raw" and nodes["r0"]["image"]["virtual-size"] == 8 * MiB
    assert nodes["r0"]["children"][0]["node-name"] == "f0"
    assert nodes["f0"]["parents"] == 1
    c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")})
    c.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True)
    with pytest.raises(QMPError, match="in use by 1 export"):
        c.cmd("blockdev-del", node_name="r0")
    with pytest.raises(QMPError, match="already exists"):
        c.cmd("block-export-add", type="nbd", id="e0", node_name="r0")
    exps = c.cmd("query-block-exports")
    assert exps[0]["id"] == "e0" and exps[0]["writable"] and exps[0]["name"] == "r0"
    c.cmd("block-export-del", id="e0")
    with pytest.raises(QMPError, match="not found"):
        c.cmd("block-export-del", id="e0")
    c.cmd("blockdev-del", node_name="r0")
    c.cmd("blockdev-del", node_name="f0")
    assert c.cmd("query-named-block-nodes") == []
    with pytest.raises(QMPError, match="Failed to find"):
        c.cmd("blockdev-del", node_name="f0")


def test_export_in_iothread(empty_daemon, tmp_path):
    c = empty_daemon.ctl
    img = make_raw(tmp_path / "a.raw", 8 * MiB)
    c.cmd("blockdev-add", driver="file", node_name="f0", filename=str(img), iothread="io0")
    c.cmd("blockdev-add", driver="raw", node_name="r0", file="f0")  # follows f0 into io0
    c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")})
    with pytest.raises(QMPError, match="fixed-iothread"):
        c.cmd("block-export-add", type="nbd", id="e0", node_name="r0", iothread="main", fixed_iothread=True)
    c.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True, iothread="io0")
    th = {t["id"]: t for t in c.cmd("query-iothreads")}
    assert th["io0"]["exports"] == ["e0"] and set(th["io0"]["nodes"]) == {"f0", "r0"}
    assert th["io0"]["thread-id"] != th["main"]["thread-id"]
    with pytest.raises(QMPError, match="does not exist"):
        c.cmd("blockdev-add", driver="null-co", node_name="n1", iothread="nope")
    h = nbd_handle(f"nbd+unix:///r0?socket={tmp_path / 'n.sock'}")
    h.pwrite(b"z" * 65536, 0)
    assert h.pread(65536, 0) == b"z" * 65536
    h.shutdown()
    # An exported node cannot move to another thread.
    with pytest.raises(QMPError, match="cannot move"):
        c.cmd("block-export-add", type="nbd", id="e1", node_name="r0", name="other", iothread="main")


def test_export_moves_node_to_iothread(empty_daemon, tmp_path):
    """As QEMU: block-export-add with an iothread moves an unused graph there (close, reopen)."""
    c = empty_daemon.ctl
    img = make_raw(tmp_path / "a.raw", 8 * MiB)
    c.cmd("blockdev-add", driver="file", node_name="f0", filename=str(img))
    c.cmd("blockdev-add", driver="raw", node_name="r0", file="f0")
    c.cmd("blockdev-add", driver="raw", node_name="r1", file="f0")  # a second user of f0
    c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")})
    with pytest.raises(QMPError, match="also used by nodes outside"):
        c.cmd("block-export-add", type="nbd", id="e0", node_name="r0", iothread="io0")
    c.cmd("blockdev-del", node_name="r1")
    c.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True, iothread="io0")
    th = {t["id"]: t for t in c.cmd("query-iothreads")}
    assert set(th["io0"]["nodes"]) == {"f0", "r0"} and th["main"]["nodes"] == []
    h = nbd_handle(f"nbd+unix:///r0?socket={tmp_path / 'n.sock'}")
    h.pwrite(b"m" * 4096, 4096)
    assert h.pread(4096, 4096) == b"m" * 4096
    h.shutdown()


def test_events_and_stats(empty_daemon, tmp_path):
    c = empty_daemon.ctl
    c.cmd("blockdev-add", driver="null-co", node_name="n0", size=16 * MiB)
    c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")})
    c.cmd("block-export-add", type="nbd", id="e0", node_name="n0", writable=True)
    h = nbd_handle(f"nbd+unix:///n0?socket={tmp_path / 'n.sock'}")
    ev = c.wait_event("EXPORT_CLIENT_CONNECTED")
    assert ev["data"]["id"] == "e0" and ev["data"]["type"] == "nbd"
    assert "seconds" in ev["timestamp"]
    for i in range(10):
        h.pwrite(b"x" * 4096, i * 4096)
        h.pread(8192, 0)
    h.flush()
    h.shutdown()
    c.wait_event("EXPORT_CLIENT_DISCONNECTED")
    st = c.cmd("query-stats")
    e = st["exports"][0]
    assert e["id"] == "e0" and e["connections-total"] == 1 and e["connections"] == 0
    assert e["ops"]["write"]["ops"] == 10 and e["ops"]["write"]["bytes"] == 40960
    assert e["ops"]["read"]["ops"] == 10 and e["ops"]["flush"]["ops"] == 1
    hist = e["ops"]["read"]["latency-histogram"]
    assert sum(hist["bins"]) == 10 and len(hist["boundaries-us"]) == len(hist["bins"]) - 1
    n = {x["node-name"]: x for x in st["nodes"]}["n0"]
    assert n["ops"]["write"]["ops"] == 10 and n["block-layer"]["wr_operations"] == 10
    c.cmd("block-export-del", id="e0")
    assert c.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] == "e0"


def test_export_del_safe_and_hard(empty_daemon, tmp_path):
    c = empty_daemon.ctl
    c.cmd("blockdev-add", driver="null-co", node_name="n0")
    c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")})
    c.cmd("block-export-add", type="nbd", id="e0", node_name="n0")
    h = nbd_handle(f"nbd+unix:///n0?socket={tmp_path / 'n.sock'}")
    c.wait_event("EXPORT_CLIENT_CONNECTED")
    with pytest.raises(QMPError, match="connection"):
        c.cmd("block-export-del", id="e0")
    c.cmd("block-export-del", id="e0", mode="hard")
    with pytest.raises(nbd.Error):
        for _ in range(100):
            h.pread(512, 0)
            time.sleep(0.01)
    c.cmd("blockdev-del", node_name="n0")


def test_nbd_server_errors(empty_daemon, tmp_path):
    c = empty_daemon.ctl
    c.cmd("blockdev-add", driver="null-co", node_name="n0")
    with pytest.raises(QMPError, match="not running"):
        c.cmd("block-export-add", type="nbd", id="e0", node_name="n0")
    with pytest.raises(QMPError, match="addr"):
        c.cmd("nbd-server-start")
    with pytest.raises(QMPError, match="TLS credentials 'nope' not found"):
        c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")}, tls_creds="nope")
    c.cmd("nbd-server-start", addr={"type": "inet", "host": "127.0.0.1", "port": "0"})
    with pytest.raises(QMPError, match="already running"):
        c.cmd("nbd-server-start", addr={"type": "unix", "path": str(tmp_path / "n.sock")})
    assert c.cmd("query-nbd-server")["running"]
    c.cmd("nbd-server-stop")
    with pytest.raises(QMPError, match="not running"):
        c.cmd("nbd-server-stop")


def test_two_control_clients(empty_daemon):
    a = empty_daemon.ctl
    b = empty_daemon.control()
    b.cmd("blockdev-add", driver="null-co", node_name="n0")
    assert [n["node-name"] for n in a.cmd("query-named-block-nodes")] == ["n0"]
    b.close()
    assert a.cmd("query-iothreads")


def test_quit(daemon_factory):
    d = daemon_factory([])
    assert d.qmp("quit") == {}
    assert d.proc.wait(timeout=20) == 0
    assert not d.ctl_path.exists()
