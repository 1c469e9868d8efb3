# SPDX-License-Identifier: LGPL-2.1-or-later
"""Self-tests of the VM harness (tests/vm/vm.py): a TCG guest boots, sees a
virtio-blk disk, reads and writes it, loads the kernel modules later tests
need (ublk, VDUSE, NBD, vhost-vdpa, nvme), runs host binaries, reports its
exit status, and is killed on time-out.  Skipped when qemu-system-x86_64 or
the Debian kernel package can't be had."""
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
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vdtest import unix_listening  # noqa: E402

MiB = 1024 * 1024
TIMEOUT = 60


@pytest.fixture(scope="session")
def image():
    if not vm.qemu_available():
        pytest.skip(f"{vm.QEMU} not installed (Debian package qemu-system-x86)")
    try:
        return vm.build_image(quiet=True)
    except vm.ImageUnavailable as e:
        pytest.skip(f"no guest kernel: {e}")


def pattern(seed, size):
    """size bytes, different for every 16-byte line and every seed."""
    data = b"".join(f"{seed}:{i:013d}\n".encode() for i in range(size // 16))
    assert len(data) == size
    return data


def report(res):
    print(f"kernel {res.kernel_version}: /init after {res.boot_time:.2f}s "
          f"(guest uptime {res.guest_uptime:.2f}s), total {res.elapsed:.2f}s; "
          f"modules {res.modules}")


def test_virtio_blk_read_then_write(image, tmp_path):
    size = 4 * MiB
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern("A", size))
    new = pattern("B", size)
    script = """
set -e
echo "size $(blockdev --getsize64 /dev/vda)"
echo "md5 $(md5sum </dev/vda | cut -d' ' -f1)"
dd if=/vdisk/new of=/dev/vda bs=64k conv=fsync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo "md5-after $(md5sum </dev/vda | cut -d' ' -f1)"
"""
    res = vm.run_in_guest(script, devices=vm.virtio_blk(img), files={"/vdisk/new": new},
                          timeout=TIMEOUT)
    report(res)
    assert res.status == 0, res.tail()
    assert res.modules.get("virtio_blk") == "loaded"
    lines = dict(line.split(" ", 1) for line in res.output.splitlines() if " " in line)
    assert lines["size"] == str(size)
    assert lines["md5"] == hashlib.md5(pattern("A", size)).hexdigest()
    assert lines["md5-after"] == hashlib.md5(new).hexdigest()
    assert img.read_bytes() == new


def test_vhost_user_blk(image, tmp_path):
    """Guest RAM is shared memory, so a vhost-user-blk server (here the real
    peer, qemu-storage-daemon) can serve the guest's virtio-blk queues."""
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        pytest.skip("qemu-storage-daemon not installed (Debian package qemu-system-common)")
    size = 2 * MiB
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern("V", size))
    sock = tmp_path / "vhost.sock"
    d = subprocess.Popen([qsd, "--blockdev", f"driver=file,node-name=f0,filename={img}",
                          "--export", f"type=vhost-user-blk,id=e0,node-name=f0,writable=on,"
                          f"num-queues=2,addr.type=unix,addr.path={sock}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if unix_listening(sock) or d.poll() is not None:
                break
            time.sleep(0.05)
        assert unix_listening(sock), d.stdout.read() if d.poll() is not None else "no socket"
        res = vm.run_in_guest(
            "cat /sys/block/vda/mq/*/nr_tags >/dev/null; ls /sys/block/vda/mq | wc -l;"
            " md5sum </dev/vda | cut -d' ' -f1;"
            " echo hello | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null",
            devices=vm.vhost_user_blk(sock, num_queues=2), timeout=TIMEOUT)
    finally:
        d.terminate()
        d.wait(10)
    report(res)
    assert res.status == 0, res.tail()
    assert res.output.split() == ["2", hashlib.md5(pattern("V", size)).hexdigest()]
    assert img.read_bytes()[512:1024] == b"hello\n" + bytes(506)


def test_kernel_modules_for_exports(image):
    """ublk_drv, vduse, nbd (and vhost-vdpa, virtio-vdpa, nvme) load, and
    their control nodes appear."""
    want = ["ublk_drv", "vduse", "nbd", "vhost_vdpa", "virtio_vdpa", "nvme"]
    script = """
for n in /dev/ublk-control /dev/vduse/control /dev/nbd0; do
	if [ -e "$n" ]; then echo "node $n present"; else echo "node $n absent"; fi
done
lsmod | cut -d' ' -f1 | tr '\\n' ' '; echo
"""
    res = vm.run_in_guest(script, modules=want, timeout=TIMEOUT)
    report(res)
    print(res.output)
    assert res.status == 0, res.tail()
    for m in want:
        assert res.modules.get(m) in ("loaded", "builtin"), (m, res.modules)
    for n in ("/dev/ublk-control", "/dev/vduse/control", "/dev/nbd0"):
        assert f"node {n} present" in res.output, res.tail()


def test_exit_status_and_missing_module(image):
    res = vm.run_in_guest("echo still-ran; exit 7", modules=["no_such_module"],
                          timeout=TIMEOUT)
    assert res.status == 7
    assert res.modules == {"no_such_module": "missing"}
    assert res.output.strip() == "still-ran"
    with pytest.raises(vm.VMError, match="exited with 7"):
        vm.run_in_guest("exit 7", modules=[], timeout=TIMEOUT, check=True)


def test_host_fs(image, tmp_path):
    """The host's files are visible at /host, host binaries run there
    (hostrun), and what the guest writes does not reach the host."""
    (tmp_path / "f").write_text("from-host\n")
    script = f"""
set -e
cat /host{tmp_path}/f
echo from-guest > /host{tmp_path}/f
mkdir -p {tmp_path} && cd {tmp_path}
hostrun /bin/sh -c 'cat f; readlink -f /bin/sh'
"""
    res = vm.run_in_guest(script, modules=[], host_fs=True, timeout=TIMEOUT)
    report(res)
    assert res.status == 0, res.tail()
    assert res.output.split() == ["from-host", "from-guest", os.path.realpath("/bin/sh")]
    assert (tmp_path / "f").read_text() == "from-host\n"


def test_timeout_kills_guest(image):
    with pytest.raises(vm.GuestTimeout) as e:
        # Long enough for a TCG boot on a loaded 2-CPU machine; the guest then sleeps forever.
        vm.run_in_guest("echo going-to-sleep; sleep 600", modules=[], timeout=45)
    assert "going-to-sleep" in str(e.value)
