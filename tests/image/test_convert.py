# SPDX-License-Identifier: GPL-2.0-or-later
"""vdisk convert, cross-checked with qemu-img compare / check / map."""
import os

import pytest


@pytest.fixture
def raw_src(qemu_img, qemu_io):
    """8 MiB raw: data, a written run of zeroes (allocated in the file), holes."""
    qemu_img("create", "-q", "-f", "raw", "src.raw", "8M")
    qemu_io("src.raw", "write -P 0x11 0 64k", "write -P 0x22 1M 1M", "write -P 0 3M 1M",
            "write -P 0x33 6M 4k", "write -P 0x44 8388096 512", fmt="raw")
    return "src.raw"


@pytest.fixture
def qcow2_chain(qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "32M")
    qemu_io("base.qcow2", "write -P 0xaa 0 2M", "write -P 0xab 10M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0xbb 1M 64k", "write -z 10M 64k", "write -P 0xbc 20M 1M")
    return "top.qcow2"


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_convert_raw_to_raw_sparse(vdisk, qemu_img, raw_src, tmp_path):
    vdisk("convert", "-O", "raw", raw_src, "out.raw", check=0)
    qemu_img("compare", raw_src, "out.raw")
    # the written zeroes (1 MiB at 3M) are not written to the target
    assert allocated_bytes(tmp_path / "out.raw") < allocated_bytes(tmp_path / raw_src)
    entries = qemu_img("map", "--output=json", "out.raw").json()
    zero_at_3m = [e for e in entries if e["start"] <= 3 << 20 < e["start"] + e["length"]]
    assert zero_at_3m and zero_at_3m[0]["zero"]


def test_convert_sparse_size_zero_allocates_everything(vdisk, qemu_img, raw_src, tmp_path):
    vdisk("convert", "-S", "0", "-O", "raw", raw_src, "full.raw", check=0)
    qemu_img("compare", raw_src, "full.raw")
    assert allocated_bytes(tmp_path / "full.raw") >= 8 << 20


def test_convert_qcow2_chain_to_raw(vdisk, qemu_img, qcow2_chain, qcow2_read):
    vdisk("convert", "-O", "raw", qcow2_chain, "flat.raw", check=0)
    qemu_img("compare", qcow2_chain, "flat.raw")
    qemu_img("compare", "-s", "flat.raw", "flat.raw")


def test_convert_raw_to_qcow2(vdisk, qemu_img, raw_src, tmp_path, qcow2_write):
    vdisk("convert", "-O", "qcow2", raw_src, "out.qcow2", check=0)
    qemu_img("check", "out.qcow2")
    qemu_img("compare", raw_src, "out.qcow2")
    info = qemu_img("info", "--output=json", "out.qcow2").json()
    assert info["virtual-size"] == 8 << 20
    # holes and the zero run stay unallocated
    for e in qemu_img("map", "--output=json", "out.qcow2").json():
        if e["start"] >= 3 << 20 and e["start"] + e["length"] <= 4 << 20:
            assert not e["data"]


