# SPDX-License-Identifier: LGPL-2.1-or-later
"""Event-driven completion (the call fd is the queue's completion fd) and vdisk bench."""
import json

import pytest

from conftest import DRIVER, MiB, run


@pytest.mark.parametrize("props", [(), ("event-idx=false",)], ids=["event-idx", "no-event-idx"])
def test_completion_fd_event_loop(qsd, image, client, props):
    b = qsd(image(16 * MiB))
    sets = [a for p in props for a in ("--set", p)]
    p = client(b, *sets, "evloop", "500")
    assert "500 writes + 500 reads" in p.stdout
    assert "disabled fd stayed quiet" in p.stdout and "re-enabled fd fired" in p.stdout


def test_completion_fd_slow_backend(qsd, image, client):
    """Completions arrive long after do_io returned: only the call fd can wake us."""
    b = qsd(image(16 * MiB), iops=400)
    p = client(b, "evloop", "64")
    assert "64 writes + 64 reads" in p.stdout and "disabled fd stayed quiet" in p.stdout


@pytest.mark.parametrize("args", [
    ["--rw=randread", "--iodepth=1"],
    ["--rw=randread", "--iodepth=32"],
    ["--rw=randwrite", "--iodepth=16", "--bs=64k"],
    ["--rw=randrw", "--iodepth=8", "--numjobs=2"],
    ["--rw=randread", "--iodepth=16", "--poll=1"],
], ids=["randread-qd1", "randread-qd32", "randwrite-64k", "randrw-2jobs", "poll"])
def test_bench(qsd, image, vdisk_tool, args):
    b = qsd(image(64 * MiB), num_queues=2)
    p = run([vdisk_tool, "bench", f"--driver={DRIVER}", f"--path={b.sock}", *args, "--runtime=300ms",
             "--output=json"], check=0)
    res = json.loads(p.stdout)
    text = json.dumps(res)
    assert '"errors": 0' in text or "errors" not in text, text
    assert b.alive
