# SPDX-License-Identifier: LGPL-2.1-or-later
"""
Fixtures for the virtio-blk-vhost-user driver tests: qemu-storage-daemon
exporting block nodes over vhost-user-blk on sockets in the test's tmp dir,
the build's vdisk-io and vdisk, and vu-client (a small client built here
from vu-client.c for what vdisk-io cannot do: deep queues with a checkable
pattern, several queues in threads, the completion fd, timeouts, memory
regions, I/O while the back-end dies).

Run:

    VDISK_BUILD=/tmp/build-vu pytest-3 -v tests/vhost-user

VDISK_BUILD defaults to <repo>/build.  A sanitizer build works the same way
(vu-client is then compiled with the same -fsanitize flags).  Without
qemu-storage-daemon (Debian: qemu-system-common) every test is skipped.
Every subprocess runs under a timeout, so a hang fails the test instead of
blocking the run.
"""
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vdtest import (BUILD, REPO, TIMEOUT, check_sanitizers, compile_client, find_built, kv_lines,  # noqa: E402,F401
                    requires, run, unix_listening)

DRIVER = "virtio-blk-vhost-user"
MiB = 1 << 20


class Backend:
    """A qemu-storage-daemon exporting one node over vhost-user-blk; only it is stopped at teardown."""

    def __init__(self, sock, blockdev, export_opts, pre=()):
        self.sock = str(sock)
        self.argv = ["qemu-storage-daemon", *pre, "--blockdev", blockdev,
                     "--export", f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock}"
                     + (f",{export_opts}" if export_opts else "")]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        end = time.monotonic() + 15
        while not unix_listening(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited: {self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.argv} did not become ready")
            time.sleep(0.02)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def stop(self):
        """Stop; returns what the daemon printed on stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""

    @property
    def alive(self):
        return self.proc.poll() is None


@pytest.fixture
def qsd(tmp_path):
    """qsd(image=None, size=..., writable=True, num_queues=1, null=False, opts="", blockdev_opts="",
    iops=None) -> Backend.  image: a raw file (node driver=file); null: a null-co node;
    iops: a throttle filter on top (so requests complete slowly)."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed (Debian package qemu-system-common)")
    started = []

    def start(image=None, size=256 * MiB, writable=True, num_queues=1, null=False, opts="", blockdev_opts="",
              iops=None):
        sock = tmp_path / f"vu{len(started)}.sock"
        name = "p0" if iops else "n0"
        if null:
            bd = f"driver=null-co,node-name={name},size={size},read-zeroes=on"
        else:
            bd = f"driver=file,node-name={name},filename={image}"
        if blockdev_opts:
            bd += "," + blockdev_opts
        pre = []
        if iops:
            pre = ["--object", f"throttle-group,id=tg0,x-iops-total={iops}", "--blockdev", bd]
            bd = "driver=throttle,node-name=n0,throttle-group=tg0,file=p0"
        eo = f"writable={'on' if writable else 'off'},num-queues={num_queues}"
        if opts:
            eo += "," + opts
        b = Backend(sock, bd, eo, pre)
        started.append(b)
        return b

    yield start
    for b in started:
        err = b.stop()
        # The back-end must never see a protocol error from us.
        assert "vu_panic" not in err, f"qemu-storage-daemon complained:\n{err}"


@pytest.fixture
def image(tmp_path):
    """image(size, name='disk.raw') -> Path of a sparse raw file."""
    def make(size=256 * MiB, name="disk.raw"):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(size)
        return p
    return make


@pytest.fixture(scope="session")
def vdisk_io():
    exe = find_built("vdisk-io")
    if exe is None:
        pytest.skip(f"vdisk-io not built in {BUILD} (set VDISK_BUILD)")
    return exe


@pytest.fixture(scope="session")
def vdisk_tool():
    exe = BUILD / "tools" / "vdisk"
    if not exe.exists():
        pytest.skip(f"vdisk not built in {BUILD}")
    return exe


@pytest.fixture(scope="session")
def vu_client(tmp_path_factory):
    return compile_client(Path(__file__).with_name("vu-client.c"), tmp_path_factory.mktemp("bin") / "vu-client")


@pytest.fixture
def io(vdisk_io):
    """io(backend, *commands, check=0, extra=(), map=True) -> CompletedProcess of vdisk-io."""
    def go(backend, *cmds, check=0, extra=(), map=True, timeout=TIMEOUT):
        args = [vdisk_io, f"--driver={DRIVER}", f"--path={backend.sock}", *(["--map"] if map else []), *extra]
        for c in cmds:
            args += ["-c", c]
        return run(args, check=check, timeout=timeout)
    return go


