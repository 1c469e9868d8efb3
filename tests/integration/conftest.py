# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fixtures for the integration tests.

The tests drive the real binaries of a build directory: VDISK_BUILD (default
<source>/build) holds tools/vdisk, daemon/vdiskd and vdisk-io (built from
tests/vdisk-io.c).  Peers (qemu-io, qemu-img) are skipped when missing.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("VDISK_BUILD", SRC / "build")).resolve()

# Every file driver; linux-aio only does direct I/O (io_submit blocks otherwise).
FILE_DRIVERS = ["io_uring", "linux-aio", "posix-aio", "threads", "sync"]
CONFIGS = [(d, direct) for d in FILE_DRIVERS for direct in (False, True)
           if not (d == "linux-aio" and not direct)]
CONFIG_IDS = [f"{d}{'+direct' if direct else ''}" for d, direct in CONFIGS]

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "ERROR: ThreadSanitizer", "ERROR: UndefinedBehaviorSanitizer")

KiB = 1024
MiB = 1024 * 1024


def _find(*candidates):
    for c in candidates:
        p = BUILD / c
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


VDISK = _find("tools/vdisk", "vdisk")
VDISKD = _find("daemon/vdiskd", "vdiskd")
VDISK_IO = _find("tests/unit/vdisk-io", "tests/vdisk-io", "vdisk-io")


class Result:
    def __init__(self, args, proc):
        self.args = args
        self.rc = proc.returncode
        self.out = proc.stdout  # bytes
        self.err = proc.stderr.decode(errors="replace")

    @property
    def text(self):
        return self.out.decode(errors="replace")

    def __repr__(self):
        return (f"<{' '.join(map(str, self.args))!r} rc={self.rc}\n"
                f"stdout: {self.text[:2000]}\nstderr: {self.err[:2000]}>")


def run(args, timeout=60, expect_rc=None, input=None, env=None):
    """Run a command; fail on timeout, on death by signal, on a sanitizer
    report, and (when expect_rc is given) on any other exit status."""
    args = [str(a) for a in args]
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL if input is None else None,
                              input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}")
    r = Result(args, proc)
    assert r.rc >= 0, f"killed by signal {-r.rc}: {r!r}"
    for m in SANITIZER_MARKERS:
        assert m not in r.err, f"sanitizer report: {r!r}"
    if expect_rc is not None:
        assert r.rc == expect_rc, f"expected exit status {expect_rc}: {r!r}"
    return r


def vio(driver, path, *cmds, direct=False, read_only=False, sets=(), after_start=(),
        queue_size=None, iodepth=None, map_mem=False, expect_rc=0, timeout=60):
    """Run vdisk-io with one -c per command."""
    if VDISK_IO is None:
        pytest.skip(f"vdisk-io not built in {BUILD}")
    args = [VDISK_IO, f"--driver={driver}"]
    if path is not None:
        args.append(f"--path={path}")
    if direct:
        args.append("--direct")
    if read_only:
        args.append("--read-only")
    if map_mem:
        args.append("--map")
    for s in sets:
        args += ["--set", s]
    for s in after_start:
        args += ["--set-after-start", s]
    if queue_size is not None:
        args.append(f"--queue-size={queue_size}")
    if iodepth is not None:
        args.append(f"--iodepth={iodepth}")
    for c in cmds:
        args += ["-c", c]
    r = run(args, timeout=timeout, expect_rc=expect_rc)
    # stderr without the image path, so keyword checks cannot match the path itself
    # (pytest names tmp_path after the test, e.g. .../test_directory_0).
    r.msg = r.err.replace(str(path), "<path>") if path is not None else r.err
    return r


def qemu_io(path, *cmds, expect_rc=0, timeout=60):
    exe = shutil.which("qemu-io")
    if exe is None:
        pytest.skip("qemu-io not installed")
    args = [exe, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(path)
    return run(args, timeout=timeout, expect_rc=expect_rc)


def other_driver(driver):
    """A different driver to cross-check with."""
    return "threads" if driver == "sync" else "sync"


@pytest.fixture
def img(tmp_path):
    """An 8 MiB sparse raw image."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
    return p


@pytest.fixture
def vdisk_bin():
    if VDISK is None:
        pytest.skip(f"vdisk not built in {BUILD}")
    return VDISK


@pytest.fixture
def vdiskd_bin():
    if VDISKD is None:
        pytest.skip(f"vdiskd not built in {BUILD}")
    return VDISKD


@pytest.fixture
def unwritable_file(tmp_path):
    """A file that open(O_RDWR) refuses even for root: immutable (chattr +i)
    when root, mode 0444 otherwise.  Holds 64 KiB of 0x5a."""
    p = tmp_path / "locked.img"
    p.write_bytes(b"\x5a" * (64 * KiB))
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("chattr not installed")
        r = subprocess.run([chattr, "+i", str(p)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {r.stderr.decode().strip()}")
        yield p
        subprocess.run([chattr, "-i", str(p)], check=False)
    else:
        p.chmod(0o444)
        yield p


def file_bytes(path, off, length):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length)
