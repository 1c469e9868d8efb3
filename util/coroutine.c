/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Stackful coroutines.
 *
 * Each coroutine has its own mmap'd stack (with a guard page below it, so an
 * overflow faults instead of corrupting a neighbour).  Switching saves the
 * callee-saved registers and the stack pointer of one side and restores the
 * other's: on x86_64 that is a dozen instructions of hand-written assembly
 * (everything the ABI lets a call clobber is already dead at the call site,
 * so only rbx, rbp, r12-r15 and rsp need saving); other architectures use
 * ucontext, which is correct but makes a signal-mask syscall per switch.
 *
 * Finished coroutines go back to a per-thread pool with their stack, so once
 * a thread has warmed up, creating a coroutine is popping a list: no malloc,
 * no mmap on the hot path.
 *
 * AddressSanitizer must be told about every stack switch
 * (__sanitizer_start_switch_fiber before, __sanitizer_finish_switch_fiber
 * after), or it reports false stack-buffer-overflows and mis-handles its fake
 * stacks; see the asan_* helpers below.
 */
#include <assert.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "coroutine.h"
#include "coroutine-int.h"
#include "loop.h"

/* VD_CO_FORCE_UCONTEXT: build the portable path on x86_64 too (to test it). */
#if !defined(__x86_64__) || defined(VD_CO_FORCE_UCONTEXT)
#include <ucontext.h>
#define VD_CO_UCONTEXT 1
#endif

#if defined(__SANITIZE_ADDRESS__)
#define VD_CO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define VD_CO_ASAN 1
#endif
#endif

#ifdef VD_CO_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define CO_STACK_SIZE (64u * 1024)
#define CO_POOL_MAX 256 /* coroutines kept per thread for reuse */

struct vd_co {
	vd_co_fn fn;
	void *arg;
	struct vd_co *caller; /* who entered us: returned to by yield/exit */
	struct vd_co *pool_next;
	bool finished;
	bool scheduled; /* on the loop's run list (see vd_co_set_scheduled) */

	void *stack;       /* lowest usable byte (above the guard page) */
	size_t stack_size; /* usable bytes */
	void *map;         /* the whole mapping, guard page included */
	size_t map_size;

#ifdef VD_CO_UCONTEXT
	ucontext_t ctx;        /* this coroutine's saved context */
	ucontext_t caller_ctx; /* where yield goes back to */
#else
	void *sp;        /* saved stack pointer while switched out */
	void *caller_sp; /* the enterer's stack pointer while we run */
#endif

#ifdef VD_CO_ASAN
	void *fake_stack;          /* ASan's fake stack of this coroutine while switched out */
	const void *caller_bottom; /* the enterer's stack, to announce when switching back */
	size_t caller_size;
#endif
};

static _Thread_local struct vd_co *current;
static _Thread_local struct vd_co *pool;
static _Thread_local unsigned pool_len;

/* ---- AddressSanitizer fiber annotations ----------------------------------- */

#ifdef VD_CO_ASAN
/* Before switching into co: announce its stack; keep our own fake stack. */
static void asan_before_enter(struct vd_co *co, void **caller_fake_stack)
{
	__sanitizer_start_switch_fiber(caller_fake_stack, co->stack, co->stack_size);
}

/* Back in the enterer after co yielded or finished. */
static void asan_after_enter(void *caller_fake_stack)
{
	__sanitizer_finish_switch_fiber(caller_fake_stack, NULL, NULL);
}

/* In co, just switched in: remember the enterer's stack for the way back. */
static void asan_on_resume(struct vd_co *co, void *fake_stack)
{
	__sanitizer_finish_switch_fiber(fake_stack, &co->caller_bottom, &co->caller_size);
}

static void asan_on_resume_after_yield(struct vd_co *co)
{
	asan_on_resume(co, co->fake_stack);
}

/* In co, about to switch back; a finished coroutine's fake stack is dropped (NULL). */
static void asan_before_leave(struct vd_co *co, bool finishing)
{
	__sanitizer_start_switch_fiber(finishing ? NULL : &co->fake_stack, co->caller_bottom, co->caller_size);
}
#else
static inline void asan_before_enter(struct vd_co *co, void **caller_fake_stack)
{
	(void)co;
	(void)caller_fake_stack;
}
static inline void asan_after_enter(void *caller_fake_stack)
{
	(void)caller_fake_stack;
}
static inline void asan_on_resume(struct vd_co *co, void *fake_stack)
{
	(void)co;
	(void)fake_stack;
}
static inline void asan_on_resume_after_yield(struct vd_co *co)
{
	(void)co;
}
static inline void asan_before_leave(struct vd_co *co, bool finishing)
{
	(void)co;
	(void)finishing;
}
#endif

