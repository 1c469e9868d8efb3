# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixtures for the `vdisk` image subcommand tests.

The binary under test is $VDISK (a full path) if set, else the vdisk of
the build directory $VDISK_BUILD (default <source>/build): tools/vdisk, or
vdisk at its top.  The peer is the real qemu-img (and qemu-io to put data
into images); tests that need it are skipped when it is missing.  A
sanitizer report on stderr fails the test whatever the exit status.

qcow2 support lives in the block layer, not in the tools: tests that need
vdisk to read or write qcow2 ask for the `qcow2_read` / `qcow2_write`
fixtures, which mark the test xfail ONLY when the binary reports that it
does not know the qcow2 format at all ("Unknown file format 'qcow2'").
Any other failure is a real failure.
"""
import json
import os
import pathlib
import shutil
import subprocess

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
TIMEOUT = 120


SRC = pathlib.Path(__file__).resolve().parents[2]
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "ERROR: UndefinedBehaviorSanitizer")


def vdisk_path():
    if os.environ.get("VDISK"):
        return os.environ["VDISK"]
    build = pathlib.Path(os.environ.get("VDISK_BUILD", SRC / "build")).resolve()
    for cand in (build / "tools" / "vdisk", build / "vdisk"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return str(build / "tools" / "vdisk")


class Result:
    def __init__(self, args, proc):
        self.args = args
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "rc=%d\n--- stdout\n%s--- stderr\n%s" % (self.rc, self.out, self.err)


def run(args, cwd=None, check=None):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    r = Result(args, proc)
    for marker in SANITIZER_MARKERS:
        assert marker not in r.err, "%s\n%r" % (" ".join(map(str, args)), r)
    assert r.rc >= 0, "killed by signal %d: %r" % (-r.rc, r)
    if check is not None:
        assert r.rc == check, "%s\n%r" % (" ".join(map(str, args)), r)
    return r


@pytest.fixture(scope="session")
def vdisk_bin():
    path = vdisk_path()
    if not os.access(path, os.X_OK):
        pytest.fail("vdisk binary not found at %s (build it, or set VDISK_BUILD / VDISK)" % path)
    r = run([path, "info", "--help"])
    if r.rc != 0:
        pytest.fail("%s does not provide the image commands ('vdisk info --help' failed):\n%r" % (path, r))
    return path


@pytest.fixture
def vdisk(vdisk_bin, tmp_path):
    """vdisk(*args, check=None) -> Result, run in tmp_path."""
    def _run(*args, check=None):
        return run([vdisk_bin] + [str(a) for a in args], cwd=tmp_path, check=check)
    return _run


@pytest.fixture
def qemu_img(tmp_path):
    if not QEMU_IMG:
        pytest.skip("qemu-img is not installed")

    def _run(*args, check=0):
        return run([QEMU_IMG] + [str(a) for a in args], cwd=tmp_path, check=check)
    return _run


@pytest.fixture
def qemu_io(tmp_path):
    if not QEMU_IO:
        pytest.skip("qemu-io is not installed")

    def _run(image, *cmds, fmt=None):
        args = [QEMU_IO]
        if fmt:
            args += ["-f", fmt]
        for c in cmds:
            args += ["-c", c]
        args.append(str(image))
        return run(args, cwd=tmp_path, check=0)
    return _run


def _unknown_qcow2(r):
    return r.rc != 0 and "Unknown file format 'qcow2'" in r.err


@pytest.fixture(scope="session")
def _qcow2_caps(vdisk_bin, tmp_path_factory):
    """What the binary's block layer can do with qcow2: {'read': bool, 'write': bool}."""
    caps = {"read": True, "write": True}
    d = tmp_path_factory.mktemp("qcow2caps")
    if QEMU_IMG:
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(d / "q.qcow2"), "1M"], check=0)
        r = run([vdisk_bin, "info", "-f", "qcow2", str(d / "q.qcow2")])
        caps["read"] = not _unknown_qcow2(r)
    r = run([vdisk_bin, "create", "-q", "-f", "qcow2", str(d / "w.qcow2"), "1M"])
    caps["write"] = not _unknown_qcow2(r)
    return caps


@pytest.fixture
def qcow2_read(_qcow2_caps):
    if not _qcow2_caps["read"]:
        pytest.xfail("the block layer has no qcow2 format yet (vdisk: Unknown file format 'qcow2')")


@pytest.fixture
def qcow2_write(_qcow2_caps):
    if not _qcow2_caps["write"]:
        pytest.xfail("the block layer has no qcow2 format yet (vdisk: Unknown file format 'qcow2')")


def qimg_json(qemu_img, *args):
    return qemu_img(*args, "--output=json").json()


@pytest.fixture
def qinfo(qemu_img):
    """qemu-img info --output=json as a dict."""
    def _info(path, *extra):
        return qemu_img("info", "--output=json", *extra, path).json()
    return _info
