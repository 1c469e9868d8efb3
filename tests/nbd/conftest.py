# SPDX-License-Identifier: LGPL-2.1-or-later
"""
Fixtures for the nbd driver tests: real NBD servers (nbdkit, qemu-nbd) on
sockets in the test's tmp dir, the build's vdisk-io, and nbd-queues (a small
client built here from nbd-queues.c for what vdisk-io cannot do: several
queues in threads, the completion fd, timeouts, I/O while the server dies).

Run (system pytest, which has python3-libnbd next to it):

    VDISK_BUILD=/tmp/build-nbd pytest-3 -v tests/nbd

VDISK_BUILD defaults to <repo>/build.  A sanitizer build works the same way
(nbd-queues is then compiled with the same -fsanitize flags).  Tests whose
peer is missing (nbdkit, qemu-nbd, qemu-io, nbdcopy) are skipped.  Every
subprocess runs under a timeout, so a hang fails the test instead of
blocking the run.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("VDISK_BUILD", REPO / "build")).resolve()
TIMEOUT = 60


def _find(name):
    for cand in (BUILD / "tests" / "unit" / name, BUILD / "tests" / name, BUILD / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _sanitize_flags():
    ninja = BUILD / "build.ninja"
    if not ninja.exists():
        return []
    text = ninja.read_text(errors="replace")
    flags = []
    if "-fsanitize=address" in text:
        flags.append("address")
    if "-fsanitize=undefined" in text or "address,undefined" in text:
        flags.append("undefined")
    return ["-fsanitize=" + ",".join(flags)] if flags else []


def requires(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason="missing " + ", ".join(missing))


@pytest.fixture(scope="session")
def vdisk_io():
    exe = _find("vdisk-io")
    if exe is None:
        pytest.skip(f"vdisk-io not built in {BUILD} (set VDISK_BUILD)")
    return exe


@pytest.fixture(scope="session")
def nbd_queues(tmp_path_factory):
    lib = BUILD / "libvdisk.so"
    if not lib.exists():
        pytest.skip(f"libvdisk.so not built in {BUILD} (set VDISK_BUILD)")
    out = tmp_path_factory.mktemp("bin") / "nbd-queues"
    cmd = ["cc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *_sanitize_flags(),
           "-I", str(REPO / "include"), str(Path(__file__).with_name("nbd-queues.c")),
           "-o", str(out), "-L", str(BUILD), "-lvdisk", f"-Wl,-rpath,{BUILD}", "-lpthread"]
    subprocess.run(cmd, check=True, timeout=TIMEOUT)
    return out


def check_sanitizers(args, stderr):
    """Fail on any ASan/UBSan report (sanitizer builds only print them)."""
    if not stderr:
        return
    if "runtime error:" in stderr or "ERROR: AddressSanitizer" in stderr:
        raise AssertionError(f"sanitizer report from {args}:\n{stderr}")
    if "ERROR: LeakSanitizer" in stderr:
        leaks = re.split(r"\n(?=(?:Direct|Indirect) leak of)", stderr.split("ERROR: LeakSanitizer", 1)[1])[1:]
        # Known core issue (reported): vdisk_destroy() frees a driver's string
        # properties only through ops->destroy, which it calls only once
        # connected, so they leak when vdisk_connect() failed.
        if "vdisk_connect" in stderr and all("vdisk_set_str" in l for l in leaks):
            return
        raise AssertionError(f"leak report from {args}:\n{stderr}")


def run(args, timeout=TIMEOUT, check=None, **kw):
    """Run a command; check=0/1/...: expected exit status.  Sanitizer reports fail."""
    try:
        p = subprocess.run([str(a) for a in args], capture_output=kw.pop("capture_output", True), text=True,
                           timeout=timeout, errors="replace", **kw)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"HANG: {args} did not finish in {timeout} s\n{e.stdout}\n{e.stderr}")
    check_sanitizers(args, p.stderr)
    if check is not None:
        assert p.returncode == check, f"{args}: exit {p.returncode}, expected {check}\n" \
                                      f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


class Server:
    """A server process we started; stopped (and only it) at teardown."""

    def __init__(self, argv, sock=None, port=None, env=None):
        self.argv = [str(a) for a in argv]
        self.sock = sock
        self.port = port
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self):
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited: {self.proc.stderr.read().decode(errors='replace')}")
            if self.sock and os.path.exists(self.sock):
                return
            if self.port:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.argv} did not become ready")

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def nbdkit(tmp_path, servers):
    """nbdkit(*args, filters=[...]) -> Server on a Unix socket (foreground)."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit not installed")
    count = [0]

    def start(*args, filters=(), opts=()):
        count[0] += 1
        sock = tmp_path / f"nbdkit{count[0]}.sock"
        argv = ["nbdkit", "-f", "-U", sock, *opts]
        for f in filters:
            argv += ["--filter", f]
        s = Server(argv + list(args), sock=str(sock))
        servers.append(s)
        return s
    return start


@pytest.fixture
def qemu_nbd(tmp_path, servers):
    """qemu_nbd(image, *opts) -> Server on a Unix socket (persistent, raw)."""
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed")
    count = [0]

    def start(image, *opts):
        count[0] += 1
        sock = tmp_path / f"qemu-nbd{count[0]}.sock"
        s = Server(["qemu-nbd", "-k", sock, "-f", "raw", "-t", *opts, image], sock=str(sock))
        servers.append(s)
        return s
    return start


@pytest.fixture
def io(vdisk_io):
    """io(target_args, *commands, check=0) -> CompletedProcess of vdisk-io."""
    def go(target, *cmds, check=0, extra=(), timeout=TIMEOUT):
        args = [vdisk_io, "--driver=nbd", *target, *extra]
        for c in cmds:
            args += ["-c", c]
        return run(args, check=check, timeout=timeout)
    return go


def on(server, *more):
    """vdisk-io arguments selecting a server (by Unix socket path)."""
    return ["--path", server.sock, *more]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def info(p):
    """Parse vdisk-io 'info' output into a dict."""
    out = {}
    for line in p.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out
