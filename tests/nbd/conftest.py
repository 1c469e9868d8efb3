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
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vdtest import (BUILD, REPO, TIMEOUT, check_sanitizers, compile_client, find_built, kv_lines,  # noqa: E402,F401
                    requires, run, unix_listening)


@pytest.fixture(scope="session")
def vdisk_io():
    exe = find_built("vdisk-io")
    if exe is None:
        pytest.skip(f"vdisk-io not built in {BUILD} (set VDISK_BUILD)")
    return exe


@pytest.fixture(scope="session")
def nbd_queues(tmp_path_factory):
    return compile_client(Path(__file__).with_name("nbd-queues.c"), tmp_path_factory.mktemp("bin") / "nbd-queues")


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
            if self.sock and unix_listening(self.sock):
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
    return kv_lines(p.stdout)