/* ---- the context switch ---------------------------------------------------- */

static void co_main(void) __attribute__((noreturn, used));

#ifndef VD_CO_UCONTEXT
/*
 * void vd_co_switch(void **save_sp, void *load_sp)
 *
 * Push the callee-saved registers, store rsp in *save_sp, load load_sp, pop
 * the other side's registers and return into it.  A new coroutine's stack is
 * laid out (co_init_stack) so that this "return" lands in co_main.
 */
void vd_co_switch(void **save_sp, void *load_sp) __attribute__((visibility("hidden")));
__asm__(".text\n"
	".globl vd_co_switch\n"
	".hidden vd_co_switch\n"
	".type vd_co_switch, @function\n"
	".p2align 4\n"
	"vd_co_switch:\n"
	"\t.cfi_startproc\n"
#ifdef __CET__
	"\tendbr64\n"
#endif
	"\tpushq %rbp\n"
	"\tpushq %rbx\n"
	"\tpushq %r12\n"
	"\tpushq %r13\n"
	"\tpushq %r14\n"
	"\tpushq %r15\n"
	"\tmovq %rsp, (%rdi)\n"
	"\tmovq %rsi, %rsp\n"
	"\tpopq %r15\n"
	"\tpopq %r14\n"
	"\tpopq %r13\n"
	"\tpopq %r12\n"
	"\tpopq %rbx\n"
	"\tpopq %rbp\n"
	"\tret\n"
	"\t.cfi_endproc\n"
	".size vd_co_switch, .-vd_co_switch\n");

/*
 * Initial frame, from the new stack pointer upwards: six zeroed registers
 * (r15 r14 r13 r12 rbx rbp — rbp = 0 ends backtraces here), the "return
 * address" co_main, and a zero fake return address for co_main itself.
 * co_main is entered with rsp = top - 8, i.e. rsp % 16 == 8, exactly as if it
 * had been called, which is what the ABI promises a function on entry.
 */
static void co_init_stack(struct vd_co *co)
{
	uintptr_t top = ((uintptr_t)co->stack + co->stack_size) & ~(uintptr_t)15;
	uint64_t *sp = (uint64_t *)top;

	*--sp = 0;                            /* co_main's return address: never used */
	*--sp = (uint64_t)(uintptr_t)co_main; /* where vd_co_switch's ret goes */
	for (int i = 0; i < 6; i++)
		*--sp = 0;
	co->sp = sp;
}

static inline void switch_into(struct vd_co *co)
{
	vd_co_switch(&co->caller_sp, co->sp);
}

static inline void switch_out(struct vd_co *co)
{
	vd_co_switch(&co->sp, co->caller_sp);
}
#else
static void co_init_stack(struct vd_co *co)
{
	getcontext(&co->ctx);
	co->ctx.uc_stack.ss_sp = co->stack;
	co->ctx.uc_stack.ss_size = co->stack_size;
	co->ctx.uc_link = NULL;
	makecontext(&co->ctx, (void (*)(void))co_main, 0);
}

static inline void switch_into(struct vd_co *co)
{
	swapcontext(&co->caller_ctx, &co->ctx);
}

static inline void switch_out(struct vd_co *co)
{
	swapcontext(&co->ctx, &co->caller_ctx);
}
#endif

/* First code a coroutine runs; `current` was set by vd_co_enter. */
static void co_main(void)
{
	struct vd_co *co = current;

	for (;;) {
		asan_on_resume(co, NULL);
		co->fn(co->arg);
		/* Still on the loop's run list, the loop would enter a recycled coroutine. */
		assert(!co->scheduled && "coroutine finished while scheduled");
		co->finished = true;
		asan_before_leave(co, true);
		switch_out(co);
		/* A pooled coroutine is re-entered here with a new fn (vd_co_create). */
		co = current;
	}
}

/* ---- stacks and the per-thread pool ---------------------------------------- */

static size_t page_size(void)
{
	static size_t size;

	if (!size)
		size = (size_t)sysconf(_SC_PAGESIZE);
	return size;
}

static struct vd_co *co_alloc(void)
{
	struct vd_co *co = calloc(1, sizeof(*co));
	size_t guard = page_size();

