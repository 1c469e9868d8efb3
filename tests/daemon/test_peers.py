# SPDX-License-Identifier: GPL-2.0-or-later
"""Interoperability with real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio."""
import filecmp
import json
import os

import pytest

from conftest import MiB, make_raw, requires, run


@requires("nbdinfo")
def test_nbdinfo_list(raw_daemon):
    out = run(["nbdinfo", "--list", "--json", raw_daemon.uri()]).stdout
    info = json.loads(out)
    names = {e["export-name"]: e for e in info["exports"]}
    assert set(names) == {"r0", "ro"}
    assert names["r0"]["description"] == "raw disk"
    assert names["ro"]["is_read_only"] is True
    assert names["r0"]["export-size"] == 64 * MiB


@requires("nbdinfo")
def test_nbdinfo_map_raw(raw_daemon):
    out = run(["nbdinfo", "--map", "--json", raw_daemon.uri("r0")]).stdout
    m = json.loads(out)
    assert m[0] == {"offset": 0, "length": MiB, "type": 0, "description": "data"}
    assert any(e["offset"] == 16 * MiB and e["type"] == 0 for e in m)
    assert sum(e["length"] for e in m) == 64 * MiB


@requires("nbdinfo")
def test_nbdinfo_map_qcow2(qcow2_daemon):
    m = json.loads(run(["nbdinfo", "--map", "--json", qcow2_daemon.uri("q0")]).stdout)
    data = [(e["offset"], e["length"]) for e in m if e["type"] == 0]
    assert data == [(0, MiB), (8 * MiB, 512 * 1024)]
    depth = run(["nbdinfo", "--map=qemu:allocation-depth", qcow2_daemon.uri("q0")]).stdout.decode()
    assert "local" in depth and ("absent" in depth or "unallocated" in depth)


@requires("nbdinfo")
def test_nbdinfo_content(raw_daemon, tmp_path):
    out = run(["nbdinfo", "--content", raw_daemon.uri("r0")]).stdout.decode().strip()
    assert out  # `file` says something about random data


@requires("nbdcopy")
@pytest.mark.parametrize("fixture", ["raw_daemon", "qcow2_daemon"])
def test_nbdcopy_both_directions(fixture, request, tmp_path):
    d = request.getfixturevalue(fixture)
    name = "r0" if fixture == "raw_daemon" else "q0"
    src = make_raw(tmp_path / "src.bin", 64 * MiB)
    with open(src, "r+b") as f:
        f.seek(40 * MiB)
        f.write(os.urandom(3 * MiB))
    run(["nbdcopy", "--connections=4", str(src), d.uri(name)])
    back = tmp_path / "back.bin"
    run(["nbdcopy", "--connections=4", d.uri(name), str(back)])
    assert filecmp.cmp(src, back, shallow=False)


@requires("qemu-img")
def test_qemu_img_convert_and_compare(qcow2_daemon, tmp_path):
    src = make_raw(tmp_path / "src.raw", 64 * MiB)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), qcow2_daemon.uri("q0")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), qcow2_daemon.uri("q0")])
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", qcow2_daemon.uri("q0"), str(out)])
    run(["qemu-img", "compare", str(src), str(out)])
    qcow2_daemon.stop()
    run(["qemu-img", "check", str(qcow2_daemon.tmp / "disk.qcow2")])


@requires("qemu-io")
def test_qemu_io(raw_daemon):
    uri = raw_daemon.uri("r0")
    out = run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M",
               "-c", "write -z 4M 1M", "-c", "read -P 0 4M 1M", "-c", "discard 6M 1M",
               "-c", "aio_write -P 0x33 8M 64k", "-c", "aio_flush", "-c", "read -P 0x33 8M 64k",
               "-c", "flush", uri]).stdout.decode()
    assert "Pattern verification failed" not in out
    # Read-only export: writes fail.
    p = run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", raw_daemon.uri("ro")])
    assert b"read 4096/4096" in p.stdout


@requires("qemu-img")
def test_qemu_img_map_over_nbd(qcow2_daemon):
    out = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", qcow2_daemon.uri("q0")]).stdout)
    data = [(e["start"], e["length"]) for e in out if e["data"]]
    assert data == [(0, MiB), (8 * MiB, 512 * 1024)]


@requires("fio")
def test_fio_nbd_engine(raw_daemon, tmp_path):
    out = run(["fio", "--name=t", "--ioengine=nbd", f"--uri={raw_daemon.uri('r0')}", "--rw=randrw",
               "--bs=4k", "--iodepth=16", "--size=32M", "--time_based", "--runtime=1",
               "--output-format=json", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
               f"--directory={tmp_path}"], timeout=60).stdout
    job = json.loads(out[out.index(b"{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["total_ios"] + job["write"]["total_ios"] > 100
