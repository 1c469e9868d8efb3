/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Coroutines: enter/yield, nesting, the stack pool, mutex fairness, wait queues. */
#include "test-block-util.h"

/* ---- enter / yield ---- */

static void count_three(void *opaque)
{
	int *steps = opaque;

	assert_true(vd_in_co());
	(*steps)++;
	vd_co_yield();
	(*steps)++;
	vd_co_yield();
	(*steps)++;
}

static void enter_runs_until_each_yield(void **state)
{
	int steps = 0;
	struct vd_co *co = vd_co_create(count_three, &steps);

	(void)state;
	assert_false(vd_in_co());
	vd_co_enter(co);
	assert_int_equal(steps, 1);
	vd_co_enter(co);
	assert_int_equal(steps, 2);
	vd_co_enter(co); /* finishes: back to the pool */
	assert_int_equal(steps, 3);
	assert_null(vd_co_self());
}

/* ---- nesting: a coroutine entering another gets control back on yield ---- */

struct nest {
	struct vd_co *outer, *inner;
	char log[16];
	int n;
};

static void inner_fn(void *opaque)
{
	struct nest *t = opaque;

	assert_ptr_equal(vd_co_self(), t->inner);
	t->log[t->n++] = 'i';
	vd_co_yield(); /* back to outer, not to the thread */
	t->log[t->n++] = 'j';
}

static void outer_fn(void *opaque)
{
	struct nest *t = opaque;

	t->log[t->n++] = 'o';
	t->inner = vd_co_create(inner_fn, t);
	vd_co_enter(t->inner);
	assert_ptr_equal(vd_co_self(), t->outer);
	t->log[t->n++] = 'p';
	vd_co_yield();
	vd_co_enter(t->inner); /* inner finishes inside outer */
	t->log[t->n++] = 'q';
}

static void nested_enter_returns_to_the_enterer(void **state)
{
	struct nest t = { 0 };

	(void)state;
	t.outer = vd_co_create(outer_fn, &t);
	vd_co_enter(t.outer);
	assert_string_equal(t.log, "oip");
	vd_co_enter(t.outer);
	assert_string_equal(t.log, "oipjq");
}

/* ---- the pool ---- */

static void nothing(void *opaque)
{
	(void)opaque;
}

static void finished_coroutines_are_reused(void **state)
{
	struct vd_co *a, *b;

	(void)state;
	a = vd_co_create(nothing, NULL);
	vd_co_enter(a);
	b = vd_co_create(nothing, NULL);
	assert_ptr_equal(a, b); /* same object, same stack: no allocation */
	vd_co_enter(b);
}

/* Uses well over half of the 64 KiB stack: stacks are real and separate. */
static int deep(int n)
{
	volatile char pad[1024];

	pad[0] = (char)n;
	return n == 0 ? pad[0] : deep(n - 1) + 1 + pad[0] - (char)n;
}

static void deep_fn(void *opaque)
{
	*(int *)opaque = deep(40);
}

static void coroutine_stacks_hold_deep_calls(void **state)
{
	int result = 0;

	(void)state;
	vd_co_enter(vd_co_create(deep_fn, &result));
	assert_int_equal(result, 40);
}

/* Many suspended at once, each with its own stack contents. */
static void keep_local(void *opaque)
{
	int *slot = opaque;
	int mine = *slot;

	vd_co_yield();
	*slot = mine * 2;
}

static void many_suspended_coroutines_keep_their_stacks(void **state)
{
	enum { N = 300 }; /* more than the pool keeps */
	static struct vd_co *cos[N];
	static int slots[N];

	(void)state;
	for (int i = 0; i < N; i++) {
		slots[i] = i;
		cos[i] = vd_co_create(keep_local, &slots[i]);
		assert_non_null(cos[i]);
		vd_co_enter(cos[i]);
	}
	for (int i = N - 1; i >= 0; i--)
		vd_co_enter(cos[i]);
	for (int i = 0; i < N; i++)
		assert_int_equal(slots[i], 2 * i);
}

/* ---- run_sync ---- */

static void set_flag(void *opaque)
{
	assert_true(vd_in_co());
	*(int *)opaque = 42;
}

static void run_sync_runs_to_completion(void **state)
{
	int v = 0;

	(void)state;
	vd_co_run_sync(set_flag, &v);
	assert_int_equal(v, 42);
}

/* ---- mutex ---- */

struct mutex_test {
	struct vd_co_mutex m;
	int order[64];
	int n;
	int holders; /* must never exceed 1 */
};

