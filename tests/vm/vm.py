#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Boot a throw-away QEMU (TCG) guest to test kernel-side consumers of our exports.

This machine has no KVM, no loadable modules, no /dev/nbd* and no
/dev/ublk-control, so whatever needs the kernel as a peer (virtio-blk over
vhost-user, ublk, VDUSE, kernel NBD, nvme) is tested inside a small guest:

* build_image() downloads a Debian kernel package and busybox-static with
  `apt-get download`, unpacks them with `dpkg -x`, and writes a busybox
  initramfs holding the modules we need (dependencies resolved from each
  module's .modinfo, the same data depmod turns into modules.dep).  Cached
  under $VDISK_VM_CACHE or ${VDISK_BUILD:-<source>/build}/vm/; a second call
  does nothing.
* run_in_guest(script, devices=[...]) appends a per-run cpio holding the
  script to the base initramfs (Linux unpacks concatenated archives), boots
  qemu-system-x86_64 -accel tcg with guest RAM in a shared memfd (so
  vhost-user devices work), and returns the script's exit status, read from
  the `VDISK-VM-RESULT: N` line the guest prints on its serial console before
  it powers off.

Command line: `vm.py build`, `vm.py run`, `vm.py info` (tests/vm/build-image
and tests/vm/run-vm are shortcuts).  See tests/vm/README.md.
"""
import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

SRC = pathlib.Path(__file__).resolve().parents[2]

QEMU = os.environ.get("VDISK_VM_QEMU", "qemu-system-x86_64")

# What the image holds.  A module that the kernel lacks is reported, not fatal.
MODULES = [
    "virtio_blk", "virtio_pci", "virtio_ring", "virtio",
    "nbd", "ublk_drv",
    "vduse", "vhost_vdpa", "virtio_vdpa", "vdpa", "vhost", "vhost_iotlb", "irqbypass",
    "nvme", "nvme_core",
    "9p", "9pnet_virtio", "overlay",    # host_fs: the host's / at /host
    "virtio_net", "loop", "null_blk",
]
# Loaded at boot unless the caller says otherwise.
DEFAULT_LOAD = ["virtio_blk"]

# Kernel command line that shortens a TCG boot: no Spectre work-arounds, no
# TSC/PIT cross-checks, no PS/2 probing, and none of the crypto self-tests,
# entropy-jitter sampling and key loading that take ~2 s of boot (modules are
# not signature-checked: Debian does not enforce it).
FAST_BOOT = [
    "mitigations=off", "tsc=reliable", "no_timer_check",
    "i8042.noaux", "i8042.nomux", "i8042.nopnp", "8250.nr_uarts=1",
    "random.trust_cpu=on", "cryptomgr.notests",
    "initcall_blacklist=jent_mod_init,init_encrypted,load_system_certificate_list,"
    "crypto_kdf108_init,crypto_algapi_init",
]

# Changing one of these (or this file) rebuilds the initramfs.
IMAGE_FORMAT = 4

RESULT_RE = re.compile(r"VDISK-VM-RESULT: (-?\d+)")
BOOTED_RE = re.compile(r"VDISK-VM-BOOTED: ([\d.]+)")
MODULE_RE = re.compile(r"VDISK-VM-MODULE: (\S+) (\S+)")
BEGIN = "VDISK-VM-SCRIPT-BEGIN"


class VMError(Exception):
    """The guest could not be built or run, or it did not report a result."""


class ImageUnavailable(VMError):
    """No kernel or busybox package could be had (no apt, no mirror, no cache)."""


class GuestTimeout(VMError):
    pass


class BootCrash(VMError):
    """The guest kernel panicked before the test script started."""


def cache_dir():
    if os.environ.get("VDISK_VM_CACHE"):
        return pathlib.Path(os.environ["VDISK_VM_CACHE"]).resolve()
    build = pathlib.Path(os.environ.get("VDISK_BUILD", SRC / "build")).resolve()
    return build / "vm"


def log(msg):
    print(f"vm: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# apt

def _run(args, **kw):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def _vkey(s):
    """Sort key for Debian-ish version strings (numbers compare numerically)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s)]


