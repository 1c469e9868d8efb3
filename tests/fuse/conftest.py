# SPDX-License-Identifier: GPL-2.0-or-later
"""
Fixtures for the FUSE export tests.  They reuse the daemon suite's fixtures
and helpers (tests/daemon/conftest.py: the daemon fixture, the control
client, run, requires, wait_for, image makers), loaded here under their own
module name, and add a daemon starter that mounts FUSE exports and never
leaves a mount behind: every mountpoint it hands out is lazily unmounted in
teardown if the daemon did not unmount it (a failed test, a killed daemon).

    VDISK_BUILD=/tmp/build /usr/bin/python3 -m pytest -q -n 3 tests/fuse

The suite needs /dev/fuse and root (vdiskd mounts with mount(2) directly;
as a regular user libfuse would need fusermount3).
"""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "vdisk_daemon_conftest", Path(__file__).resolve().parents[1] / "daemon" / "conftest.py")
_daemon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_daemon)

# Re-exported: fixtures (pytest finds them in this module) and helpers (tests import them from here).
daemon_factory = _daemon.daemon_factory
Daemon = _daemon.Daemon
QMPError = _daemon.QMPError
KiB, MiB = _daemon.KiB, _daemon.MiB
BUILD = _daemon.BUILD
have, requires, run, wait_for = _daemon.have, _daemon.requires, _daemon.run, _daemon.wait_for
make_raw, make_qcow2 = _daemon.make_raw, _daemon.make_qcow2
VDISK = BUILD / "tools" / "vdisk"
VDISKD_PATH = _daemon.VDISKD


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount(path):
    """Lazy unmount (works on a stale mount whose daemon is gone)."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, capture_output=True, timeout=20)
            if not is_mounted(path):
                return


def pytest_collection_modifyitems(config, items):
    reason = None
    if not os.path.exists("/dev/fuse"):
        reason = "needs /dev/fuse"
    elif os.geteuid() != 0 and not have("fusermount3"):
        reason = "needs root or fusermount3"
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


class Fuse:
    """Starts vdiskd with FUSE exports; tracks mountpoints and daemons for teardown."""

    def __init__(self, tmp_path, factory):
        self.tmp = Path(tmp_path)
        self.factory = factory
        self.mountpoints = []
        self.daemons = []

    def mountpoint(self, name="mnt"):
        p = self.tmp / name
        p.touch()
        self.mountpoints.append(p)
        return p

    def start(self, image, fmt="raw", export="writable=on", name="mnt", extra=()):
        """A daemon serving image (format fmt) as export e0 on a new mountpoint; returns (daemon, mountpoint)."""
        mnt = self.mountpoint(name)
        d = self.factory([
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", f"driver={fmt},node-name=n0,file=f0",
            *extra,
            "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={mnt},{export}",
        ], nbd=False)
        self.daemons.append(d)
        assert is_mounted(mnt), d.output()
        return d, mnt

    def cleanup(self):
        for d in self.daemons:
            if d.proc.poll() is None:
                d.stop()
        left = [p for p in self.mountpoints if is_mounted(p)]
        for p in left:
            unmount(p)
        return left


@pytest.fixture
def fuse(tmp_path, daemon_factory):
    f = Fuse(tmp_path, daemon_factory)
    yield f
    f.cleanup()
