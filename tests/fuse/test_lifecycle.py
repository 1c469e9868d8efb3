# SPDX-License-Identifier: GPL-2.0-or-later
"""FUSE export lifecycle: mounting, unmounting on block-export-del and on
shutdown, stale mounts of a killed daemon, option errors."""
import errno
import os
import signal

import pytest

from conftest import MiB, QMPError, VDISKD_PATH, is_mounted, make_raw, run, wait_for


@pytest.fixture
def raw(tmp_path):
    return make_raw(tmp_path / "disk.raw", size=8 * MiB)


def test_export_del_unmounts_and_add_again(fuse, raw):
    d, mnt = fuse.start(raw)
    exports = d.qmp("query-block-exports")
    assert exports[0]["type"] == "fuse" and exports[0]["mountpoint"] == str(mnt)
    fd = os.open(mnt, os.O_RDONLY)  # an open file does not keep the export alive
    try:
        d.qmp("block-export-del", id="e0")
        d.ctl.wait_event("BLOCK_EXPORT_DELETED")
        assert not is_mounted(mnt)
        assert os.stat(mnt).st_size == 0  # the plain file it was
        with pytest.raises(OSError):
            os.pread(fd, 4096, 0)
    finally:
        try:
            os.close(fd)  # the flush on close fails: the connection is gone
        except OSError as e:
            assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    d.qmp("block-export-add", type="fuse", id="e1", node_name="n0", mountpoint=str(mnt), writable=False)
    assert is_mounted(mnt) and os.stat(mnt).st_size == 8 * MiB
    assert d.qmp("query-block-exports")[0]["writable"] is False


def test_shutdown_unmounts(fuse, raw):
    d, mnt = fuse.start(raw)
    with open(mnt, "rb") as f:
        assert f.read(4096) == open(raw, "rb").read(4096)
    out = d.stop(signal.SIGTERM)
    assert "unmounted" in out
    assert not is_mounted(mnt)


def test_stale_mount_detected(fuse, raw):
    d, mnt = fuse.start(raw)
    d.proc.kill()
    d.proc.wait(timeout=20)
    with pytest.raises(OSError) as e:
        os.stat(mnt)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the latter: Linux >= 6.x
    p = run([VDISKD_PATH, "--blockdev", f"driver=file,node-name=f0,filename={raw}",
             "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={mnt}"], check=False)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "stale FUSE mount" in err and str(mnt) in err
    # teardown unmounts it (umount -l)


def test_bad_options(fuse, raw, tmp_path):
    d, mnt = fuse.start(raw)
    (tmp_path / "dir").mkdir()
    cases = [
        ({}, "mountpoint"),
        ({"mountpoint": str(tmp_path / "dir")}, "is a directory"),
        ({"mountpoint": str(tmp_path / "nonexistent")}, "No such file or directory"),
        ({"mountpoint": str(mnt)}, "already used by FUSE export 'e0'"),
        ({"mountpoint": str(tmp_path / "x"), "allow-other": "maybe"}, "allow-other"),
        ({"mountpoint": str(tmp_path / "x"), "growable": True}, "growable=on needs writable=on"),
        ({"mountpoint": str(tmp_path / "x"), "name": "n"}, "invalid parameter 'name'"),
    ]
    (tmp_path / "x").touch()
    for args, msg in cases:
        with pytest.raises(QMPError) as e:
            d.qmp("block-export-add", type="fuse", id="e9", node_name="n0", **args)
        assert msg in e.value.desc, (args, e.value.desc)
    assert [e["id"] for e in d.qmp("query-block-exports")] == ["e0"]
    # The same errors on the command line: exit status 1 and the message.
    p = run([VDISKD_PATH, "--blockdev", f"driver=file,node-name=f0,filename={raw}",
             "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={tmp_path / 'dir'}"], check=False)
    assert p.returncode == 1 and b"is a directory" in p.stderr


def test_writable_on_read_only_node_refused(fuse, raw, tmp_path):
    mnt = fuse.mountpoint("m2")
    d = fuse.factory(["--blockdev", f"driver=file,node-name=f0,filename={raw},read-only=on"], nbd=False)
    with pytest.raises(QMPError) as e:
        d.qmp("block-export-add", type="fuse", id="e0", node_name="f0", mountpoint=str(mnt), writable=True)
    assert "read-only" in e.value.desc
    assert not is_mounted(mnt)


def test_allow_other(fuse, raw):
    for i, (opt, want) in enumerate([("on", True), ("off", False), ("auto", True)]):
        d, mnt = fuse.start(raw, export=f"allow-other={opt}", name=f"m{i}")
        info = d.qmp("query-block-exports")[0]
        # As root allow_other always works, so auto picks it.
        assert info["allow-other"] is want
        opts = [line.split()[-1] for line in open("/proc/self/mountinfo") if line.split()[4] == str(mnt)][0]
        assert ("allow_other" in opts) is want
        d.stop()


def test_unmounted_behind_our_back(fuse, raw):
    d, mnt = fuse.start(raw)
    os.stat(mnt)
    run(["umount", "-l", mnt])
    wait_for(lambda: "kernel connection" in d.output(), what="the daemon noticing the unmount")
    assert d.qmp("query-stats", target="export")["exports"][0]["mounted"] is False
    d.qmp("block-export-del", id="e0")
    assert not is_mounted(mnt) and os.stat(mnt).st_size == 0