	if (!co)
		return NULL;
	co->map_size = CO_STACK_SIZE + guard;
	co->map = mmap(NULL, co->map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (co->map == MAP_FAILED) {
		free(co);
		return NULL;
	}
	/* Stacks grow down: the guard page is the lowest one. */
	if (mprotect(co->map, guard, PROT_NONE) < 0) {
		munmap(co->map, co->map_size);
		free(co);
		return NULL;
	}
	co->stack = (char *)co->map + guard;
	co->stack_size = CO_STACK_SIZE;
	return co;
}

static void co_free(struct vd_co *co)
{
	munmap(co->map, co->map_size);
	free(co);
}

static pthread_key_t pool_key;
static pthread_once_t pool_key_once = PTHREAD_ONCE_INIT;

static void pool_thread_exit(void *unused)
{
	(void)unused;
	vd_co_pool_drain();
}

static void pool_key_init(void)
{
	pthread_key_create(&pool_key, pool_thread_exit);
}

static _Thread_local bool pool_registered;

/* Give the pool a thread-exit destructor so pooled stacks are not leaked. */
static void pool_register_thread(void)
{
	if (pool_registered)
		return;
	pthread_once(&pool_key_once, pool_key_init);
	pthread_setspecific(pool_key, (void *)1);
	pool_registered = true;
}

static void pool_put(struct vd_co *co)
{
	if (pool_len >= CO_POOL_MAX) {
		co_free(co);
		return;
	}
	pool_register_thread();
	co->pool_next = pool;
	pool = co;
	pool_len++;
}

void vd_co_pool_drain(void)
{
	while (pool) {
		struct vd_co *co = pool;

		pool = co->pool_next;
		co_free(co);
	}
	pool_len = 0;
}

/* ---- public API ------------------------------------------------------------- */

struct vd_co *vd_co_create(vd_co_fn fn, void *arg)
{
	struct vd_co *co = pool;

	if (co) {
		/* Its stack still holds co_main's loop, which will call the new fn. */
		pool = co->pool_next;
		pool_len--;
	} else {
		co = co_alloc();
		if (!co)
			return NULL;
		co_init_stack(co);
	}
	co->fn = fn;
	co->arg = arg;
	co->caller = NULL;
	co->pool_next = NULL;
	co->finished = false;
	co->scheduled = false;
	return co;
}

void vd_co_enter(struct vd_co *co)
{
	void *caller_fake_stack = NULL;

	assert(!co->finished);
	assert(co->caller == NULL && co != current); /* not running, not already entered */
	co->caller = current;
	current = co;
	asan_before_enter(co, &caller_fake_stack);
	switch_into(co);
	asan_after_enter(caller_fake_stack);
	current = co->caller;
	co->caller = NULL;
	if (co->finished)
		pool_put(co);
}

void vd_co_yield(void)
{
	struct vd_co *co = current;

	assert(co && "vd_co_yield outside a coroutine");
	asan_before_leave(co, false);
	switch_out(co);
	asan_on_resume_after_yield(co);
}

struct vd_co *vd_co_self(void)
{
	return current;
}

bool vd_co_set_scheduled(struct vd_co *co, bool scheduled)
{
	bool was = co->scheduled;

	co->scheduled = scheduled;
	return was;
}

/* ---- run a coroutine to completion from plain code -------------------------- */

struct run_sync {
	vd_co_fn fn;
	void *arg;
	bool done;
};

static void run_sync_entry(void *opaque)
{
	struct run_sync *rs = opaque;

	rs->fn(rs->arg);
	rs->done = true;
}

void vd_co_run_sync(vd_co_fn fn, void *arg)
{
	struct run_sync rs = { .fn = fn, .arg = arg, .done = false };
	struct vd_co *co;

	/* Already in a coroutine: a nested loop would deadlock; just call it. */
	if (vd_in_co()) {
		fn(arg);
		return;
	}
	co = vd_co_create(run_sync_entry, &rs);
	if (!co) {
		/* Out of memory for a stack: no way to report it to fn's caller. */
		fprintf(stderr, "vd_co_run_sync: cannot allocate a coroutine stack\n");
		abort();
	}
	vd_co_enter(co);
	vd_loop_run_until(vd_loop_get(), &rs.done);
}

/* ---- mutex and wait queue ---------------------------------------------------- */

/*
 * Lives on the waiting coroutine's stack while it is parked; whoever wakes it
 * unlinks it first, so the list never holds a dangling pointer (GCC cannot
 * see that across the yield).
 */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Wdangling-pointer"
#endif
struct vd_co_waiter {
	struct vd_co *co;
	struct vd_co_waiter *next;
	bool woken;               /* written and read in the waiter's own thread only */
	struct vd_loop *loop;     /* the waiter's thread's loop */
	struct vd_loop_msg msg;   /* a wake from another thread travels in this */
};

static void waiters_push(struct vd_co_waiter **head, struct vd_co_waiter **tail, struct vd_co_waiter *w)
{
	w->next = NULL;
	if (*tail)
		(*tail)->next = w;
	else
		*head = w;
	*tail = w;
}

static struct vd_co_waiter *waiters_pop(struct vd_co_waiter **head, struct vd_co_waiter **tail)
{
	struct vd_co_waiter *w = *head;