struct locker {
	struct mutex_test *t;
	int id;
};

static void lock_twice(void *opaque)
{
	struct locker *l = opaque;

	for (int round = 0; round < 2; round++) {
		vd_co_mutex_lock(&l->t->m);
		assert_int_equal(++l->t->holders, 1);
		l->t->order[l->t->n++] = l->id;
		vd_loop_schedule(vd_loop_get(), vd_co_self());
		vd_co_yield(); /* hold the lock across a loop iteration */
		l->t->holders--;
		vd_co_mutex_unlock(&l->t->m);
	}
}

/*
 * Four coroutines each take the lock twice.  FIFO hand-over means that
 * after unlocking, a coroutine that asks again queues behind the others:
 * the order is 0 1 2 3 0 1 2 3, never 0 0 ...
 */
static void mutex_is_fifo(void **state)
{
	struct mutex_test t = { 0 };
	struct locker lockers[4];
	void *args[4];

	(void)state;
	vd_co_mutex_init(&t.m);
	for (int i = 0; i < 4; i++) {
		lockers[i] = (struct locker){ .t = &t, .id = i };
		args[i] = &lockers[i];
	}
	run_parallel(4, lock_twice, args);
	assert_int_equal(t.n, 8);
	for (int i = 0; i < 8; i++)
		assert_int_equal(t.order[i], i % 4);
	assert_false(t.m.locked);
}

static void hold_and_release(void *opaque)
{
	struct mutex_test *t = opaque;

	vd_co_mutex_lock(&t->m);
	t->order[t->n++] = 1;
	vd_co_mutex_unlock(&t->m); /* wakes the waiter through the loop */
	t->order[t->n++] = 2;       /* ... so this runs first */
}

static void wait_for_lock(void *opaque)
{
	struct mutex_test *t = opaque;

	vd_co_mutex_lock(&t->m);
	t->order[t->n++] = 3;
	vd_co_mutex_unlock(&t->m);
}

static void mutex_unlock_wakes_through_the_loop(void **state)
{
	struct mutex_test t = { 0 };
	struct vd_co *holder, *waiter;

	(void)state;
	vd_co_mutex_init(&t.m);
	t.m.locked = true; /* so both queue up: lock it "from outside" */
	holder = vd_co_create(hold_and_release, &t);
	waiter = vd_co_create(wait_for_lock, &t);
	vd_co_enter(holder);
	vd_co_enter(waiter);
	vd_co_mutex_unlock(&t.m); /* hands it to holder, scheduled */
	assert_int_equal(t.n, 0);
	while (t.n < 3)
		vd_loop_run_once(vd_loop_get(), true);
	assert_int_equal(t.order[0], 1);
	assert_int_equal(t.order[1], 2);
	assert_int_equal(t.order[2], 3);
}

/* ---- wait queues ---- */

struct wq_test {
	struct vd_co_queue q;
	int woken;
};

static void park(void *opaque)
{
	struct wq_test *t = opaque;

	vd_co_queue_wait(&t->q, NULL);
	t->woken++;
}

static void queue_wake_one_then_all(void **state)
{
	struct wq_test t = { 0 };

	(void)state;
	vd_co_queue_init(&t.q);
	for (int i = 0; i < 3; i++)
		vd_co_enter(vd_co_create(park, &t));
	assert_false(vd_co_queue_empty(&t.q));
	assert_true(vd_co_queue_wake_one(&t.q));
	assert_int_equal(t.woken, 0); /* not inline */
	vd_loop_run_once(vd_loop_get(), false);
	assert_int_equal(t.woken, 1);
	vd_co_queue_wake_all(&t.q);
	assert_true(vd_co_queue_empty(&t.q));
	vd_loop_run_once(vd_loop_get(), false);
	assert_int_equal(t.woken, 3);
	assert_false(vd_co_queue_wake_one(&t.q));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(enter_runs_until_each_yield),
		cmocka_unit_test(nested_enter_returns_to_the_enterer),
		cmocka_unit_test(finished_coroutines_are_reused),
		cmocka_unit_test(coroutine_stacks_hold_deep_calls),
		cmocka_unit_test(many_suspended_coroutines_keep_their_stacks),
		cmocka_unit_test(run_sync_runs_to_completion),
		cmocka_unit_test(mutex_is_fifo),
		cmocka_unit_test(mutex_unlock_wakes_through_the_loop),
		cmocka_unit_test(queue_wake_one_then_all),
	};
	int ret = cmocka_run_group_tests(tests, NULL, NULL);

	vd_loop_free_current();
	return ret;
}
