# SPDX-License-Identifier: GPL-2.0-or-later
"""Command line, startup errors, pidfile, daemonize, iothreads, and clean shutdown."""
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import MiB, VDISKD, make_qcow2, nbd_handle, requires, run, wait_for

nbd = pytest.importorskip("nbd")


def test_help_version():
    p = run([VDISKD, "--help"])
    assert b"--blockdev" in p.stdout and b"--nbd-server" in p.stdout
    p = run([VDISKD, "--version"])
    assert p.stdout.startswith(b"vdiskd ")


def test_usage_errors():
    assert run([VDISKD, "--frobnicate"], check=False).returncode == 2
    assert run([VDISKD], check=False).returncode == 2
    p = run([VDISKD, "--blockdev", "driver=file,=x"], check=False)
    assert p.returncode == 2


def test_startup_error_exits_1(tmp_path):
    p = run([VDISKD, "--blockdev", f"driver=file,node-name=f0,filename={tmp_path}/missing"], check=False)
    assert p.returncode == 1
    assert b"missing" in p.stderr
    p = run([VDISKD, "--blockdev", "driver=null-co,node-name=n0", "--export", "type=nbd,id=e,node-name=n0"],
            check=False)
    assert p.returncode == 1 and b"NBD server not running" in p.stderr
    p = run([VDISKD, "--blockdev", "driver=null-co,node-name=n0", "--export",
             "type=nbd,id=e,node-name=n0,iothread=io9", "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/s"],
            check=False)
    assert p.returncode == 1 and b"io9" in p.stderr


def test_pidfile_and_daemonize(tmp_path):
    pidfile = tmp_path / "vdiskd.pid"
    ctl = tmp_path / "ctl.sock"
    p = run([VDISKD, "--daemonize", "--pidfile", pidfile, "--blockdev", "driver=null-co,node-name=n0",
             "--control", f"unix:{ctl}"])
    assert p.returncode == 0
    pid = int(pidfile.read_text())
    assert ctl.exists()
    # A second daemon on the same pidfile refuses to start.
    p2 = run([VDISKD, "--pidfile", pidfile, "--blockdev", "driver=null-co,node-name=n0"], check=False)
    assert p2.returncode == 1 and b"pidfile" in p2.stderr
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             what="the daemon to exit")
    wait_for(lambda: not pidfile.exists(), what="the pidfile to go")


def test_daemonize_reports_startup_failure(tmp_path):
    p = run([VDISKD, "--daemonize", "--blockdev", f"driver=file,node-name=f,filename={tmp_path}/missing"],
            check=False)
    assert p.returncode == 1


def test_chardev_monitor_spelling(daemon_factory, tmp_path):
    sock = tmp_path / "qmp.sock"
    d = daemon_factory(["--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "chardev=m0"])
    from conftest import Control
    c = Control(sock)
    assert c.cmd("query-iothreads")
    c.close()


@requires("qemu-img")
def test_sigterm_drains_and_closes_qcow2(daemon_factory, tmp_path):
    img = make_qcow2(tmp_path / "d.qcow2", "64M")
    d = daemon_factory(["--object", "iothread,id=io0",
                        "--blockdev", f"driver=file,node-name=f0,filename={img}",
                        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
                        "--export", "type=nbd,id=e0,node-name=q0,writable=on,iothread=io0"])
    h = nbd_handle(d.uri("q0"))
    data = os.urandom(MiB)
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), i * MiB) for i in range(32)]
    time.sleep(0.05)
    d.proc.send_signal(signal.SIGTERM)
    # Requests already sent complete (or the connection ends); the daemon exits 0.
    try:
        while h.aio_in_flight() > 0:
            h.poll(1000)
    except nbd.Error:
        pass
    out = d.stop()
    assert "shutting down (SIGTERM)" in out
    check = run(["qemu-img", "check", "--output=json", img], check=False)
    assert check.returncode == 0, check.stdout
    info = run(["qemu-img", "info", "--output=json", img]).stdout.decode()
    assert '"dirty-flag": false' in info.replace("\n", " ") or "dirty-flag" not in info


def test_sigint_with_idle_clients(raw_daemon):
    hs = [nbd_handle(raw_daemon.uri("r0")) for _ in range(4)]
    for h in hs:
        h.pread(4096, 0)
    raw_daemon.stop(signal.SIGINT)


def test_concurrent_clients_on_iothreads(daemon_factory, tmp_path):
    """Two exports in two iothreads and one in main, many clients at once, data checked."""
    from conftest import make_raw
    imgs = [make_raw(tmp_path / f"d{i}.raw", 32 * MiB, pattern=False) for i in range(3)]
    d = daemon_factory(["--object", "iothread,id=io0", "--object", "iothread,id=io1",
                        "--blockdev", f"driver=file,node-name=a,filename={imgs[0]}",
                        "--blockdev", f"driver=file,node-name=b,filename={imgs[1]}",
                        "--blockdev", f"driver=file,node-name=c,filename={imgs[2]}",
                        "--export", "type=nbd,id=ea,node-name=a,writable=on,iothread=io0",
                        "--export", "type=nbd,id=eb,node-name=b,writable=on,iothread=io1",
                        "--export", "type=nbd,id=ec,node-name=c,writable=on"])
    th = {t["id"]: t for t in d.qmp("query-iothreads")}
    assert th["io0"]["exports"] == ["ea"] and th["io1"]["exports"] == ["eb"]
    errors = []

    def worker(name, k):
        try:
            h = nbd_handle(d.uri(name))
            blob = bytes([k]) * (256 * 1024)
            for i in range(16):
                off = (k * 16 + i) * 256 * 1024 % (32 * MiB)
                h.pwrite(blob, off)
                assert h.pread(len(blob), off) == blob
            h.flush()
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n, k)) for k in range(6) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    st = {e["id"]: e for e in d.qmp("query-stats", target="export")["exports"]}
    assert all(st[i]["connections-total"] == 6 for i in ("ea", "eb", "ec"))
