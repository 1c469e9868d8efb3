# SPDX-License-Identifier: LGPL-2.1-or-later
"""
Helpers shared by the pytest suites that drive the build's binaries: where the
build is, running a command under a timeout with sanitizer reports turned into
failures, skipping when a peer tool is missing, and compiling a small test
client against libvdisk with the build's sanitizer flags.

A suite's conftest.py makes this importable with

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdtest import ...
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("VDISK_BUILD", REPO / "build")).resolve()
TIMEOUT = 60
SANITIZER_MARKERS = ("runtime error:", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                     "ERROR: UndefinedBehaviorSanitizer")


def find_built(name):
    """The built executable `name` (tests/unit, tests, tools, daemon or the top), or None."""
    for sub in ("tests/unit", "tests", "tools", "daemon", "."):
        cand = BUILD / sub / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def sanitize_flags():
    """The -fsanitize= flag the build was configured with ([] for a normal build)."""
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
    """Skip marker for tests whose peer programs are not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason="missing " + ", ".join(missing))


def check_sanitizers(args, stderr):
    """Fail on any ASan/UBSan/LSan report (sanitizer builds only print them)."""
    if stderr and any(m in stderr for m in SANITIZER_MARKERS):
        raise AssertionError(f"sanitizer report from {args}:\n{stderr}")


def run(args, timeout=TIMEOUT, check=None, **kw):
    """Run a command; check=0/1/...: expected exit status.  A hang or a sanitizer report fails."""
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


def compile_client(source, out):
    """Build a test client (one C file) against the build's libvdisk, with its sanitizers."""
    lib = BUILD / "libvdisk.so"
    if not lib.exists():
        pytest.skip(f"libvdisk.so not built in {BUILD} (set VDISK_BUILD)")
    cmd = ["cc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *sanitize_flags(),
           "-I", str(REPO / "include"), str(source), "-o", str(out), "-L", str(BUILD), "-lvdisk",
           f"-Wl,-rpath,{BUILD}", "-lpthread"]
    subprocess.run(cmd, check=True, timeout=TIMEOUT)
    return out


def kv_lines(text):
    """Parse `key=value` lines (vdisk-io `info`) into a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def unix_listening(path):
    """True once a socket bound at path is listening (not merely bound).

    The socket file appears at bind(), before listen(): a client connecting
    in between is refused.  /proc/net/unix shows the listening flag
    (__SO_ACCEPTCON, 0x10000) without connecting, so a server that serves
    only one client is not used up by the check.
    """
    path = str(path)
    if not os.path.exists(path):
        return False
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        return True  # no procfs: fall back to the file's existence
    return False


def cpu_seconds(pid):
    """User + system CPU time of process pid so far, in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as st:
        fields = st.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hostile_peers(tmp_path, cls):
    """
    The body of a `hostile` fixture: yields start(scenario) -> cls(socket path,
    scenario), a fake peer on a Unix socket in tmp_path; after the test every
    peer is stopped, and one whose scenario itself went wrong fails the test.
    """
    started = []

    def start(sc):
        peer = cls(tmp_path / f"hostile{len(started)}.sock", sc)
        started.append(peer)
        return peer
    yield start
    for peer in started:
        peer.stop()
    for peer in started:
        assert not peer.errors, f"the scenario itself failed: {peer.errors!r}\n{getattr(peer, 'log', [])[-10:]}"
