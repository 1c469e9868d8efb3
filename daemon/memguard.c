/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Surviving SIGBUS on memory a peer shares with us (vhost-user guest RAM).
 *
 * A file mapping faults with SIGBUS where the file no longer backs it: a
 * front end that shrinks its memfd after SET_MEM_TABLE (or a hugetlbfs file
 * that runs out of huge pages) would kill the daemon at the next ring or
 * buffer access, and such accesses happen anywhere: export code, block
 * drivers copying into request buffers, in any thread, often on a coroutine
 * stack.  (The kernel's own copies -- io_uring, pread -- get EFAULT instead
 * and fail the request.)  Jumping out of arbitrary code is not sound, so the
 * handler makes the access succeed instead: it maps anonymous memory over the
 * whole guarded range (MAP_FIXED replaces the file mapping atomically for
 * every thread), flags the range and writes to its owner's eventfd, then
 * returns and the faulting instruction runs again on the new pages.  The
 * owner sees the flag in its loop and resets the device; whatever was read or
 * written meanwhile went to memory nobody else sees.  Wayland compositors
 * treat client shm pools the same way.
 *
 * The table is fixed-size and lock-free for the handler; adding and removing
 * take a mutex.  Removing waits for handlers still looking at the entry
 * before the caller unmaps the range, so a handler never maps over memory
 * that has been reused.  A SIGBUS elsewhere (or sent with kill) goes to the
 * previous handler, or kills the process as it would have without us.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "daemon.h"

#define GUARDS_MAX 1024

struct guard {
	uintptr_t start;
	size_t len;
	int notify_fd;
	int live;    /* atomic: the handler may use this entry */
	int users;   /* atomic: handlers looking at it now */
	int faulted; /* atomic: the handler replaced the range */
};

static struct guard guards[GUARDS_MAX];
static pthread_mutex_t guards_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static struct sigaction previous;
static int install_error;

static bool fix_fault(uintptr_t addr)
{
	bool ours = false;

	for (int i = 0; i < GUARDS_MAX && !ours; i++) {
		struct guard *g = &guards[i];

		if (!__atomic_load_n(&g->live, __ATOMIC_ACQUIRE))
			continue;
		__atomic_add_fetch(&g->users, 1, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&g->live, __ATOMIC_SEQ_CST) && addr - g->start < g->len) {
			void *p = mmap((void *)g->start, g->len, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);

			if (p != MAP_FAILED) {
				uint64_t one = 1;
				ssize_t n;

				__atomic_store_n(&g->faulted, 1, __ATOMIC_SEQ_CST);
				n = write(g->notify_fd, &one, sizeof(one));
				(void)n;
				ours = true;
			}
		}
		__atomic_sub_fetch(&g->users, 1, __ATOMIC_SEQ_CST);
	}
	return ours;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	int saved_errno = errno;

	/* Only an access past the end of a mapped file (BUS_ADRERR) can be a shrunk region; not memory errors. */
	if (si->si_code == BUS_ADRERR && fix_fault((uintptr_t)si->si_addr)) {
		errno = saved_errno;
		return; /* the access runs again on the anonymous pages */
	}
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, si, uc);
	} else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
	} else {
		/*
		 * What would have happened without us: the default action, and
		 * the guard is not left uninstalled behind a survivor.  raise()
		 * delivers once this handler returns (the signal is blocked here).
		 */
		signal(sig, SIG_DFL);
		raise(sig);
	}
	errno = saved_errno;
}

static void install(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, &previous) < 0)
		install_error = errno;
}

int vdd_memguard_add(void *addr, size_t len, int notify_fd)
{
	int slot = -ENOSPC;

	pthread_once(&install_once, install);
	if (install_error)
		return -install_error;
	pthread_mutex_lock(&guards_lock);
	for (int i = 0; i < GUARDS_MAX; i++) {
		struct guard *g = &guards[i];

		if (__atomic_load_n(&g->live, __ATOMIC_ACQUIRE))
			continue;
		g->start = (uintptr_t)addr;
		g->len = len;
		g->notify_fd = notify_fd;
		__atomic_store_n(&g->faulted, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&g->live, 1, __ATOMIC_RELEASE);
		slot = i;
		break;
	}
	pthread_mutex_unlock(&guards_lock);
	return slot;
}

bool vdd_memguard_faulted(int slot)
{
	return slot >= 0 && slot < GUARDS_MAX && __atomic_load_n(&guards[slot].faulted, __ATOMIC_ACQUIRE);
}

void vdd_memguard_remove(int slot)
{
	struct guard *g;

	if (slot < 0 || slot >= GUARDS_MAX)
		return;
	g = &guards[slot];
	pthread_mutex_lock(&guards_lock);
	__atomic_store_n(&g->live, 0, __ATOMIC_SEQ_CST);
	/* A handler that saw the entry live finishes before the range may be unmapped and reused. */
	while (__atomic_load_n(&g->users, __ATOMIC_SEQ_CST))
		sched_yield();
	pthread_mutex_unlock(&guards_lock);
}
