/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Tracked requests: serialising overlapping requests on one node.
 *
 * The node keeps its tracked requests in a list, youngest first.  A new
 * request waits for each OLDER overlapping request that conflicts with it
 * (at least one of the two serialising), then runs.  Waiting only ever for
 * older requests makes the wait-for graph acyclic, so there is no deadlock,
 * and overlapping conflicting requests run in arrival order.  Requests that
 * do not overlap, or where neither serialises, never wait.
 *
 * Requests on a multiqueue node come from several threads: the list and the
 * wait queues are under bs->track_lock, and a waiter in another thread is
 * woken through its loop's mailbox (vd_co_queue_wait_mt).  The lock is
 * never held across a yield, and it is uncontended unless two threads write
 * the same node at the same moment.
 */
#include <assert.h>

#include "block-int.h"

static bool conflicts(const struct vd_tracked *a, const struct vd_tracked *b)
{
	return (a->serialising || b->serialising) && a->off < b->end && b->off < a->end && a->owner != b->owner;
}

/* The oldest-first search is not needed: any older conflicting one will do. */
static struct vd_tracked *older_conflict(const struct vd_tracked *t)
{
	for (struct vd_tracked *o = t->next; o; o = o->next)
		if (conflicts(o, t))
			return o;
	return NULL;
}

void vd_bnode_track_begin(struct vd_bnode *bs, struct vd_tracked *t, uint64_t off, uint64_t len, bool serialising)
{
	struct vd_tracked *o;

	t->off = off;
	t->end = off + len;
	t->serialising = serialising;
	t->owner = vd_co_self();
	vd_co_queue_init(&t->waiters);
	pthread_mutex_lock(&bs->track_lock);
	t->next = bs->tracked;
	t->pprev = &bs->tracked;
	if (t->next)
		t->next->pprev = &t->next;
	bs->tracked = t;
	if (serialising)
		bs->serialising_reqs++;
	else if (bs->serialising_reqs == 0)
		goto out; /* fast path: nothing in flight can conflict with us */
	/* Each wake means that request finished and left the list: look again. */
	while ((o = older_conflict(t)) != NULL)
		vd_co_queue_wait_mt(&o->waiters, &bs->track_lock);
out:
	pthread_mutex_unlock(&bs->track_lock);
}

void vd_bnode_track_end(struct vd_bnode *bs, struct vd_tracked *t)
{
	pthread_mutex_lock(&bs->track_lock);
	*t->pprev = t->next;
	if (t->next)
		t->next->pprev = t->pprev;
	if (t->serialising) {
		assert(bs->serialising_reqs > 0);
		bs->serialising_reqs--;
	}
	vd_co_queue_wake_all(&t->waiters);
	pthread_mutex_unlock(&bs->track_lock);
}
