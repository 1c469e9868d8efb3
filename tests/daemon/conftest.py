# SPDX-License-Identifier: GPL-2.0-or-later
"""
Fixtures for the vdiskd tests: a daemon started in the test's tmp dir with a
control socket, a QMP-like client for it, images made with qemu-img, and
helpers for the real NBD peers (nbdinfo, nbdcopy, qemu-img, qemu-io, fio,
python3-libnbd).

Run with the system Python (python3-libnbd lives there):

    VDISK_BUILD=/tmp/build-daemon /usr/bin/python3 -m pytest -v tests/daemon

VDISK_BUILD defaults to <repo>/build.  With a sanitizer build the daemon's
stderr is checked for sanitizer reports when it stops.  Tests whose peer is
missing are skipped; every subprocess runs under a timeout.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("VDISK_BUILD", REPO / "build")).resolve()
VDISKD = BUILD / "daemon" / "vdiskd"

import sys  # noqa: E402
sys.path.insert(0, str(REPO / "tests"))
from vdtest import unix_listening  # noqa: E402
TIMEOUT = 60
KiB = 1024
MiB = 1024 * 1024

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "ERROR: UndefinedBehaviorSanitizer")


def have(tool):
    return shutil.which(tool) is not None


def requires(*tools):
    missing = [t for t in tools if not have(t)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def run(args, timeout=TIMEOUT, check=True, input=None):
    p = subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"{p.stdout.decode(errors='replace')[-3000:]}\n{p.stderr.decode(errors='replace')[-3000:]}")
    return p


def wait_for(pred, timeout=20, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class QMPError(Exception):
    def __init__(self, err):
        super().__init__(err.get("desc"))
        self.cls = err.get("class")
        self.desc = err.get("desc")


class Control:
    """Line-delimited JSON client of the control socket; events are kept aside."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        end = time.monotonic() + 20
        while True:  # the socket file appears at bind(), a moment before listen()
            try:
                self.sock.connect(str(path))
                break
            except ConnectionRefusedError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rwb")
        self.greeting = json.loads(self.file.readline())
        self.events = []
        self.next_id = 0

    def send_raw(self, data: bytes):
        self.file.write(data)
        self.file.flush()

    def recv(self):
        line = self.file.readline()
        if not line:
            raise EOFError("control socket closed")
        return json.loads(line)

    def reply(self):
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd_raw(self, execute, arguments=None):
        self.next_id += 1
        msg = {"execute": execute, "id": self.next_id}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send_raw(json.dumps(msg).encode() + b"\n")
        r = self.reply()
        assert r.get("id") == self.next_id, r
        return r

    def cmd(self, execute, **arguments):
        r = self.cmd_raw(execute, {k.replace("_", "-"): v for k, v in arguments.items()})
        if "error" in r:
            raise QMPError(r["error"])
        return r["return"]

    def wait_event(self, name, timeout=20):
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            if time.monotonic() > end:
                raise AssertionError(f"no {name} event; got {self.events}")
            self.sock.settimeout(max(0.05, end - time.monotonic()))
            try:
                msg = self.recv()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(TIMEOUT)
            self.events.append(msg)

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class Daemon:
    def __init__(self, tmp, args, nbd=True, verbose=True):
        self.tmp = Path(tmp)
        self.ctl_path = self.tmp / "ctl.sock"
        self.nbd_path = self.tmp / "nbd.sock"
        self.log_path = self.tmp / f"vdiskd-{os.getpid()}-{time.monotonic_ns()}.log"
        cmd = [str(VDISKD)] + (["-v"] if verbose else []) + [str(a) for a in args]
        if nbd:
            cmd += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}"]
        cmd += ["--control", f"unix:{self.ctl_path}"]
        self.cmdline = cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: unix_listening(self.ctl_path) or self.proc.poll() is not None, what="the control socket")
        except AssertionError:
            self.proc.kill()
            raise
        if self.proc.poll() is not None:
            raise AssertionError(f"vdiskd exited with {self.proc.returncode}:\n{self.output()}")
        self.ctl = Control(self.ctl_path)

    def uri(self, name=""):
        return f"nbd+unix:///{name}?socket={self.nbd_path}"

    def output(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def qmp(self, execute, **arguments):
        return self.ctl.cmd(execute, **arguments)

    def control(self):
        return Control(self.ctl_path)

    def stop(self, sig=signal.SIGTERM, expect_rc=0, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"vdiskd did not stop on {sig!r}:\n{self.output()[-4000:]}")
        self.ctl.close()
        out = self.output()
        self.log.close()
        for marker in SANITIZER_MARKERS:
            assert marker not in out, out[-8000:]
        if expect_rc is not None:
            assert rc == expect_rc, f"exit status {rc}:\n{out[-4000:]}"
        return out


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def start(args, **kw):
        d = Daemon(tmp_path, args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop()
        else:
            d.ctl.close()
            out = d.output()
            for marker in SANITIZER_MARKERS:
                assert marker not in out, out[-8000:]


def make_raw(path, size=64 * MiB, pattern=True):
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern:
            # Data in the first MiB and at 16 MiB, holes elsewhere.
            f.seek(0)
            f.write(os.urandom(MiB))
            if size >= 17 * MiB:
                f.seek(16 * MiB)
                f.write(b"\xa5" * (256 * KiB))
    return path


def make_qcow2(path, size="64M", backing=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", str(backing), "-F", "qcow2" if str(backing).endswith("qcow2") else "raw"]
    run(args + [str(path), size])
    return path


@pytest.fixture
def raw_image(tmp_path):
    return make_raw(tmp_path / "disk.raw")


@pytest.fixture
def qcow2_image(tmp_path):
    if not have("qemu-img"):
        pytest.skip("needs qemu-img")
    p = make_qcow2(tmp_path / "disk.qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 8M 512k", str(p)])
    return p


@pytest.fixture
def raw_daemon(daemon_factory, raw_image):
    """raw over file, writable export 'r0'; read-only export 'ro' of the same node."""
    return daemon_factory([
        "--blockdev", f"driver=file,node-name=f0,filename={raw_image}",
        "--blockdev", "driver=raw,node-name=r0,file=f0",
        "--export", "type=nbd,id=e0,node-name=r0,writable=on,description=raw disk",
        "--export", "type=nbd,id=e1,node-name=r0,name=ro",
    ])


@pytest.fixture
def qcow2_daemon(daemon_factory, qcow2_image):
    return daemon_factory([
        "--blockdev", f"driver=file,node-name=f0,filename={qcow2_image}",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
        "--export", "type=nbd,id=e0,node-name=q0,writable=on",
    ])


def nbd_handle(uri, structured=True, strict=True, contexts=("base:allocation",)):
    import nbd
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h
