# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bad input gives a clear message on stderr and exit status 1 (2 for usage
errors) -- never a crash, a hang or a silent success."""
import os

import pytest

from conftest import CONFIGS, CONFIG_IDS, FILE_DRIVERS, KiB, MiB, file_bytes, vio

cfg = pytest.mark.parametrize("driver,direct", CONFIGS, ids=CONFIG_IDS)


@cfg
def test_missing_file(tmp_path, driver, direct):
    missing = tmp_path / "nope.img"
    r = vio(driver, missing, "read 0 4k", direct=direct, expect_rc=1)
    assert str(missing) in r.err
    assert "No such file or directory" in r.msg
    assert not missing.exists()


@cfg
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_directory(tmp_path, driver, direct, read_only):
    d = tmp_path / "dir"
    d.mkdir()
    r = vio(driver, d, "read 0 4k", direct=direct, read_only=read_only, expect_rc=1)
    assert str(d) in r.err
    # (the path itself contains "directory": look at the rest of the message)
    assert "is a directory" in r.msg.lower(), r.err


@cfg
def test_not_a_file_or_block_device(driver, direct):
    r = vio(driver, "/dev/null", "read 0 4k", direct=direct, read_only=True, expect_rc=1)
    assert "/dev/null" in r.err


@cfg
def test_unwritable_file_needs_read_only(unwritable_file, driver, direct):
    # The file really refuses writers (also for root): otherwise this proves nothing.
    with pytest.raises(OSError):
        open(unwritable_file, "r+b").close()
    r = vio(driver, unwritable_file, "read -P 0x5a 0 4k", direct=direct, expect_rc=1)
    assert str(unwritable_file) in r.err
    assert "read-only" in r.msg  # the hint: set read-only=true
    # Read-only works for reading; writes, discards and zeroing fail per request.
    vio(driver, unwritable_file, "read -P 0x5a 0 64k", direct=direct, read_only=True)
    for cmd in ("write -P 1 0 4k", "discard 0 4k", "zero 0 4k"):
        r = vio(driver, unwritable_file, cmd, direct=direct, read_only=True, expect_rc=1)
        assert "read-only" in r.msg, r.err
    assert file_bytes(unwritable_file, 0, 64 * KiB) == b"\x5a" * (64 * KiB)


@pytest.mark.parametrize("driver,direct", [(d, d == "linux-aio") for d in FILE_DRIVERS], ids=FILE_DRIVERS)
@pytest.mark.parametrize("cmd", ["read 8m 4k", "write -P 1 8188k 8k", "discard 8m 4k", "zero 4m 8m",
                                 "read 18446744073709547520 4k"])
def test_past_capacity(img, driver, direct, cmd):
    r = vio(driver, img, cmd, direct=direct, expect_rc=1)
    assert "past capacity" in r.msg
    assert "8388608" in r.msg  # names the capacity
    assert os.path.getsize(img) == 8 * MiB
    assert file_bytes(img, 8188 * KiB, 4 * KiB) == b"\0" * (4 * KiB)


@pytest.mark.parametrize("driver", FILE_DRIVERS)
@pytest.mark.parametrize("cmd", ["read 1 4k", "read 0 1000", "write -P 1 512 100", "write -P 2 100 4k"])
def test_misaligned_direct_io(img, driver, cmd):
    r = vio(driver, img, cmd, direct=True, expect_rc=1)
    assert "alignment" in r.msg
    assert file_bytes(img, 0, 8 * KiB) == b"\0" * (8 * KiB)


def test_unknown_driver(img):
    r = vio("no-such-driver", img, "read 0 4k", expect_rc=1)
    assert "unknown driver 'no-such-driver'" in r.err


def test_property_set_in_the_wrong_state(img):
    r = vio("sync", img, "read 0 4k", after_start=["queue-size=8"], expect_rc=1)
    assert "queue-size" in r.msg
    assert "started" in r.msg
    r = vio("sync", img, "read 0 4k", after_start=["path=/tmp/x"], expect_rc=1)
    assert "'path'" in r.msg
    # Read-only property.
    r = vio("sync", img, "read 0 4k", sets=["capacity=4096"], expect_rc=1)
    assert "capacity" in r.msg and "read-only" in r.msg


def test_property_errors(img):
    r = vio("sync", img, "read 0 4k", sets=["no-such-prop=1"], expect_rc=1)
    assert "unknown property 'no-such-prop'" in r.msg
    r = vio("sync", img, "read 0 4k", sets=["queue-size=0"], expect_rc=1)
    assert "queue-size" in r.msg and "65536" in r.msg
    r = vio("sync", img, "read 0 4k", sets=["num-queues=1000"], expect_rc=1)
    assert "num-queues" in r.msg and "max-queues" in r.msg
    r = vio("sync", img, "read 0 4k", sets=["direct=banana"], expect_rc=1)
    assert "direct" in r.msg
    # Properties that are fine are applied in the state they need.
    r = vio("sync", img, "info", sets=["num-queues=3", "queue-size=9"])
    assert "num-queues=3\n" in r.text and "queue-size=9\n" in r.text


@pytest.mark.parametrize("args", [
    ["-c", "frobnicate 0 4k"],
    ["-c", "read 0"],
    ["-c", "read -P 0x1ff 0 4k"],
    ["-c", "read 0 4q"],
    ["-c", "write -Z 0 4k"],
    [],
    ["--bogus-option", "-c", "info"],
])
def test_usage_errors_exit_2(img, args):
    from conftest import VDISK_IO, run
    if VDISK_IO is None:
        pytest.skip("vdisk-io not built")
    r = run([VDISK_IO, "--driver=sync", f"--path={img}", *args], expect_rc=2)
    assert r.err.strip(), "usage error without a message"
    assert file_bytes(img, 0, 4 * KiB) == b"\0" * (4 * KiB)


def test_info_reports_limits(img):
    r = vio("sync", img, "info", direct=True)
    info = dict(line.split("=", 1) for line in r.text.splitlines())
    assert info["driver"] == "sync"
    assert info["capacity"] == str(8 * MiB)
    assert info["direct"] == "true"
    assert int(info["request-alignment"]) >= 512
    assert int(info["buf-alignment"]) >= 1