def test_convert_options(vdisk, qemu_img, raw_src, qcow2_write):
    vdisk("convert", "-O", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", raw_src, "o.qcow2", check=0)
    qemu_img("check", "o.qcow2")
    qemu_img("compare", raw_src, "o.qcow2")
    info = qemu_img("info", "--output=json", "o.qcow2").json()
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["lazy-refcounts"] is True


def test_convert_qcow2_to_qcow2_with_backing_chain(vdisk, qemu_img, qcow2_chain, qcow2_write):
    vdisk("convert", "-O", "qcow2", qcow2_chain, "flat.qcow2", check=0)
    qemu_img("check", "flat.qcow2")
    qemu_img("compare", qcow2_chain, "flat.qcow2")
    assert "backing-filename" not in qemu_img("info", "--output=json", "flat.qcow2").json()


@pytest.mark.parametrize("flag", ["-B", "-b"])
def test_convert_with_backing(vdisk, qemu_img, qcow2_chain, qcow2_write, flag):
    vdisk("convert", "-O", "qcow2", flag, "base.qcow2", "-F", "qcow2", qcow2_chain, "ov.qcow2", check=0)
    qemu_img("check", "ov.qcow2")
    info = qemu_img("info", "--output=json", "ov.qcow2").json()
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    qemu_img("compare", qcow2_chain, "ov.qcow2")
    # only the source's top layer was copied: the base's 0..1M is not in the overlay
    for e in qemu_img("map", "--output=json", "ov.qcow2").json():
        if e["start"] < 1 << 20:
            assert e["depth"] == 1


def test_convert_compressed(vdisk, qemu_img, raw_src, qcow2_write):
    vdisk("convert", "-c", "-O", "qcow2", raw_src, "z.qcow2", check=0)
    check = qemu_img("check", "--output=json", "z.qcow2").json()
    assert check.get("compressed-clusters", 0) > 0
    qemu_img("compare", raw_src, "z.qcow2")


def test_convert_compressed_needs_qcow2(vdisk, raw_src):
    r = vdisk("convert", "-c", "-O", "raw", raw_src, "z.raw")
    assert r.rc == 1
    assert "Compression not supported" in r.err


@pytest.mark.parametrize("args", [["-W"], ["-W", "-m", "16"], ["-m", "1"], ["-m", "3", "-W", "-S", "64k"]])
def test_convert_parallel(vdisk, qemu_img, qemu_io, args, qcow2_read):
    qemu_img("create", "-q", "-f", "qcow2", "big.qcow2", "96M")
    cmds = ["write -P %d %dM 700k" % (i + 1, i * 3) for i in range(30)]
    qemu_io("big.qcow2", *cmds)
    vdisk("convert", *args, "-O", "raw", "big.qcow2", "big.raw", check=0)
    qemu_img("compare", "big.qcow2", "big.raw")


def test_convert_progress(vdisk, qemu_img, raw_src):
    r = vdisk("convert", "-p", "-O", "raw", raw_src, "p.raw", check=0)
    assert "(100.00/100%)" in r.out
    qemu_img("compare", raw_src, "p.raw")


def test_convert_concatenate(vdisk, qemu_img, qemu_io):
    qemu_img("create", "-q", "-f", "raw", "a.raw", "1M")
    qemu_img("create", "-q", "-f", "raw", "b.raw", "2M")
    qemu_io("a.raw", "write -P 0xa 0 1M", fmt="raw")
    qemu_io("b.raw", "write -P 0xb 512k 1M", fmt="raw")
    vdisk("convert", "-O", "raw", "a.raw", "b.raw", "ab.raw", check=0)
    qemu_img("convert", "-O", "raw", "a.raw", "b.raw", "ab-qemu.raw")
    qemu_img("compare", "-s", "ab.raw", "ab-qemu.raw")


def test_convert_no_create(vdisk, qemu_img, raw_src, tmp_path):
    qemu_img("create", "-q", "-f", "raw", "pre.raw", "16M")
    vdisk("convert", "-n", "-O", "raw", raw_src, "pre.raw", check=0)
    assert os.path.getsize(tmp_path / "pre.raw") == 16 << 20
    qemu_img("compare", raw_src, "pre.raw")  # the extra 8M read as zero


def test_convert_no_create_target_too_small(vdisk, qemu_img, raw_src):
    qemu_img("create", "-q", "-f", "raw", "small.raw", "1M")
    r = vdisk("convert", "-n", raw_src, "small.raw")
    assert r.rc == 1
    assert "smaller than input" in r.err


def test_convert_target_is_zero(vdisk, qemu_img, raw_src):
    qemu_img("create", "-q", "-f", "raw", "z.raw", "8M")
    vdisk("convert", "-n", "--target-is-zero", "-O", "raw", raw_src, "z.raw", check=0)
    qemu_img("compare", raw_src, "z.raw")
    r = vdisk("convert", "--target-is-zero", raw_src, "zz.raw")
    assert r.rc == 2
    assert "requires use of -n" in r.err


def test_convert_cache_modes(vdisk, qemu_img, raw_src):
    vdisk("convert", "-t", "none", "-T", "none", "-O", "raw", raw_src, "d.raw", check=0)
    qemu_img("compare", raw_src, "d.raw")
    r = vdisk("convert", "-t", "bogus", raw_src, "e.raw")
    assert r.rc == 2
    assert "Invalid cache option" in r.err


def test_convert_errors(vdisk, raw_src, tmp_path):
    r = vdisk("convert", "-O", "raw", "missing.raw", "out.raw")
    assert r.rc == 1 and r.err.startswith("vdisk convert: Could not open 'missing.raw'")
    r = vdisk("convert", "-O", "nosuchfmt", raw_src, "out.x")
    assert r.rc == 1 and "Unknown file format 'nosuchfmt'" in r.err
    r = vdisk("convert", "-O", "raw", "-o", "bogus=1", raw_src, "out.raw")
    assert r.rc == 1 and "Invalid parameter 'bogus'" in r.err
    r = vdisk("convert", "-m", "17", raw_src, "out.raw")
    assert r.rc == 2
    r = vdisk("convert", "-S", "1000", raw_src, "out.raw")
    assert r.rc == 2
    r = vdisk("convert", raw_src)
    assert r.rc == 2


def alloc_map(qemu_img, path, cluster_level=False):
    """qemu-img map as (start, length, data, zero, present).  cluster_level: the qcow2 allocation only -- a
    data cluster whose untouched part is a hole in the host file (we leave never-used bytes unwritten)
    counts as data, like one qemu-img fills with zeroes."""
    out = []
    for e in qemu_img("map", "--output=json", path).json():
        row = [e["start"], e["length"], e["data"], e["zero"] and not (cluster_level and e["data"]), e["present"]]
        if out and out[-1][2:] == row[2:] and out[-1][0] + out[-1][1] == row[0]:
            out[-1][1] += row[1]
        else:
            out.append(row)
    return [tuple(r) for r in out]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("sparse", [None, "0", "512", "8k", "64k"])
def test_convert_allocation_matches_qemu(vdisk, qemu_img, qemu_io, fmt, sparse, _qcow2_caps):
    """The target is as sparse as qemu-img convert makes it (same ranges data / zero)."""
    if fmt == "qcow2" and not _qcow2_caps["write"]:
        pytest.xfail("the block layer has no qcow2 format yet")
    qemu_img("create", "-q", "-f", "raw", "s.raw", "8M")
    qemu_io("s.raw", "write -P 0x11 0 64k", "write -P 0x22 1M 1M", "write -P 0 3M 1M", "write -P 0x33 6M 4k",
            "write -P 0 5M 6k", "write -P 9 5128k 1k", "write -P 0 7M 3k", "write -P 8 7171k 1k",
            "write -P 0x44 8388096 512", fmt="raw")
    extra = ["-S", sparse] if sparse is not None else []
    vdisk("convert", *extra, "-O", fmt, "s.raw", "v." + fmt, check=0)
    qemu_img("convert", *extra, "-O", fmt, "s.raw", "q." + fmt)
    qemu_img("compare", "s.raw", "v." + fmt)
    level = fmt == "qcow2"
    assert alloc_map(qemu_img, "v." + fmt, level) == alloc_map(qemu_img, "q." + fmt, level)


@pytest.fixture
def mixed_src(tmp_path):
    """24 MiB + 512 B raw: random (incompressible) and patterned runs, written
    zeroes, holes, and a short last cluster."""
    rnd = os.urandom(3 << 20)
    with open(tmp_path / "mixed.raw", "wb") as f:
        f.truncate((24 << 20) + 512)
        for i, off in enumerate(range(0, 24 << 20, 3 << 20)):
            f.seek(off)
            f.write(rnd[i << 18:(i + 1) << 18])             # 256k random
            f.write(bytes([i + 1]) * (640 << 10))            # 640k compressible
            f.write(bytes(128 << 10))                        # written zeroes
            f.write(rnd[(i << 18) + 4096:(i << 18) + 4096 + 12345])  # odd-sized random
        f.seek(24 << 20)
        f.write(b"\x5a" * 512)
    return "mixed.raw"


@pytest.mark.parametrize("opts", [[], ["-c"], ["-c", "-o", "compression_type=zstd"], ["-o", "cluster_size=4k"],
                                  ["-o", "cluster_size=512"], ["-o", "extended_l2=on,cluster_size=128k"],
                                  ["-c", "-o", "cluster_size=2M"]])
def test_convert_in_order_output_does_not_depend_on_parallelism(vdisk, qemu_img, mixed_src, opts, tmp_path,
                                                                 qcow2_write):
    # In-order writes: the same image byte for byte whatever -m is; -W may
    # lay clusters out differently but must read back the same.
    outs = []
    for i, m in enumerate(["1", "8", "16"]):
        out = "o%d.qcow2" % i
        vdisk("convert", "-m", m, "-O", "qcow2", *opts, mixed_src, out, check=0)
        outs.append((tmp_path / out).read_bytes())
    assert outs[0] == outs[1] == outs[2]
    vdisk("convert", "-W", "-m", "8", "-O", "qcow2", *opts, mixed_src, "w.qcow2", check=0)
    for out in ["o0.qcow2", "w.qcow2"]:
        check = qemu_img("check", "--output=json", out).json()
        assert check.get("leaks", 0) == 0 and check.get("corruptions", 0) == 0
        if "-c" in opts:
            assert check.get("compressed-clusters", 0) > 0
        qemu_img("compare", mixed_src, out)
    # Holes and zeroes of the source are not allocated in the target (2M clusters are rarely all zero).
    if "cluster_size=2M" not in opts:
        holes = [e for e in qemu_img("map", "--output=json", "o0.qcow2").json() if not e["data"]]
        assert sum(e["length"] for e in holes) >= 12 << 20


@pytest.mark.parametrize("opts", [["-o", "cluster_size=512"], ["-o", "cluster_size=4k"],
                                  ["-o", "cluster_size=64k,extended_l2=on"], ["-t", "none"]])
def test_convert_pipelined_qcow2_layout_is_qemus(vdisk, qemu_img, opts, tmp_path, qcow2_write):
    # In-order writes into qcow2 are pipelined: the next chunk's write starts
    # once this chunk's clusters are allocated.  Dense 2 MiB chunks with
    # small clusters take many allocation steps each (one per L2 table), so a
    # release before the last of them would interleave two chunks' clusters.
    # The layout must be that of a serial copy (-m 1; with 64k clusters, qemu-img's).
    with open(tmp_path / "dense.raw", "wb") as f:
        f.write(os.urandom((10 << 20) + 512))
    create_opts = [o for o in opts if o != "-t" and o != "none"]
    for m in ["1", "8"]:
        vdisk("convert", "-m", m, "-O", "qcow2", *opts, "dense.raw", "v%s.qcow2" % m, check=0)
    qemu_img("convert", "-O", "qcow2", *create_opts, "dense.raw", "q.qcow2")
    assert (tmp_path / "v1.qcow2").read_bytes() == (tmp_path / "v8.qcow2").read_bytes()
    if "cluster_size=512" not in opts and "cluster_size=4k" not in opts:
        # (with small clusters, qemu places new refcount blocks differently)
        assert alloc_map(qemu_img, "v8.qcow2") == alloc_map(qemu_img, "q.qcow2")
        assert [e["offset"] for e in qemu_img("map", "--output=json", "v8.qcow2").json()] == \
            [e["offset"] for e in qemu_img("map", "--output=json", "q.qcow2").json()]
    qemu_img("compare", "dense.raw", "v8.qcow2")


@pytest.mark.parametrize("args", [[], ["-W"], ["-m", "1"]])
def test_convert_qcow2_to_raw_sparse(vdisk, qemu_img, mixed_src, args, tmp_path, qcow2_write):
    qemu_img("convert", "-c", "-O", "qcow2", mixed_src, "c.qcow2")
    vdisk("convert", *args, "-O", "raw", "c.qcow2", "back.raw", check=0)
    qemu_img("compare", mixed_src, "back.raw")
    assert allocated_bytes(tmp_path / "back.raw") < 14 << 20


@pytest.mark.parametrize("args", [["-m", "1"], ["-m", "8"], ["-m", "16"], ["-W"], ["-t", "none"],
                                  ["-t", "writeback"]])
def test_convert_raw_target_pipelined(vdisk, qemu_img, mixed_src, args, tmp_path):
    # Raw targets: in-order writes are pipelined (the next chunk's writes are
    # issued before this chunk's complete) and buffered ones go through a
    # thread pool.  Many data / zero pieces per 2 MiB chunk: the target must
    # read back as the source and be exactly as sparse as qemu-img makes it.
    vdisk("convert", *args, "-O", "raw", mixed_src, "v.raw", check=0)
    qemu_img("convert", "-O", "raw", mixed_src, "q.raw")
    qemu_img("compare", "-f", "raw", "-F", "raw", mixed_src, "v.raw")
    assert alloc_map(qemu_img, "v.raw") == alloc_map(qemu_img, "q.raw")
    assert os.path.getsize(tmp_path / "v.raw") == os.path.getsize(tmp_path / mixed_src)


def _file_size_limit(limit):
    def set_limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


@pytest.mark.parametrize("args", [[], ["-W"], ["-m", "1"], ["-t", "none"]])
def test_convert_raw_target_write_error_mid_copy(vdisk_bin, qemu_img, mixed_src, args, tmp_path):
    # A write fails (EFBIG past RLIMIT_FSIZE) while later chunks' writes are
    # in flight: a clear error and exit 1, no hang, no crash.
    import subprocess
    qemu_img("create", "-q", "-f", "raw", "t.raw", str((24 << 20) + 512))
    proc = subprocess.run([vdisk_bin, "convert", "-n", *args, "-O", "raw", mixed_src, "t.raw"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          preexec_fn=_file_size_limit(8 << 20))
    assert proc.returncode == 1, proc
    assert "error while writing" in proc.stderr, proc.stderr
    assert "File too large" in proc.stderr, proc.stderr
    assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr
