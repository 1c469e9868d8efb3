# SPDX-License-Identifier: GPL-2.0-or-later
"""Smoke tests of `vdisk bench` through the block layer (--image).

Drives the vdisk binary of $VDISK_BUILD (default <source>/build): runs that
are short (a second at most), each proving one thing about the block-layer
path, its options and --count.  Works the same with a sanitizer build (a
sanitizer report fails the test).  qcow2 cases are skipped when the build
has no qcow2 or qemu-img is missing.

    VDISK_BUILD=/tmp/build pytest-3 -v tests/bench
"""
import json
import os
import pathlib
import shutil
import subprocess

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("VDISK_BUILD", SRC / "build")).resolve()
VDISK = BUILD / "tools" / "vdisk"
QEMU_IMG = shutil.which("qemu-img")

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "ERROR: UndefinedBehaviorSanitizer")

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="session", autouse=True)
def vdisk_binary():
    if not (VDISK.is_file() and os.access(VDISK, os.X_OK)):
        pytest.fail(f"vdisk not built at {VDISK} (build it, or set VDISK_BUILD)")


def bench(*args, rc=0, timeout=60):
    """Run `vdisk bench ARGS`; check the exit status and that no sanitizer spoke."""
    cmd = [str(VDISK), "bench", *map(str, args)]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {cmd}\n{p.stderr}"
    for m in SANITIZER_MARKERS:
        assert m not in p.stderr, f"sanitizer report from {cmd}:\n{p.stderr}"
    assert p.returncode == rc, f"{cmd}: exit {p.returncode}, expected {rc}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def bench_json(*args):
    p = bench(*args, "--output=json")
    return json.loads(p.stdout)


def make_raw(path, size, data=True):
    """A raw image: random data (reads hit real blocks) or zeroes (sparse)."""
    with open(path, "wb") as f:
        if data:
            f.write(os.urandom(size))
        else:
            f.truncate(size)
    return path


@pytest.fixture
def raw(tmp_path):
    return make_raw(tmp_path / "disk.raw", 16 * MiB)


@pytest.fixture
def zero_raw(tmp_path):
    return make_raw(tmp_path / "zero.raw", 16 * MiB, data=False)