	if (w) {
		*head = w->next;
		if (!*head)
			*tail = NULL;
	}
	return w;
}

static void waiter_wake_here(void *opaque)
{
	struct vd_co_waiter *w = opaque;

	w->woken = true;
	vd_loop_schedule(w->loop, w->co);
}

/*
 * Wake w from the loop, never inline: the waker keeps running until it
 * yields.  A waiter in another thread is woken by a message to its loop
 * (wait queues shared between threads are protected by the caller's
 * pthread mutex, see vd_co_queue_wait_mt); the waker must not touch w after
 * posting, since w lives on the waiter's stack.
 */
static void waiter_wake(struct vd_co_waiter *w)
{
	if (w->loop == vd_loop_get()) {
		waiter_wake_here(w);
		return;
	}
	w->msg.fn = waiter_wake_here;
	w->msg.arg = w;
	vd_loop_post_msg(w->loop, &w->msg);
}

static void waiter_park(struct vd_co_waiter *w)
{
	while (!w->woken)
		vd_co_yield();
}

void vd_co_mutex_init(struct vd_co_mutex *m)
{
	m->locked = false;
	m->head = m->tail = NULL;
}

void vd_co_mutex_lock(struct vd_co_mutex *m)
{
	struct vd_co_waiter w = { .co = vd_co_self(), .loop = vd_loop_get() };

	assert(w.co && "vd_co_mutex_lock outside a coroutine");
	if (!m->locked) {
		m->locked = true;
		return;
	}
	waiters_push(&m->head, &m->tail, &w);
	waiter_park(&w);
	/* unlock handed the mutex over to us: it stayed locked. */
	assert(m->locked);
}

/*
 * Hand the lock directly to the first waiter (it stays locked), so a
 * coroutine that unlocks and immediately locks again queues behind the
 * waiters instead of barging ahead: strict FIFO.
 */
void vd_co_mutex_unlock(struct vd_co_mutex *m)
{
	struct vd_co_waiter *w;

	assert(m->locked);
	w = waiters_pop(&m->head, &m->tail);
	if (w)
		waiter_wake(w);
	else
		m->locked = false;
}

void vd_co_queue_init(struct vd_co_queue *wq)
{
	wq->head = wq->tail = NULL;
}

void vd_co_queue_wait(struct vd_co_queue *wq, struct vd_co_mutex *m)
{
	struct vd_co_waiter w = { .co = vd_co_self(), .loop = vd_loop_get() };

	assert(w.co && "vd_co_queue_wait outside a coroutine");
	waiters_push(&wq->head, &wq->tail, &w);
	if (m)
		vd_co_mutex_unlock(m);
	waiter_park(&w);
	if (m)
		vd_co_mutex_lock(m);
}

void vd_co_queue_wait_mt(struct vd_co_queue *wq, pthread_mutex_t *lock)
{
	struct vd_co_waiter w = { .co = vd_co_self(), .loop = vd_loop_get() };

	assert(w.co && "vd_co_queue_wait_mt outside a coroutine");
	/* A waker in another thread posts to our loop: every thread sharing wq accepts posts. */
	waiters_push(&wq->head, &wq->tail, &w);
	pthread_mutex_unlock(lock);
	/* A wake that comes before we yield is only delivered once we do (it goes through the loop). */
	waiter_park(&w);
	pthread_mutex_lock(lock);
}

bool vd_co_queue_wake_one(struct vd_co_queue *wq)
{
	struct vd_co_waiter *w = waiters_pop(&wq->head, &wq->tail);

	if (!w)
		return false;
	waiter_wake(w);
	return true;
}

void vd_co_queue_wake_all(struct vd_co_queue *wq)
{
	while (vd_co_queue_wake_one(wq))
		;
}

bool vd_co_queue_empty(const struct vd_co_queue *wq)
{
	return wq->head == NULL;
}
