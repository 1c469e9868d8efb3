# SPDX-License-Identifier: GPL-2.0-or-later
"""vdiskd dies (SIGKILL) while a Linux guest writes through QEMU's vhost-user-blk-pci with a reconnecting chardev;
a new vdiskd on the same socket gets the inflight area back (SET_INFLIGHT_FD), resubmits what was in flight, and
the guest's dd finishes with every byte on disk (md5 in the guest and on the host).  Whether a request was in
flight at the kill depends on timing (about every other run the new daemon logs "resubmitting 1 request"); the
deterministic resubmission tests are tests/vhost-user/test_export_inflight.py."""
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import vm  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("VDISK_BUILD", REPO / "build")).resolve()
VDISKD = BUILD / "daemon" / "vdiskd"
MiB = 1024 * 1024
SIZE = 64 * MiB
WRITE = 40 * MiB

# 0x6b bytes, direct I/O so every write reaches the back end while it runs; then the md5 from the device.
SCRIPT = f"""
set -e
dd if=/dev/zero bs=1M count={WRITE // MiB} 2>/dev/null | tr '\\000' 'k' > /tmp/k
dd if=/tmp/k of=/dev/vda bs=128k oflag=direct 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "md5 $(dd if=/dev/vda bs=1M count={WRITE // MiB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


def start_vdiskd(img, sock, log):
    argv = [str(VDISKD), "-v", "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--export", f"type=vhost-user-blk,id=e0,node-name=f0,writable=on,addr.type=unix,addr.path={sock}"]
    f = open(log, "ab")
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f)
    f.close()
    end = time.monotonic() + 15
    while not os.path.exists(sock) or b"vdiskd: ready" not in log.read_bytes().split(b"--- restart ---")[-1]:
        assert p.poll() is None and time.monotonic() < end, log.read_text(errors="replace")
        time.sleep(0.02)
    return p


def test_guest_survives_vdiskd_restart(tmp_path):
    if not VDISKD.exists():
        pytest.skip(f"vdiskd not built in {BUILD}")
    if not vm.qemu_available():
        pytest.skip(f"{vm.QEMU} not installed")
    try:
        vm.build_image(quiet=True)
    except vm.ImageUnavailable as e:
        pytest.skip(f"no guest kernel: {e}")
    img, sock, log = tmp_path / "disk.raw", tmp_path / "vub.sock", tmp_path / "vdiskd.log"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d = start_vdiskd(img, sock, log)
    devices = ["-chardev", f"socket,id=c0,path={sock},reconnect=1",
               "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
    result = {}

    def boot():
        try:
            result["r"] = vm.run_in_guest(SCRIPT, devices=devices, timeout=240)
        except Exception as e:  # reported by the main thread
            result["error"] = e

    guest = threading.Thread(target=boot)
    guest.start()
    try:
        # Kill the daemon once the guest's dd is a quarter through (the file shows its bytes).
        end = time.monotonic() + 200
        fd = os.open(img, os.O_RDONLY)
        try:
            while os.pread(fd, 1, WRITE // 4) != b"k":
                alive = guest.is_alive()
                assert (alive or os.pread(fd, 1, WRITE // 4) != b"k") and time.monotonic() < end, \
                    f"the guest never started writing: {result.get('error') or result['r'].tail()}"
                if not alive:
                    pytest.fail(f"the guest wrote everything before we could look: {result['r'].tail()}")
                time.sleep(0.005)
        finally:
            os.close(fd)
        d.send_signal(signal.SIGKILL)
        d.wait(timeout=10)
        with open(log, "ab") as f:
            f.write(b"--- restart ---\n")
        d = start_vdiskd(img, sock, log)
        guest.join(timeout=240)
        assert not guest.is_alive(), "the guest did not finish"
    finally:
        guest.join(timeout=300)
        if d.poll() is None:
            d.terminate()
            d.wait(timeout=30)
    assert "error" not in result, result["error"]
    res = result["r"]
    text = log.read_text(errors="replace")
    after = text.split("--- restart ---")[-1]
    assert res.status == 0, res.tail()
    want = hashlib.md5(b"k" * WRITE).hexdigest()
    assert f"md5 {want}" in res.output, res.tail() + "\n" + after
    with open(img, "rb") as f:
        assert hashlib.md5(f.read(WRITE)).hexdigest() == want
    # The new daemon got the area QEMU kept from the first one.
    assert "SET_INFLIGHT_FD" in after and "GET_INFLIGHT_FD" not in after, after
    for marker in ("ERROR: AddressSanitizer", "runtime error:"):
        assert marker not in text, text