def _candidates(regex):
    """Package names matching regex that apt can download (have a candidate)."""
    prefix = "linux-image-"
    try:
        names = _run(["apt-cache", "pkgnames", prefix]).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    names = [n for n in names if re.fullmatch(regex, n)]
    if not names:
        return []
    out = _run(["apt-cache", "policy"] + names).stdout
    have = []
    for block in re.split(r"\n(?=\S)", out):
        m = re.match(r"(\S+):\n", block)
        c = re.search(r"Candidate: (\S+)", block)
        if m and c and c.group(1) != "(none)":
            have.append(m.group(1))
    return sorted(have, key=_vkey)


def pick_kernel_package():
    """The kernel package to use: $VDISK_VM_KERNEL_PKG, else the newest 6.12
    linux-image-*-amd64-unsigned the mirror has, else the newest of any
    version, else the newest cloud kernel."""
    if os.environ.get("VDISK_VM_KERNEL_PKG"):
        return os.environ["VDISK_VM_KERNEL_PKG"]
    flavour = os.environ.get("VDISK_VM_KERNEL_FLAVOUR", "amd64")
    patterns = [
        rf"linux-image-6\.12\.[\d.]+\+deb\d+-{flavour}-unsigned",
        rf"linux-image-[\d.]+(-\d+)?(\+deb\d+)?-{flavour}-unsigned",
        r"linux-image-[\d.]+(-\d+)?(\+deb\d+)?-cloud-amd64(-unsigned)?",
    ]
    for attempt in range(2):
        for pat in patterns:
            c = _candidates(pat)
            if c:
                return c[-1]
        if attempt == 0 and os.geteuid() == 0 and shutil.which("apt-get"):
            log("no kernel package known to apt; running apt-get update")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
    return None


def apt_download(pkg, dest):
    """Download pkg's .deb into dest (unless one is there); return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(f"{pkg}_*.deb"))
    if have:
        return have[-1]
    if not shutil.which("apt-get"):
        raise ImageUnavailable("apt-get not found")
    log(f"apt-get download {pkg}")
    # Downloading as root into a directory _apt can't write makes apt warn and
    # carry on unsandboxed; say so up front to keep the output quiet.
    p = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
                       cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    have = sorted(dest.glob(f"{pkg}_*.deb"))
    if p.returncode != 0 or not have:
        raise ImageUnavailable(f"apt-get download {pkg} failed:\n{p.stdout[-2000:]}")
    return have[-1]


# --------------------------------------------------------------------------
# modules

def _read_module(path):
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, check=True,
                              stdout=subprocess.PIPE).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _modinfo(ko):
    """The key=value strings of an ELF64 module's .modinfo section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise VMError("not an ELF64 module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def sect(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = sect(shstrndx)
    info = {}
    for i in range(shnum):
        name, off, size = sect(i)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name:end] == b".modinfo":
            for kv in ko[off:off + size].split(b"\0"):
                if b"=" in kv:
                    k, v = kv.decode(errors="replace").split("=", 1)
                    info.setdefault(k, v)
    return info


def _norm(name):
    return name.replace("-", "_")


def resolve_modules(moddir, wanted):
    """Return (order, chains, blobs, builtin, wanted_builtin, missing): the
    modules to ship in load order, each one's ordered load list (its
    dependencies first, from .modinfo's depends=, as depmod would write
    modules.dep), their uncompressed contents, every built-in module's name,
    the wanted ones that are built in, and the wanted ones the kernel lacks."""
    files = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        files[_norm(re.sub(r"\.ko(\.(xz|zst|gz))?$", "", p.name))] = p
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().split():
            builtin.add(_norm(re.sub(r"\.ko$", "", line.rsplit("/", 1)[-1])))
    blobs, depends = {}, {}

    def load(n):
        if n in blobs:
            return
        blobs[n] = _read_module(files[n])
        d = _modinfo(blobs[n]).get("depends", "")
        depends[n] = [_norm(x) for x in d.split(",") if x]
        for x in depends[n]:
            if x in files:
                load(x)

    missing, bi = [], []
    for w in map(_norm, wanted):
        if w in files:
            load(w)
        elif w in builtin:
            bi.append(w)
        else:
            missing.append(w)

    def closure(n, seen, out):
        if n in seen or n not in blobs:
            return
        seen.add(n)
        for x in depends[n]:
            closure(x, seen, out)
        out.append(n)
    order, seen = [], set()
    for n in blobs:
        closure(n, seen, order)
    chains = {}
    for n in blobs:
        chains[n] = []
        closure(n, set(), chains[n])
    return order, chains, blobs, sorted(builtin), bi, missing


