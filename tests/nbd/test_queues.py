# SPDX-License-Identifier: LGPL-2.1-or-later
"""Several queues (one NBD connection each, multi-conn) and event-driven completion."""
import re
import shutil

import pytest

from conftest import BUILD, on, requires, run


def test_four_queues_four_connections_consistent(nbdkit, nbd_queues, tmp_path):
    log = tmp_path / "nbd.log"
    s = nbdkit("memory", "256M", f"logfile={log}", filters=["log"])
    p = run([nbd_queues, "--set", f"path={s.sock}", "--queues", "4", "multiq", "32"], check=0)
    assert "4 queues verified" in p.stdout
    conns = set(re.findall(r"connection=(\d+) Connect", log.read_text()))
    assert len(conns) == 4  # connect()'s handle is reused by queue 0


def test_sixteen_queues(nbdkit, nbd_queues):
    s = nbdkit("memory", "64M")
    run([nbd_queues, "--set", f"uri={s.uri}", "--queues", "16", "multiq", "2"], check=0)


def test_seventeen_queues_is_too_many(nbdkit, nbd_queues):
    s = nbdkit("memory", "64M")
    p = run([nbd_queues, "--set", f"path={s.sock}", "--queues", "17", "multiq", "1"], check=1)
    assert "max-queues (16)" in p.stderr


@requires("qemu-nbd")
def test_queues_against_qemu_nbd(tmp_path, qemu_nbd, nbd_queues, io):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 << 20))
    s = qemu_nbd(img, "--shared=8")
    i = dict(l.split("=", 1) for l in io(on(s), "info").stdout.splitlines() if "=" in l)
    n = 4 if i["can-multi-conn"] == "true" else 1
    run([nbd_queues, "--set", f"path={s.sock}", "--queues", str(n), "multiq", "8"], check=0)


def test_completion_fd_event_loop(nbdkit, nbd_queues):
    s = nbdkit("memory", "64M")
    p = run([nbd_queues, "--set", f"path={s.sock}", "evloop", "64"], check=0)
    assert "64 writes + 64 reads" in p.stdout
    assert "disabled fd stayed quiet" in p.stdout and "re-enabled fd fired" in p.stdout


def test_completion_fd_event_loop_slow_server(nbdkit, nbd_queues):
    """Replies arrive long after do_io returned: only the socket can wake us."""
    s = nbdkit("memory", "64M", "rdelay=50ms", "wdelay=50ms", filters=["delay"])
    run([nbd_queues, "--set", f"path={s.sock}", "evloop", "16"], check=0)


def test_completion_fd_event_loop_big_writes(nbdkit, nbd_queues):
    """4 MiB writes fill the socket: libnbd must be woken for POLLOUT too."""
    s = nbdkit("memory", "128M")
    for _ in range(3):
        run([nbd_queues, "--set", f"path={s.sock}", "evloop", "24", str(4 << 20)], check=0)


def test_completion_fd_event_loop_many_small(nbdkit, nbd_queues):
    s = nbdkit("memory", "64M")
    run([nbd_queues, "--set", f"path={s.sock}", "--queue-size", "256", "evloop", "4000", "4096"], check=0)


def test_bench_over_nbd(nbdkit):
    vdisk = BUILD / "tools" / "vdisk"
    if not vdisk.exists():
        pytest.skip("vdisk tool not built")
    s = nbdkit("memory", "256M")
    p = run([vdisk, "bench", "--driver=nbd", f"--path={s.sock}", "--numjobs=4", "--iodepth=16",
             "--runtime=300ms", "--output=json"], check=None)
    if p.returncode == 2:
        pytest.skip(f"vdisk bench does not take these options yet: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
