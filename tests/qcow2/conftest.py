# SPDX-License-Identifier: LGPL-2.1-or-later
"""Shared helpers for the qcow2 interop tests.

The tests drive qcow2-io (our block layer) and the real qemu-img / qemu-io
against the same files.  QCOW2_IO names the qcow2-io binary (meson sets it);
otherwise it is looked up in the usual build directories.
"""
import json
import os
import random
import shutil
import subprocess

import pytest


def _find_qcow2_io():
    env = os.environ.get("QCOW2_IO")
    if env:
        return env
    for d in ("/tmp/build-q2tree", "/tmp/build-qcow2", "build"):
        p = os.path.join(d, "tests", "qcow2", "qcow2-io")
        if os.path.exists(p):
            return p
    return None


QCOW2_IO = _find_qcow2_io()
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

pytestmark = pytest.mark.skipif(not (QCOW2_IO and QEMU_IMG and QEMU_IO),
                                reason="qcow2-io, qemu-img or qemu-io missing")


def run(args, check=True, env=None, timeout=300, input=None):
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run(args, capture_output=True, text=True, env=e, timeout=timeout, input=input)
    if p.returncode < 0:
        raise AssertionError("%s died of signal %d\nstderr: %s" % (args[0], -p.returncode, p.stderr))
    if "AddressSanitizer" in p.stderr or "runtime error:" in p.stderr:
        raise AssertionError("sanitizer report from %s:\n%s" % (args, p.stderr))
    if check and p.returncode != 0:
        raise AssertionError("%s failed (%d)\nstdout: %s\nstderr: %s" % (args, p.returncode, p.stdout, p.stderr))
    return p


def vio(image, *cmds, opts=(), check=True, env=None):
    """Run qcow2-io on image with the given commands."""
    args = [QCOW2_IO] + list(opts) + [image]
    for c in cmds:
        args += ["-c", c]
    return run(args, check=check, env=env)


def vcreate(path, size, opts=None, check=True):
    args = [QCOW2_IO, "--create", path, str(size)]
    if opts:
        args += ["-o", opts]
    return run(args, check=check)


def qimg(*args, check=True):
    return run([QEMU_IMG] + [str(a) for a in args], check=check)


def qio(image, *cmds, fmt="qcow2", check=True, extra=()):
    args = [QEMU_IO, "-f", fmt] + list(extra)
    for c in cmds:
        args += ["-c", c]
    p = run(args + [image], check=check)
    if check and ("fail" in p.stdout.lower() or "error" in p.stdout.lower()):
        raise AssertionError("qemu-io reported: %s" % p.stdout)
    return p


def qemu_check(image):
    """qemu-img check result as a dict (exit status 0/2/3 all give JSON)."""
    p = run([QEMU_IMG, "check", "--output=json", image], check=False)
    try:
        return json.loads(p.stdout)
    except ValueError:
        raise AssertionError("qemu-img check: %s %s" % (p.stdout, p.stderr))


def assert_clean(image, allow_leaks=False):
    r = qemu_check(image)
    assert r.get("corruptions", 0) == 0, r
    assert r.get("check-errors", 0) == 0, r
    if not allow_leaks:
        assert r.get("leaks", 0) == 0, r
    return r


def qemu_info(image):
    return json.loads(qimg("info", "--output=json", image).stdout)


def to_raw(image, out, fmt="qcow2", extra=()):
    qimg("convert", "-f", fmt, *extra, "-O", "raw", image, out)
    with open(out, "rb") as f:
        return f.read()


def our_dump(image, size, out, opts=()):
    vio(image, "dump 0 %d %s" % (size, out), opts=list(opts) + ["-r"])
    with open(out, "rb") as f:
        return f.read()


def first_diff(a, b):
    if len(a) != len(b):
        return "length %d != %d" % (len(a), len(b))
    for i in range(0, len(a), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            for j in range(i, min(i + 4096, len(a))):
                if a[j] != b[j]:
                    return "first difference at %d: %d != %d" % (j, a[j], b[j])
    return None


def assert_same(a, b):
    d = first_diff(a, b)
    assert d is None, d


class RawModel:
    """A byte-level model of what the guest should read back."""

    def __init__(self, size, base=None):
        self.data = bytearray(base if base is not None else bytes(size))
        if len(self.data) < size:
            self.data += bytes(size - len(self.data))
        del self.data[size:]

    def write(self, off, length, pat):
        self.data[off:off + length] = bytes([pat]) * length

    def zero(self, off, length):
        self.data[off:off + length] = bytes(length)

    def resize(self, size):
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data += bytes(size - len(self.data))


def random_ops(rng, size, n, granularity=512, with_zero=True, with_discard=False, max_len=None):
    """(op, off, len, pat) tuples inside [0, size)."""
    ops = []
    max_len = max_len or max(size // 8, granularity)
    for _ in range(n):
        length = rng.randrange(1, max_len // granularity + 1) * granularity
        if rng.random() < 0.3:
            length = rng.randrange(1, max_len)
        off = rng.randrange(0, max(size - length, 1))
        if rng.random() < 0.3:
            off -= off % granularity
        length = min(length, size - off)
        r = rng.random()
        if with_zero and r < 0.15:
            ops.append(("zero", off, length, 0))
        elif with_discard and r < 0.25:
            ops.append(("discard", off, length, 0))
        else:
            ops.append(("write", off, length, rng.randrange(1, 256)))
    return ops


@pytest.fixture
def tmp(tmp_path):
    return str(tmp_path)


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("QCOW2_TEST_SEED", "0")) or hash(request.node.name) & 0xffffffff
    return random.Random(seed)