# --------------------------------------------------------------------------
# cpio (newc), written here so the archive's owners and modes do not depend
# on who runs the build

class Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1000
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        name = name.lstrip("/")
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self):
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name, mode=0o755):
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, 0o040000 | mode, nlink=2)

    def file(self, name, data, mode=0o644):
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name, target):
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name, major, minor, mode=0o600):
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


INIT = r"""#!/bin/sh
# vdisk VM init: mount, load modules, run /vdisk/test.sh, report, power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
read -r up _ </proc/uptime
echo "VDISK-VM-BOOTED: $up"
mods=
hostfs=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	vdisk.modules=*) mods="${arg#vdisk.modules=}" ;;
	vdisk.hostfs=1) hostfs=1 ;;
	esac
done
[ -n "$mods" ] && load-module $(echo "$mods" | tr , ' ')
if [ -n "$hostfs" ]; then
	# The host's / (9p, read-only) under a tmpfs overlay: /host looks like
	# the host, writable, and what the guest writes stays in guest RAM.
	load-module 9p 9pnet_virtio overlay >/dev/null
	mkdir -p /run/hostfs/lower /run/hostfs/rw
	if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose vdiskhost /run/hostfs/lower; then
		mount -t tmpfs tmpfs /run/hostfs/rw
		mkdir -p /run/hostfs/rw/upper /run/hostfs/rw/work
		if ! mount -t overlay overlay -o lowerdir=/run/hostfs/lower,upperdir=/run/hostfs/rw/upper,workdir=/run/hostfs/rw/work /host; then
			echo "VDISK-VM: overlay failed; /host is read-only"
			mount --bind /run/hostfs/lower /host
			mount -t tmpfs tmpfs /host/tmp
		fi
		for d in proc sys dev dev/pts dev/shm; do mount --bind /$d /host/$d; done
		mount -t tmpfs tmpfs /host/run
		export VDISK_HOST=/host
	else
		echo "VDISK-VM: mounting the host file system failed"
	fi
fi
rc=127
cd /vdisk
if [ -f /vdisk/test.sh ]; then
	echo "VDISK-VM-SCRIPT-BEGIN"
	sh /vdisk/test.sh </dev/null
	rc=$?
else
	echo "VDISK-VM: no /vdisk/test.sh"
fi
cd /
sync
echo "VDISK-VM-RESULT: $rc"
poweroff -f
"""

LOAD_MODULE = r"""#!/bin/sh
# load-module NAME...: insmod NAME and what it depends on, in order.
# Prints "VDISK-VM-MODULE: NAME loaded|builtin|missing|failed" for each NAME;
# exits 1 if one is missing or failed.
rc=0
for m in "$@"; do
	n=$(echo "$m" | tr - _)
	if grep -qx "$n" /lib/modules/builtin; then
		echo "VDISK-VM-MODULE: $n builtin"
		continue
	fi
	if [ ! -f "/lib/modules/$n.deps" ]; then
		echo "VDISK-VM-MODULE: $n missing"
		rc=1
		continue
	fi
	st=loaded
	for d in $(cat "/lib/modules/$n.deps"); do
		[ -d "/sys/module/$d" ] && continue
		if ! insmod "/lib/modules/$d.ko"; then
			echo "VDISK-VM: insmod $d failed" >&2
			st=failed
			rc=1
			break
		fi
	done
	echo "VDISK-VM-MODULE: $n $st"
done
exit $rc
"""


