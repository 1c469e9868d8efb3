# SPDX-License-Identifier: GPL-2.0-or-later
"""Every image subcommand: --help, bad options, missing files, corrupt headers: a clear message, no crash."""
import os

import pytest

import qcow2util

COMMANDS = ["create", "info", "check", "convert", "map", "compare", "resize", "snapshot", "commit", "rebase",
            "measure", "amend"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(vdisk, cmd):
    for flag in ("--help", "-h"):
        r = vdisk(cmd, flag, check=0)
        assert r.out.startswith("Usage: vdisk %s" % cmd)
        assert "Exit status" in r.out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_option(vdisk, cmd):
    r = vdisk(cmd, "--no-such-option", "x")
    assert r.rc == 2
    assert r.err.startswith("vdisk %s: unrecognized option '--no-such-option'" % cmd)
    r = vdisk(cmd, "-Z", "x")
    assert r.rc == 2
    assert "invalid option -- 'Z'" in r.err


MISSING = {
    "info": ["missing.img"],
    "check": ["missing.img"],
    "convert": ["missing.img", "out.img"],
    "map": ["missing.img"],
    "compare": ["missing.img", "missing2.img"],
    "resize": ["missing.img", "1M"],
    "snapshot": ["-l", "missing.img"],
    "commit": ["missing.img"],
    "rebase": ["-u", "-b", "x", "-F", "raw", "missing.img"],
    "measure": ["-O", "qcow2", "missing.img"],
    "amend": ["-o", "lazy_refcounts=on", "missing.img"],
}


@pytest.mark.parametrize("cmd", sorted(MISSING))
def test_missing_file(vdisk, cmd):
    r = vdisk(cmd, *MISSING[cmd])
    assert r.rc in (1, 2), r  # compare: 2 is its error status
    assert r.rc >= 0  # not killed by a signal
    assert r.err.startswith("vdisk %s: Could not open 'missing.img'" % cmd), r.err
    assert "No such file" in r.err


@pytest.mark.parametrize("cmd", ["info", "map", "check", "compare", "convert", "snapshot", "measure"])
def test_corrupt_qcow2_header(vdisk, qemu_img, tmp_path, cmd, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "bad.qcow2", "1M")
    qcow2util.write_u32(tmp_path / "bad.qcow2", 20, 99)  # cluster_bits = 99
    args = {"compare": ["bad.qcow2", "bad.qcow2"], "convert": ["bad.qcow2", "o.raw"],
            "snapshot": ["-l", "bad.qcow2"], "measure": ["bad.qcow2"]}.get(cmd, ["bad.qcow2"])
    r = vdisk(cmd, *args)
    assert r.rc > 0, r
    assert r.err.startswith("vdisk %s: Could not open 'bad.qcow2'" % cmd), r.err


def test_truncated_qcow2(vdisk, qemu_img, tmp_path, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "t.qcow2", "1M")
    with open(tmp_path / "t.qcow2", "r+b") as f:
        f.truncate(40)
    r = vdisk("info", "-f", "qcow2", "t.qcow2")
    assert r.rc == 1 and r.err.startswith("vdisk info: Could not open 't.qcow2'")


def test_garbage_file_is_raw(vdisk, tmp_path):
    with open(tmp_path / "g.img", "wb") as f:
        f.write(os.urandom(4096))
    r = vdisk("info", "--output=json", "g.img", check=0)
    assert r.json()["format"] == "raw"


@pytest.mark.parametrize("cmd", ["info", "map", "check", "compare"])
def test_unknown_format(vdisk, qemu_img, cmd):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "1M")
    args = ["a.raw", "a.raw"] if cmd == "compare" else ["a.raw"]
    r = vdisk(cmd, "-f", "nosuchfmt", *args)
    assert r.rc in (1, 2)
    assert "Unknown file format 'nosuchfmt'" in r.err
