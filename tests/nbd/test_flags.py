# SPDX-License-Identifier: LGPL-2.1-or-later
"""
Request flags and optional commands: what goes on the wire is read back from
nbdkit's log filter, one NBD command per line, e.g.
  connection=1 Zero id=3 offset=0x0 count=0x10000 trim=1 fua=0 fast=1 ...
"""
import re

from conftest import info, on


def commands(log):
    """The NBD commands the server saw: [(name, {field: value})]."""
    out = []
    for line in log.read_text().splitlines():
        m = re.search(r"connection=\d+ (Read|Write|Flush|Trim|Zero|Cache|Extents) id=\d+ ?(.*?) \.\.\.$", line)
        if m:
            out.append((m.group(1), dict(kv.split("=", 1) for kv in m.group(2).split())))
    return out


def names(log):
    return [c[0] for c in commands(log)]


def logged(nbdkit, tmp_path, *args, filters=()):
    log = tmp_path / "nbd.log"
    s = nbdkit(*args, f"logfile={log}", filters=["log", *filters])
    return s, log


def test_fua_write_uses_fua_flag(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "1M")
    io(on(s), "write -F -P 1 0 4k", "write -P 2 4k 4k")
    (w1, f1), (w2, f2) = commands(log)
    assert (w1, f1["fua"], w2, f2["fua"]) == ("Write", "1", "Write", "0")


def test_fua_without_server_fua_is_write_then_flush(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "1M", filters=["fua"])  # default: no FUA advertised
    assert info(io(on(s), "info"))["can-fua"] == "false"
    io(on(s), "write -F -P 1 0 4k", "read -P 1 0 4k")
    cmds = commands(log)
    assert [c[0] for c in cmds] == ["Write", "Flush", "Read"]
    assert cmds[0][1]["fua"] == "0"


def test_write_zeroes_flag_mapping(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "1M")
    io(on(s), "write -P 0xff 0 1m", "zero 0 64k", "zero -u 64k 64k", "zero -n 128k 64k", "zero -F 192k 64k",
       "read -P 0 0 256k", "read -P 0xff 256k 768k")
    z = [f for n, f in commands(log) if n == "Zero"]
    assert [(f["trim"], f["fast"], f["fua"]) for f in z] == [("1", "0", "0"),  # may punch a hole
                                                            ("0", "0", "0"),  # NO_UNMAP -> NO_HOLE
                                                            ("1", "1", "0"),  # NO_FALLBACK -> FAST_ZERO
                                                            ("1", "0", "1")]  # FUA


def test_no_fallback_without_fast_zero_is_enotsup(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "1M", "zeromode=plugin", "fastzeromode=none", filters=["nozero"])
    i = info(io(on(s), "info"))
    assert (i["can-zero"], i["can-fast-zero"]) == ("true", "false")
    p = io(on(s), "zero -n 0 64k", check=1)
    assert "cannot promise fast zeroing (NO_FALLBACK)" in p.stderr and "Operation not supported" in p.stderr
    io(on(s), "zero 0 64k")
    assert names(log) == ["Zero"]  # the refused one never reached the server


def test_server_refusing_fast_zero_is_enotsup(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "1M", "zeromode=plugin", "fastzeromode=slow", filters=["nozero"])
    p = io(on(s), "zero -n 0 64k", check=1)
    assert "cannot zero this range fast" in p.stderr and "Operation not supported" in p.stderr


def test_write_zeroes_without_server_support_writes_zeroes(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "16M", "zeromode=none", filters=["nozero"])
    assert info(io(on(s), "info"))["can-zero"] == "false"
    io(on(s), "write -P 0x55 0 16m", "zero 1m 10m", "zero -u -F 0 4k", "read -P 0 1m 10m", "read -P 0x55 11m 5m",
       "read -P 0 0 4k")
    cmds = commands(log)
    assert "Zero" not in names(log)
    writes = [f for n, f in cmds if n == "Write"][1:]
    assert sum(int(f["count"], 16) for f in writes) == (10 << 20) + 4096
    assert writes[-1]["fua"] == "1" and "Flush" not in names(log)  # FUA carried by the zero-buffer write
    p = io(on(s), "zero -n 0 4k", check=1)
    assert "does not support write-zeroes (NO_FALLBACK)" in p.stderr


def test_discard_splits_past_32_bits(nbdkit, io, tmp_path):
    s, log = logged(nbdkit, tmp_path, "memory", "5G")
    io(on(s), "discard 0 5g", "zero 0 5g")
    trims = [f for n, f in commands(log) if n == "Trim"]
    zeros = [f for n, f in commands(log) if n == "Zero"]
    for cmds in (trims, zeros):
        assert sum(int(f["count"], 16) for f in cmds) == 5 << 30
        assert all(int(f["count"], 16) <= 1 << 30 for f in cmds)
        assert sorted(int(f["offset"], 16) for f in cmds) == [i << 30 for i in range(5)]


def test_discard_without_trim_is_enotsup(nbdkit, io, tmp_path):
    # A plugin without a trim callback: the server does not advertise TRIM.
    log = tmp_path / "nbd.log"
    s = nbdkit("eval", "get_size=echo 1048576", "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
               "pwrite=cat >/dev/null", f"logfile={log}", filters=["log"])
    i = info(io(on(s), "info"))
    assert i["can-trim"] == "false" and i["can-flush"] == "false"
    p = io(on(s), "discard 0 64k", check=1)
    assert "does not support trim" in p.stderr and "Operation not supported" in p.stderr
    # No FLUSH on the server: flush succeeds without a command, FUA is a plain write.
    io(on(s), "flush", "write -F -P 0 0 4k")
    assert names(log) == ["Write"]


def test_discard_reads_back_zero(nbdkit, io):
    s = nbdkit("memory", "4M")
    io(on(s), "write -P 0x44 0 4m", "discard 1m 1m", "read -P 0 1m 1m", "read -P 0x44 0 1m", "read -P 0x44 2m 2m")