@pytest.fixture
def client(vu_client):
    """client(backend, *args, check=0) -> CompletedProcess of vu-client."""
    def go(backend, *args, check=0, timeout=TIMEOUT, **kw):
        return run([vu_client, "--path", backend.sock, *args], check=check, timeout=timeout, **kw)
    return go


def info(p):
    """Parse vdisk-io 'info' output into a dict."""
    return kv_lines(p.stdout)


def pattern(off, length, seed):
    """The bytes vu-client writes: each 512-byte sector holds 32 x (u64 sector, u64 seed)."""
    assert off % 512 == 0 and length % 512 == 0
    return b"".join(struct.pack("<QQ", s, seed) * 32 for s in range(off // 512, (off + length) // 512))


def allocated(path, off, length):
    """Bytes of [off, off+length) that are allocated in the file (SEEK_DATA/SEEK_HOLE)."""
    total = 0
    with open(path, "rb") as f:
        fd = f.fileno()
        pos, end = off, off + length
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            total += min(hole, end) - data
            pos = hole
    return total



# ---- vdiskd's vhost-user-blk export (tests/vhost-user/test_export*.py) ------------------------------------------

VDISKD = BUILD / "daemon" / "vdiskd"


class Vdiskd:
    """vdiskd exporting one node over vhost-user-blk (export e0 on socket .sock); stderr goes to a file."""

    def __init__(self, tmp, sock, blockdevs, export_opts, extra=(), own_session=True):
        self.sock = str(sock)
        self.log = Path(tmp) / f"{Path(sock).stem}.log"
        self.argv = [str(VDISKD), "-v", *extra]
        for bd in blockdevs:
            self.argv += ["--blockdev", bd]
        self.argv += ["--export", f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={sock},{export_opts}"]
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self._err,
                                     start_new_session=own_session)
        end = time.monotonic() + 15
        while "vdiskd: ready" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.argv} did not become ready:\n{self.output()}")
            time.sleep(0.02)

    def output(self):
        return self.log.read_text(errors="replace")

    def wait_log(self, text, timeout=10):
        end = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > end:
                raise AssertionError(f"vdiskd never logged {text!r}:\n{self.output()}")
            time.sleep(0.02)

    @property
    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        """SIGKILL (a crash); stop() then expects that exit."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.killed = True

    def stop(self):
        """SIGTERM; the daemon must exit 0 without a sanitizer report.  Returns its log."""
        if getattr(self, "killed", False):
            self._err.close()
            return self.output()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                raise AssertionError(f"vdiskd did not exit on SIGTERM:\n{self.output()}")
        self._err.close()
        out = self.output()
        check_sanitizers(self.argv, out)
        assert self.proc.returncode == 0, f"vdiskd exited {self.proc.returncode}:\n{out}"
        return out


@pytest.fixture
def vdiskd(tmp_path):
    """vdiskd(image=None, fmt='raw', size=..., writable=True, opts='', null=False, blockdev_opts='') -> Vdiskd.
    image: a file opened as node f0 (fmt qcow2: a qcow2 node q0 on top; the export serves the top node);
    null: a null-co node.  opts: more export options (num-queues=2,...).  own_session=False: the daemon
    stays in the test's session, so the scheduler's autogroups do not keep it apart from the test's clients."""
    if not VDISKD.exists():
        pytest.skip(f"vdiskd not built in {BUILD}")
    started = []

    def start(image=None, fmt="raw", size=256 * MiB, writable=True, opts="", null=False, blockdev_opts="",
              extra=(), own_session=True):
        sock = tmp_path / f"vd{len(started)}.sock"
        if null:
            bds, node = [f"driver=null-co,node-name=f0,size={size},read-zeroes=on"
                         + (f",{blockdev_opts}" if blockdev_opts else "")], "f0"
        else:
            bds, node = [f"driver=file,node-name=f0,filename={image}" + (f",{blockdev_opts}" if blockdev_opts else "")], "f0"
            if fmt == "qcow2":
                bds.append("driver=qcow2,node-name=q0,file=f0")
                node = "q0"
        eo = f"node-name={node},writable={'on' if writable else 'off'}" + (f",{opts}" if opts else "")
        d = Vdiskd(tmp_path, sock, bds, eo, extra, own_session)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
