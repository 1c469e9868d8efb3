# SPDX-License-Identifier: GPL-2.0-or-later
"""A Linux guest on vdiskd's vhost-user-blk export: QEMU's vhost-user-blk-pci front end with two queues, the
guest's virtio_blk driver, two disks in one boot (a raw node and a qcow2 node).  The guest reads a known pattern
(md5 as the host's), copies data, flushes and discards; after it powered off, qemu-img compare checks both images
against references made with qemu-io."""
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import vm  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("VDISK_BUILD", REPO / "build")).resolve()
VDISKD = BUILD / "daemon" / "vdiskd"
MiB = 1024 * 1024
TIMEOUT = 60

SCRIPT = """
set -e
for d in vda vdb; do
    echo "$d size $(blockdev --getsize64 /dev/$d) queues $(ls /sys/block/$d/mq | wc -l)"
    echo "$d md5 $(dd if=/dev/$d bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
    dd if=/dev/$d of=/dev/$d bs=1M count=1 seek=8 conv=fsync 2>/dev/null
    blkdiscard -o 16777216 -l 4194304 /dev/$d
    sync
    echo 3 > /proc/sys/vm/drop_caches
    echo "$d copied $(dd if=/dev/$d bs=1M count=1 skip=8 2>/dev/null | md5sum | cut -d' ' -f1)"
    echo "$d discarded $(dd if=/dev/$d bs=1M count=4 skip=16 2>/dev/null | md5sum | cut -d' ' -f1)"
done
"""


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"missing {tool}")


def run(args, timeout=TIMEOUT):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def md5(data):
    return hashlib.md5(data).hexdigest()


def test_guest_on_vhost_user_blk_export(tmp_path):
    for tool in ("qemu-img", "qemu-io"):
        need(tool)
    if not VDISKD.exists():
        pytest.skip(f"vdiskd not built in {BUILD}")
    if not vm.qemu_available():
        pytest.skip(f"{vm.QEMU} not installed")
    try:
        vm.build_image(quiet=True)
    except vm.ImageUnavailable as e:
        pytest.skip(f"no guest kernel: {e}")

    disks = {"raw": (tmp_path / "a.raw", 32 * MiB), "qcow2": (tmp_path / "b.qcow2", 48 * MiB)}
    for fmt, (img, size) in disks.items():
        run(["qemu-img", "create", "-f", fmt, img, str(size)])
        run(["qemu-io", "-f", fmt, "-c", "write -P 0x6b 0 4M", "-c", "write -P 0x11 16M 4M", img])
        ref = img.with_suffix(".ref")
        shutil.copy(img, ref)
        # What the guest does: copy MiB 0 to MiB 8, discard [16M, 20M) (reads zeroes afterwards on both nodes).
        run(["qemu-io", "-f", fmt, "-c", "write -P 0x6b 8M 1M", "-c", "write -z 16M 4M", ref])

    log = open(tmp_path / "vdiskd.log", "wb")
    argv = [VDISKD, "-v",
            "--blockdev", f"driver=file,node-name=f0,filename={disks['raw'][0]},discard=unmap",
            "--blockdev", f"driver=file,node-name=f1,filename={disks['qcow2'][0]},discard=unmap",
            "--blockdev", "driver=qcow2,node-name=q1,file=f1",
            "--export", f"type=vhost-user-blk,id=e0,node-name=f0,writable=on,num-queues=2,"
                        f"addr.type=unix,addr.path={tmp_path}/raw.sock",
            "--export", f"type=vhost-user-blk,id=e1,node-name=q1,writable=on,num-queues=2,"
                        f"addr.type=unix,addr.path={tmp_path}/qcow2.sock"]
    d = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=log)
    try:
        end = time.monotonic() + 15
        while b"vdiskd: ready" not in (tmp_path / "vdiskd.log").read_bytes():
            assert d.poll() is None and time.monotonic() < end, (tmp_path / "vdiskd.log").read_text()
            time.sleep(0.02)
        devices = vm.vhost_user_blk(tmp_path / "raw.sock", id="c0", num_queues=2) + \
            vm.vhost_user_blk(tmp_path / "qcow2.sock", id="c1", num_queues=2)
        res = vm.run_in_guest(SCRIPT, devices=devices, timeout=120)
        out = res.output
        assert res.status == 0, res.tail()
        first4, first1, zero4 = md5(b"\x6b" * 4 * MiB), md5(b"\x6b" * MiB), md5(bytes(4 * MiB))
        for dev, (img, size) in zip(("vda", "vdb"), disks.values()):
            assert f"{dev} size {size} queues 2" in out, out
            assert f"{dev} md5 {first4}" in out, out
            assert f"{dev} copied {first1}" in out, out
            assert f"{dev} discarded {zero4}" in out, out
    finally:
        if d.poll() is None:
            d.terminate()
        rc = d.wait(timeout=30)
        log.close()
    text = (tmp_path / "vdiskd.log").read_text(errors="replace")
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
        assert marker not in text, text
    assert rc == 0, text
    assert "resetting the device" not in text and "queue stopped" not in text, text
    for fmt, (img, _) in disks.items():
        run(["qemu-img", "compare", "-f", fmt, "-F", fmt, img, img.with_suffix(".ref")])
    run(["qemu-img", "check", disks["qcow2"][0]])
