# SPDX-License-Identifier: LGPL-2.1-or-later
"""Command-line basics of vdisk and vdiskd, and `vdisk bench` smoke tests."""
import json
import re

import pytest

from conftest import MiB, SRC, run


def project_version():
    m = re.search(r"version\s*:\s*'([^']+)'", (SRC / "meson.build").read_text())
    assert m, "no version in meson.build"
    return m.group(1)


@pytest.mark.parametrize("which", ["vdisk", "vdiskd"])
def test_help(which, vdisk_bin, vdiskd_bin):
    exe = vdisk_bin if which == "vdisk" else vdiskd_bin
    r = run([exe, "--help"], expect_rc=0, timeout=10)
    assert "Usage:" in r.text
    assert which in r.text
    assert r.err == ""


@pytest.mark.parametrize("which", ["vdisk", "vdiskd"])
def test_version(which, vdisk_bin, vdiskd_bin):
    exe = vdisk_bin if which == "vdisk" else vdiskd_bin
    r = run([exe, "--version"], expect_rc=0, timeout=10)
    assert project_version() in r.text
    assert which in r.text


@pytest.mark.parametrize("which", ["vdisk", "vdiskd"])
def test_unknown_option(which, vdisk_bin, vdiskd_bin):
    exe = vdisk_bin if which == "vdisk" else vdiskd_bin
    r = run([exe, "--no-such-option"], timeout=10)
    assert r.rc == 2, r
    assert r.err.strip()


# ---- vdisk bench --------------------------------------------------------

def find_result(obj):
    """The first JSON object that carries "iops" (top level or under "results")."""
    if isinstance(obj, dict):
        if "iops" in obj:
            return obj
        for v in obj.values():
            found = find_result(v)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = find_result(v)
            if found is not None:
                return found
    return None


def test_bench_null_json(vdisk_bin):
    r = run([vdisk_bin, "bench", "--driver=null", "--size=1G", "--runtime=1", "--output=json"],
            expect_rc=0, timeout=30)
    doc = json.loads(r.text)
    res = find_result(doc)
    assert res is not None, doc
    assert res["iops"] > 0
    assert res["bw_bytes"] > 0
    lat = res["lat_ns"]
    for k in ("mean", "p50", "p99", "p999"):
        assert isinstance(lat[k], (int, float)) and lat[k] >= 0, lat
    assert lat["p50"] <= lat["p99"] <= lat["p999"]
    # Default block size 4k: bandwidth and IOPS agree.
    assert abs(res["bw_bytes"] - res["iops"] * 4096) <= 0.01 * res["bw_bytes"] + 4096


def test_bench_compare_prints_a_table(vdisk_bin, tmp_path):
    f = tmp_path / "bench.img"
    with open(f, "wb") as fh:
        fh.truncate(64 * MiB)
    drivers = ["sync", "threads", "io_uring"]
    r = run([vdisk_bin, "bench", f"--compare={','.join(drivers)}", f"--path={f}", "--runtime=1"],
            expect_rc=0, timeout=60)
    lines = r.text.splitlines()
    for d in drivers:
        rows = [ln for ln in lines if re.match(rf"\s*{re.escape(d)}\s", ln)]
        assert rows, f"no table row for {d}:\n{r.text}"
        # A row has numbers in it (IOPS at least), not an error.
        assert re.search(r"\d", rows[-1][len(d) + 1:]), rows[-1]
        assert "error" not in rows[-1].lower(), rows[-1]


def test_bench_compare_json(vdisk_bin, tmp_path):
    f = tmp_path / "bench.img"
    with open(f, "wb") as fh:
        fh.truncate(16 * MiB)
    r = run([vdisk_bin, "bench", "--compare=sync,threads", f"--path={f}", "--runtime=1", "--output=json"],
            expect_rc=0, timeout=60)
    doc = json.loads(r.text)
    results = doc["results"]
    assert [x["driver"] for x in results] == ["sync", "threads"]
    for x in results:
        assert x["iops"] > 0, x


def test_bench_unknown_driver(vdisk_bin):
    r = run([vdisk_bin, "bench", "--driver=no-such-driver", "--runtime=1"], timeout=30)
    assert r.rc != 0, r
    assert "no-such-driver" in r.err


def test_bench_bad_option(vdisk_bin):
    r = run([vdisk_bin, "bench", "--driver=null", "--frobnicate=3"], timeout=30)
    assert r.rc == 2, r
    assert "frobnicate" in r.err


def test_bench_bad_value(vdisk_bin):
    r = run([vdisk_bin, "bench", "--driver=null", "--bs=banana"], timeout=30)
    assert r.rc == 2, r
    assert "banana" in r.err


def test_bench_missing_file(vdisk_bin, tmp_path):
    missing = tmp_path / "nope.img"
    r = run([vdisk_bin, "bench", "--driver=sync", f"--path={missing}", "--rw=randread", "--runtime=1"],
            timeout=30)
    assert r.rc == 1, r
    assert str(missing) in r.err
