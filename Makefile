# Thin wrapper around meson/ninja.  `make demo` and `make check` install the
# Debian packages they need first (scripts/install-deps is idempotent).
BUILD ?= build
ASAN_BUILD ?= build-asan
PREFIX ?= /usr/local
# Every pytest suite: libvdisk drivers, the NBD client, the image tool, qcow2,
# the block-layer bench, the daemon.
PYTEST_DIRS := $(wildcard tests/integration tests/nbd tests/vhost-user tests/image tests/bench tests/daemon tests/fuse)
PYTEST = /usr/bin/python3 -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS)
PYTEST_JOBS ?= 3

.PHONY: all deps demo check style check-unit check-integration check-asan install clean bench

all: $(BUILD)/build.ninja
	ninja -C $(BUILD)
	@ln -sf tools/vdisk $(BUILD)/vdisk
	@ln -sf daemon/vdiskd $(BUILD)/vdiskd

$(BUILD)/build.ninja:
	meson setup $(BUILD) --prefix=$(PREFIX)

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debug

deps:
	scripts/install-deps

demo: deps all
	scripts/demo

check: deps style all check-unit check-integration check-asan

# Banned libc calls, SPDX lines, whitespace (scripts/check-style).
style:
	scripts/check-style

check-unit: all
	meson test -C $(BUILD) --print-errorlogs

check-integration: all
	@set -e; for d in $(PYTEST_DIRS); do echo "== pytest $$d"; \
		VDISK_BUILD=$(CURDIR)/$(BUILD) $(PYTEST) $$d; done
	@# TCG guests: one at a time (two CPUs), so boot times stay predictable.
	@set -e; for d in $(wildcard tests/vm); do echo "== pytest $$d"; \
		VDISK_BUILD=$(CURDIR)/$(BUILD) $(PYTEST) -n 0 $$d; done

check-asan: $(ASAN_BUILD)/build.ninja
	ninja -C $(ASAN_BUILD)
	@ln -sf tools/vdisk $(ASAN_BUILD)/vdisk
	@ln -sf daemon/vdiskd $(ASAN_BUILD)/vdiskd
	# The qcow2 crash-point sweep (~100 crash points per case) runs whole in the
	# normal build and every 10th point here; every other qcow2 suite runs whole.
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		meson test -C $(ASAN_BUILD) --print-errorlogs --no-suite qcow2
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		meson test -C $(ASAN_BUILD) --print-errorlogs qcow2-unit qcow2-read-qemu-images qcow2-write \
		qcow2-features qcow2-check qcow2-malformed
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		QCOW2_CRASH_STRIDE=10 meson test -C $(ASAN_BUILD) --print-errorlogs qcow2-crash
	@set -e; for d in $(PYTEST_DIRS); do echo "== pytest (ASan+UBSan) $$d"; \
		ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		VDISK_BUILD=$(CURDIR)/$(ASAN_BUILD) $(PYTEST) $$d; done

install: all
	meson install -C $(BUILD)

bench: all
	bench/drivers.sh

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