def has_qcow2():
    """Without qcow2 in the build, --format=qcow2 is a usage error naming --format."""
    p = subprocess.run([str(VDISK), "bench", "--image=/nonexistent", "--format=qcow2"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return "invalid --format" not in p.stderr


def test_raw_cache_none_runtime_has_iops(raw):
    r = bench_json(f"--image={raw}", "--format=raw", "--cache=none", "--runtime=1")
    assert r["iops"] > 0 and r["ios"] > 0
    assert r["layer"] == "block" and r["format"] == "raw" and r["cache"] == "none"
    assert r["driver"] == "io_uring" and r["aio"] == "io_uring"
    assert r["direct"] is True and r["size"] == 16 * MiB
    assert r["lat_ns"]["p50"] > 0 and r["interrupted"] is False
    # The same keys as the driver path (plus the block layer's own).
    d = bench_json("--driver=null", "--size=16M", "--runtime=100ms")
    assert set(d) - {"path"} <= set(r)


def test_probed_format_is_raw(raw):
    r = bench_json(f"--image={raw}", "--runtime=200ms", "--iodepth=4")
    assert r["format"] == "raw" and r["cache"] == "writeback" and r["direct"] is False


@pytest.mark.parametrize("aio,cache", [("io_uring", "writeback"), ("native", "none"), ("threads", "writethrough"),
                                       ("sync", "directsync"), ("io_uring", "unsafe")])
def test_aio_and_cache_modes(raw, aio, cache):
    r = bench_json(f"--image={raw}", "--format=raw", f"--cache={cache}", f"--aio={aio}", "--rw=randrw",
                   "--iodepth=8", "--count=500")
    assert r["ios"] == 500
    assert r["driver"] == {"native": "linux-aio"}.get(aio, aio)
    # raw passes each request through to the file once; writethrough and
    # directsync flush after every write, the other modes never (unsafe drops them).
    ops = r["file_ops"]
    assert ops["read"] + ops["write"] == 500
    assert ops["flush"] == (ops["write"] if cache in ("writethrough", "directsync") else 0)


def test_count_stops_after_n_requests(raw):
    r = bench_json(f"--image={raw}", "--format=raw", "--rw=read", "--iodepth=32", "--count=1000")
    assert r["ios"] == 1000 and r["count"] == 1000
    assert r["iops"] > 0 and r["runtime_ns"] > 0
    # Fewer requests than the queue depth: only that many are issued.
    r = bench_json(f"--image={raw}", "--format=raw", "--iodepth=32", "--count=5")
    assert r["ios"] == 5


def test_count_on_the_driver_path_splits_between_jobs():
    r = bench_json("--driver=null", "--size=16M", "--numjobs=3", "--iodepth=4", "--count=10001")
    assert r["ios"] == 10001 and r["layer"] == "driver"


def test_count_with_runtime_cap(raw):
    r = bench_json(f"--image={raw}", "--format=raw", "--count=1g", "--runtime=200ms", "--iodepth=4")
    assert 0 < r["ios"] < 1 << 30 and r["runtime_ns"] <= 400_000_000


@pytest.mark.parametrize("option,value", [("cache", "bogus"), ("aio", "bogus"), ("format", "bogus"),
                                          ("format", "file")])
def test_bad_values_exit_2_naming_the_option(raw, option, value):
    p = bench(f"--image={raw}", f"--{option}={value}", rc=2)
    assert f"--{option}" in p.stderr and value in p.stderr


@pytest.mark.parametrize("args,named", [
    (["--numjobs=2"], "--numjobs"),
    (["--direct=1"], "--direct"),
    (["--aio=native", "--cache=writeback"], "--aio=native"),
    (["--driver=io_uring"], "--driver"),
    (["--count=0"], "--count"),
    (["--count=10", "--ramp=1"], "--ramp"),
])
def test_refused_combinations(raw, args, named):
    p = bench(f"--image={raw}", *args, rc=2)
    assert named in p.stderr


def test_block_options_need_image():
    p = bench("--driver=null", "--cache=none", rc=2)
    assert "--cache" in p.stderr


def test_missing_image_for_reads_is_runtime_error(tmp_path):
    p = bench(f"--image={tmp_path / 'nope.raw'}", "--runtime=100ms", rc=1)
    assert "nope.raw" in p.stderr


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_write_leaves_data_in_the_file(zero_raw, cache):
    r = bench_json(f"--image={zero_raw}", "--format=raw", f"--cache={cache}", "--rw=write", "--bs=64k",
                   "--iodepth=8", "--count=64")
    assert r["ios"] == 64
    assert r["file_ops"]["write"] == 64 and r["file_ops"]["write_bytes"] == 64 * 64 * KiB
    data = zero_raw.read_bytes()
    written = 64 * 64 * KiB
    for off in range(0, written, 64 * KiB):
        assert data[off:off + 64 * KiB].count(0) < 1024, f"64k block at {off} was not written"
    assert data[written:] == bytes(len(data) - written)


def test_stride_writes_every_step(zero_raw):
    # 4k writes 1M apart: 16 of them cover every 1M step of the 16M file once.
    bench_json(f"--image={zero_raw}", "--format=raw", "--rw=write", "--bs=4k", "--stride=1M", "--count=16",
               "--iodepth=4")
    data = zero_raw.read_bytes()
    for step in range(16):
        off = step * MiB
        assert data[off:off + 4 * KiB].count(0) < 64, f"no data at {off}"
        assert data[off + 4 * KiB:off + MiB] == bytes(MiB - 4 * KiB), f"data between steps after {off}"


def test_write_creates_a_missing_image(tmp_path):
    img = tmp_path / "new.raw"
    p = bench(f"--image={img}", "--size=4M", "--rw=randwrite", "--count=100", "--output=json")
    assert img.stat().st_size == 4 * MiB and "created" in p.stderr
    assert json.loads(p.stdout)["ios"] == 100


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_qcow2_write_then_qemu_reads_it(tmp_path, cache):
    # Every write allocates a cluster: with O_DIRECT it is written whole
    # (data + zero copy-on-write), through the page cache the cluster is
    # zeroed with fallocate and only the data written.  Either way the rest
    # of each cluster must read as zeroes.
    if not has_qcow2():
        pytest.skip("this build has no qcow2 format")
    img = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(img), "16M"],
                   check=True)
    r = bench_json(f"--image={img}", f"--cache={cache}", "--rw=write", "--bs=4k", "--stride=64k", "--iodepth=16",
                   "--count=256")
    assert r["format"] == "qcow2" and r["ios"] == 256
    chk = subprocess.run([QEMU_IMG, "check", str(img)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert chk.returncode == 0, chk.stdout
    out = tmp_path / "out.raw"
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)], check=True)
    data = out.read_bytes()
    for n in range(256):
        off = n * 64 * KiB
        assert data[off:off + 4 * KiB].count(0) < 64, f"no data at {off}"
        assert data[off + 4 * KiB:off + 64 * KiB] == bytes(60 * KiB), f"not zero after the data at {off}"
    r = bench_json(f"--image={img}", f"--cache={cache}", "--rw=read", "--stride=64k", "--iodepth=16", "--count=256")
    assert r["format"] == "qcow2" and r["ios"] == 256
