# SPDX-License-Identifier: LGPL-2.1-or-later
"""Failures: buffers outside mapped regions, region limits, timeouts, the back-end dying."""
import re
import signal
import subprocess
import time

from conftest import MiB, check_sanitizers, run


def test_buffer_outside_mapped_region_is_efault(qsd, image, client, io):
    b = qsd(image(16 * MiB))
    p = client(b, "efault")
    assert p.stdout.count("not in a mapped memory region") == 5
    p = io(b, "write -P 1 0 4k", map=False, check=1)
    assert "Bad address" in p.stderr and "vdisk_map_mem_region" in p.stderr


def test_region_limit_and_remapping(qsd, image, client):
    b = qsd(image(16 * MiB))
    p = client(b, "regions")
    assert "max-mem-regions" in p.stdout and "remapped after unmapping all" in p.stdout
    p = client(b, "--map-before-start", "regions")
    assert "remapped after unmapping all" in p.stdout


def test_timeout(qsd, client):
    b = qsd(null=True, size=1 << 30, blockdev_opts="latency-ns=400000000")
    p = client(b, "timeout")
    assert "timed out after" in p.stdout and "completed later" in p.stdout


def test_destroy_waits_for_requests_in_flight(qsd, client):
    b = qsd(null=True, size=1 << 30, blockdev_opts="latency-ns=1000000000")
    p = client(b, "destroy-inflight")
    ms = float(re.search(r"destroy took (\d+) ms", p.stdout).group(1))
    assert 300 <= ms < 10000


def test_backend_killed_mid_io(qsd, vu_client):
    b = qsd(null=True, size=1 << 30)
    c = subprocess.Popen([str(vu_client), "--path", b.sock, "hammer", "30"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert c.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    b.kill()
    try:
        out, err = c.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        c.kill()
        raise AssertionError("HANG: requests in flight when the back-end died never completed")
    check_sanitizers("vu-client hammer", err)
    assert c.returncode == 0, err
    m = re.search(r"ok=(\d+) errors=(\d+) ret=(-?\d+) msg=(.*)", out)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out
    assert m.group(3) == "-5" and "disconnected" in m.group(4)
    after = re.search(r"after ret=(-?\d+) ms=(\d+)", out)
    assert after.group(1) == "-5" and int(after.group(2)) < 1000


def test_backend_killed_while_idle(qsd, image, vu_client):
    b = qsd(image(16 * MiB))
    c = subprocess.Popen([str(vu_client), "--path", b.sock, "idle"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert c.stdout.readline().strip() == "ready"
    b.kill(signal.SIGTERM)
    c.stdin.write("go\n")
    c.stdin.flush()
    try:
        out, err = c.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        c.kill()
        raise AssertionError("HANG after the back-end went away")
    check_sanitizers("vu-client idle", err)
    assert c.returncode == 0, err
    m = re.search(r"after ret=(-?\d+) ms=(\d+) msg=(.*)", out)
    assert m.group(1) == "-5" and int(m.group(2)) < 1000 and "disconnected" in m.group(3)


def test_two_queues_backend_killed(qsd, image, vu_client):
    """Both queue threads must notice, whichever is blocked."""
    b = qsd(null=True, size=1 << 30, num_queues=2)
    c = subprocess.Popen([str(vu_client), "--path", b.sock, "--queues", "2", "multiq", "400"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    b.kill()
    try:
        out, err = c.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        c.kill()
        raise AssertionError("HANG: a queue thread did not notice the back-end dying")
    check_sanitizers("vu-client multiq", err)
    # Under a slow (sanitizer) build the kill may land while the queues are
    # still being set up: that is a clean start failure, also acceptable.
    assert c.returncode == 1 and ("disconnected" in err or "closed the connection" in err), err


def test_start_fails_cleanly_on_dead_backend(qsd, image, vu_client):
    """Nothing listens any more: connect fails at once with a clear message."""
    b = qsd(image(16 * MiB))
    b.kill()
    p = run([vu_client, "--path", b.sock, "pattern", "1", "0", "1", "1"], check=1)
    assert "cannot connect" in p.stderr