def extract_vmlinux(bz):
    """The ELF kernel inside a bzImage, if it has a PVH entry note (so QEMU
    can boot it directly), else None."""
    try:
        if bz[0x202:0x206] != b"HdrS":
            return None
        setup = (bz[0x1F1] or 4) + 1
        off, length = struct.unpack_from("<II", bz, 0x248)
        payload = bz[setup * 512 + off:setup * 512 + off + length]
        want, = struct.unpack_from("<I", payload, len(payload) - 4)
        if payload[:4] == b"\x28\xb5\x2f\xfd":
            elf = subprocess.run(["zstd", "-dcq"], input=payload[:-4],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        elif payload[:6] == b"\xfd7zXZ\0":
            elf = lzma.LZMADecompressor().decompress(payload)
        elif payload[:2] == b"\x1f\x8b":
            elf = zlib.decompressobj(31).decompress(payload)
        else:
            return None
    except (OSError, struct.error, lzma.LZMAError, zlib.error, IndexError):
        return None
    # XEN_ELFNOTE_PHYS32_ENTRY (18) in a "Xen" note: the PVH entry point.
    if len(elf) != want or elf[:4] != b"\x7fELF" or b"\x12\0\0\0Xen\0" not in elf:
        return None
    return elf


HOSTRUN = r"""#!/bin/sh
# hostrun CMD [ARG...]: run CMD in the host's file system (chroot /host),
# in the same directory when it exists there.
[ -d /host/proc/self ] || { echo "hostrun: no /host (boot with host_fs)" >&2; exit 125; }
exec chroot /host /bin/sh -c 'cd "$0" 2>/dev/null || cd /; exec "$@"' "$PWD" "$@"
"""


def _stamp_inputs():
    """A digest of what goes into the initramfs besides the packages."""
    return hashlib.sha256(json.dumps([IMAGE_FORMAT, MODULES, INIT, LOAD_MODULE, HOSTRUN])
                          .encode()).hexdigest()[:16]


def load_info():
    f = cache_dir() / "image.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _write(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_image(update=False, force=False, quiet=False):
    """Make sure the kernel and base initramfs exist; return image.json's dict.
    Raises ImageUnavailable if packages can't be had.  Safe to call from
    several processes at once (they take turns on a lock file)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_image(cache, update, force, quiet)


def _build_image(cache, update, force, quiet):
    info = load_info()
    want_pkg = os.environ.get("VDISK_VM_KERNEL_PKG")
    if (info and not force and not update
            and (cache / info["kernel"]).exists() and (cache / info["initrd"]).exists()
            and info.get("inputs") == _stamp_inputs()
            and (not want_pkg or want_pkg == info["kernel_package"])):
        return info
    debs = cache / "debs"

    pkg = None
    if info and not update and not want_pkg:
        pkg = info.get("kernel_package")
    if not pkg:
        if shutil.which("apt-cache"):
            pkg = pick_kernel_package()
        if not pkg:  # offline: use whatever kernel deb is cached
            have = sorted(debs.glob("linux-image-*.deb"), key=lambda p: _vkey(p.name))
            if have:
                pkg = have[-1].name.split("_")[0]
    if not pkg:
        raise ImageUnavailable("no linux-image package available from apt nor cached")
    kdeb = apt_download(pkg, debs)
    bdeb = apt_download("busybox-static", debs)

    if not quiet:
        log(f"building initramfs from {kdeb.name} and {bdeb.name}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = pathlib.Path(tmp)
        kx, bx = tmp / "k", tmp / "b"
        _run(["dpkg-deb", "-x", str(kdeb), str(kx)])
        _run(["dpkg-deb", "-x", str(bdeb), str(bx)])
        vmlinuz = sorted((kx / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise VMError(f"{kdeb.name} holds no /boot/vmlinuz-*")
        vmlinuz = vmlinuz[-1]
        kver = vmlinuz.name[len("vmlinuz-"):]
        moddir = kx / "lib/modules" / kver
        if not moddir.is_dir():
            moddir = kx / "usr/lib/modules" / kver
        order, chains, blobs, builtin, bi, missing = resolve_modules(moddir, MODULES)
        busybox = bx / "bin/busybox"

        c = Cpio()
        for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "host", "root",
                  "etc", "vdisk", "lib/modules", "usr/bin", "usr/sbin", "sbin", "bin"):
            c.dir(d)
        c.chardev("dev/console", 5, 1)
        c.chardev("dev/null", 1, 3, 0o666)
        c.file("bin/busybox", busybox.read_bytes(), 0o755)
        applets = _run([str(busybox), "--list-full"]).stdout.split()
        for a in applets:
            if a not in ("bin/busybox", "sbin/init", "linuxrc"):
                c.symlink(a, "/bin/busybox")
        c.file("init", INIT.encode(), 0o755)
        c.file("sbin/load-module", LOAD_MODULE.encode(), 0o755)
        c.file("sbin/hostrun", HOSTRUN.encode(), 0o755)
        for n in order:
            c.file(f"lib/modules/{n}.ko", blobs[n])
            c.file(f"lib/modules/{n}.deps", ("\n".join(chains[n]) + "\n").encode())
        c.file("lib/modules/builtin", ("\n".join(builtin) + "\n").encode())
        c.file("etc/vdisk-vm", f"kernel={kver}\npackage={pkg}\n".encode())
        c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        c.file("etc/group", b"root:x:0:\n")
        initrd = gzip.compress(c.finish(), compresslevel=6, mtime=0)

        _write(cache / "vmlinuz", vmlinuz.read_bytes())
        elf = extract_vmlinux(vmlinuz.read_bytes())
        if elf:
            _write(cache / "vmlinux", elf)
        elif (cache / "vmlinux").exists():
            (cache / "vmlinux").unlink()
        _write(cache / "initramfs.cpio.gz", initrd)
    info = {
        "kernel_package": pkg,
        "kernel_deb": kdeb.name,
        "busybox_deb": bdeb.name,
        "kernel_version": kver,
        # The uncompressed ELF boots straight into the kernel (PVH entry):
        # decompressing the bzImage takes seconds under TCG.
        "kernel": "vmlinux" if elf else "vmlinuz",
        "bzimage": "vmlinuz",
        "initrd": "initramfs.cpio.gz",
        "initrd_bytes": len(initrd),
        "modules": order,
        "builtin": bi,
        "missing": missing,
        "inputs": _stamp_inputs(),
    }
    _write(cache / "image.json", (json.dumps(info, indent=1) + "\n").encode())
    if not quiet:
        log(f"kernel {kver} ({pkg}); initramfs {len(initrd) // 1024} KiB; "
            f"{len(order)} modules; built in: {' '.join(bi) or '-'}; "
            f"missing: {' '.join(missing) or '-'}")
    return info


# --------------------------------------------------------------------------
# running

@dataclasses.dataclass
class GuestResult:
    status: int             # the guest script's exit status
    output: str             # what the script printed (console lines after it started)
    console: str            # the whole serial console, QEMU's own messages included
    modules: dict           # module name -> loaded|builtin|missing|failed
    boot_time: float        # host seconds from QEMU's start to /init running
    guest_uptime: float     # guest's /proc/uptime when /init ran
    elapsed: float          # host seconds, QEMU start to exit
    kernel_version: str
    qemu_args: list

    def tail(self, n=30):
        return "\n".join(self.console.splitlines()[-n:])


def virtio_blk(path, id="d0", fmt="raw", extra=""):
    """QEMU arguments for a virtio-blk-pci disk (the guest sees /dev/vda, ...)."""
    return ["-drive", f"file={path},if=none,id={id},format={fmt},cache=writeback",
            "-device", f"virtio-blk-pci,drive={id}{',' + extra if extra else ''}"]


def vhost_user_blk(sock, id="vub0", num_queues=1, extra=""):
    """QEMU arguments for a vhost-user-blk-pci device served at unix socket sock."""
    return ["-chardev", f"socket,id={id},path={sock}",
            "-device", f"vhost-user-blk-pci,chardev={id},num-queues={num_queues}"
            f"{',' + extra if extra else ''}"]


def nvme(path, id="nv0", serial="vdisk0", fmt="raw"):
    return ["-drive", f"file={path},if=none,id={id},format={fmt}",
            "-device", f"nvme,drive={id},serial={serial}"]


def qemu_available():
    return shutil.which(QEMU) is not None


def run_in_guest(script, devices=(), mem="512M", timeout=60, modules=None,
                 files=None, host_fs=False, append="", smp=2, check=False,
                 echo=False):
    """Boot the guest, run `script` (sh) in it as root, return a GuestResult.

    devices: extra QEMU arguments (a flat list), e.g. virtio_blk(path).
    modules: modules to load before the script (default: virtio_blk); the
      script can load more with `load-module NAME...`.
    files: {guest_path: bytes | str | host path (pathlib.Path)} copied into
      the guest's initramfs.
    host_fs: show the host's / at /host (9p, read-only, under a tmpfs
      overlay so the guest can write there without touching the host), with
      the guest's /proc, /sys, /dev bound in and /run a tmpfs, so
      `hostrun CMD` (chroot /host) runs host binaries, e.g. a build of
      vdiskd, on the guest kernel.
    timeout: wall-clock seconds; QEMU is killed and GuestTimeout raised, with
      the last console lines in its message.
    check: raise VMError when the script's status is not 0.
    echo: copy the console to stderr (or to this file object) as it arrives.
    """
    if not qemu_available():
        raise VMError(f"{QEMU} not found (Debian package qemu-system-x86)")
    info = build_image(quiet=not echo)
    cache = cache_dir()
    mods = list(DEFAULT_LOAD if modules is None else modules)

    run = Cpio()
    run.file("vdisk/test.sh", script.encode() if isinstance(script, str) else script, 0o755)
    for gpath, content in (files or {}).items():
        if isinstance(content, pathlib.Path):
            mode = content.stat().st_mode & 0o777
            content = content.read_bytes()
        else:
            mode = 0o755
            content = content.encode() if isinstance(content, str) else content
        run.file(gpath, content, mode)

    with tempfile.TemporaryDirectory(prefix="vdisk-vm-") as tmp:
        initrd = pathlib.Path(tmp) / "initrd"
        base = (cache / info["initrd"]).read_bytes()
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + gzip.compress(run.finish(), 1))
        cmdline = ["console=ttyS0", "quiet", "panic=-1", "rdinit=/init"] + FAST_BOOT
        if mods:
            cmdline.append("vdisk.modules=" + ",".join(mods))
        if host_fs:
            cmdline.append("vdisk.hostfs=1")
        if append:
            cmdline.append(append)
        args = [QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(smp),
                "-m", mem, "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-numa", "node,memdev=mem",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-no-reboot",
                "-kernel", str(cache / info["kernel"]), "-initrd", str(initrd),
                "-append", " ".join(cmdline)]
        if host_fs:
            args += ["-virtfs", "local,path=/,mount_tag=vdiskhost,security_model=none,"
                     "readonly=on,multidevs=remap"]
        args += [str(a) for a in devices]
        # A kernel that panics before /init ran the script never touched the
        # devices under test: that is the emulator (TCG has been seen to oops
        # in the timer code at boot now and then), so boot once more.
        try:
            return _boot(args, timeout, check, echo, info)
        except BootCrash as e:
            print(f"vm: guest kernel crashed during boot, booting again: {str(e)[:200]}", file=sys.stderr)
            return _boot(args, timeout, check, echo, info)


def _boot(args, timeout, check, echo, info):
    lines = []
    state = {"booted": None, "result": None}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def reader():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            lines.append(line)
            if echo:
                print(line, file=sys.stderr if echo is True else echo, flush=True)
            if state["booted"] is None and BOOTED_RE.search(line):
                state["booted"] = time.monotonic() - t0
            m = RESULT_RE.search(line)
            if m and state["result"] is None:
                state["result"] = int(m.group(1))
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    finally:
        th.join(5)
    elapsed = time.monotonic() - t0

    def tail(n=30):
        return "\n".join(lines[-n:])
    if timed_out and state["result"] is None:
        raise GuestTimeout(f"guest timed out after {timeout}s; last console lines:\n{tail()}")
    if state["result"] is None and state["booted"] is None and any("Kernel panic" in x for x in lines):
        raise BootCrash(f"guest kernel panicked during boot; last console lines:\n{tail()}")
    if state["result"] is None:
        raise VMError(f"QEMU exited with {proc.returncode} and no result; "
                      f"last console lines:\n{tail()}")
    console = "\n".join(lines)
    out = []
    started = False
    for line in lines:
        if RESULT_RE.search(line):
            break
        if started:
            out.append(line)
        elif line.strip() == BEGIN:
            started = True
    mods = {}
    for line in lines:
        m = MODULE_RE.search(line)
        if m:
            mods[m.group(1)] = m.group(2)
    bt = 0.0
    for line in lines:
        m = BOOTED_RE.search(line)
        if m:
            bt = float(m.group(1))
            break
    res = GuestResult(status=state["result"], output="\n".join(out), console=console,
                      modules=mods, boot_time=state["booted"] or 0.0, guest_uptime=bt,
                      elapsed=elapsed, kernel_version=info["kernel_version"],
                      qemu_args=args)
    if check and res.status != 0:
        raise VMError(f"guest script exited with {res.status}; last console lines:\n"
                      f"{res.tail()}")
    return res


# --------------------------------------------------------------------------
# command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="vm.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download packages and build the kernel + initramfs")
    b.add_argument("--update", action="store_true",
                   help="pick the newest kernel package again (default: keep the cached one)")
    b.add_argument("--force", action="store_true", help="rebuild the initramfs")
    sub.add_parser("info", help="print the cached image's description (JSON)")
    r = sub.add_parser("run", help="boot the guest and run a script in it",
                       usage="%(prog)s [options] (SCRIPT | -c COMMAND) [-- QEMU-ARG...]",
                       epilog="Arguments after -- go to QEMU verbatim.  Exit status: the "
                       "script's; 124 on timeout; 125 if the guest could not be run.")
    r.add_argument("script", nargs="?", help="sh script file to run in the guest")
    r.add_argument("-c", dest="command", help="run this sh command line instead of a file")
    r.add_argument("-m", "--mem", default="512M")
    r.add_argument("-t", "--timeout", type=float, default=60)
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--modules", help="comma-separated modules to load first "
                   f"(default {','.join(DEFAULT_LOAD)})")
    r.add_argument("--file", action="append", default=[], metavar="GUEST=HOST",
                   help="copy host file HOST into the guest at GUEST")
    r.add_argument("--drive", action="append", default=[], metavar="IMG",
                   help="attach IMG (raw) as a virtio-blk disk")
    r.add_argument("--host-fs", action="store_true",
                   help="show the host's / at /host in the guest (writes stay in the guest); "
                   "`hostrun CMD` runs a host program there")
    r.add_argument("--append", default="", help="extra kernel command line")
    r.add_argument("-q", "--quiet", action="store_true", help="don't echo the console")
    argv = list(sys.argv[1:] if argv is None else argv)
    qargs = []
    if "--" in argv:
        qargs = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    a = ap.parse_args(argv)

    try:
        if a.cmd == "build":
            info = build_image(update=a.update, force=a.force)
            print(f"kernel {info['kernel_version']} from {info['kernel_deb']}\n"
                  f"busybox from {info['busybox_deb']}\n"
                  f"{cache_dir() / info['kernel']}\n{cache_dir() / info['initrd']} "
                  f"({info['initrd_bytes'] // 1024} KiB)\n"
                  f"modules: {' '.join(info['modules'])}\n"
                  f"built in: {' '.join(info['builtin']) or '-'}\n"
                  f"missing: {' '.join(info['missing']) or '-'}")
            return 0
        if a.cmd == "info":
            info = load_info()
            if not info:
                print("no image built yet (run tests/vm/build-image)", file=sys.stderr)
                return 1
            print(json.dumps(info, indent=1))
            return 0
        if bool(a.script) == bool(a.command):
            ap.error("run: give a script file or -c COMMAND (one of them)")
        script = a.command if a.command else pathlib.Path(a.script).read_text()
        devices = []
        for i, img in enumerate(a.drive):
            devices += virtio_blk(os.path.abspath(img), id=f"drive{i}")
        devices += qargs
        files = {}
        for f in a.file:
            g, _, h = f.partition("=")
            files[g] = pathlib.Path(h)
        mods = a.modules.split(",") if a.modules is not None else None
        res = run_in_guest(script, devices=devices, mem=a.mem, timeout=a.timeout,
                           modules=mods, files=files, host_fs=a.host_fs,
                           append=a.append, smp=a.smp, echo=None if a.quiet else sys.stdout)
        if a.quiet:
            if res.output:
                print(res.output)
        log(f"status {res.status}; kernel {res.kernel_version}; /init after "
            f"{res.boot_time:.2f}s (guest uptime {res.guest_uptime:.2f}s); "
            f"total {res.elapsed:.2f}s")
        return res.status
    except GuestTimeout as e:
        log(str(e))
        return 124
    except VMError as e:
        log(str(e))
        return 125


if __name__ == "__main__":
    sys.exit(main())
