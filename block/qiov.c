/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Scatter/gather lists.  A qiov starts with four inline elements, so the
 * common case (a request over one or a few buffers, or a slice of one) never
 * allocates; it grows on the heap beyond that.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block.h"

void vd_qiov_init(struct vd_qiov *q)
{
	q->iov = q->inline_iov;
	q->niov = 0;
	q->nalloc = (int)(sizeof(q->inline_iov) / sizeof(q->inline_iov[0]));
	q->size = 0;
}

void vd_qiov_init_buf(struct vd_qiov *q, void *buf, size_t len)
{
	vd_qiov_init(q);
	q->iov[0].iov_base = buf;
	q->iov[0].iov_len = len;
	q->niov = 1;
	q->size = len;
}

void vd_qiov_reset(struct vd_qiov *q)
{
	q->niov = 0;
	q->size = 0;
}

void vd_qiov_destroy(struct vd_qiov *q)
{
	if (q->iov != q->inline_iov)
		free(q->iov);
	vd_qiov_init(q);
}

static int qiov_grow(struct vd_qiov *q)
{
	int n = q->nalloc * 2;
	struct iovec *iov;

	if (q->iov == q->inline_iov) {
		iov = malloc(sizeof(*iov) * (size_t)n);
		if (iov)
			memcpy(iov, q->inline_iov, sizeof(q->inline_iov));
	} else {
		iov = realloc(q->iov, sizeof(*iov) * (size_t)n);
	}
	if (!iov)
		return -ENOMEM;
	q->iov = iov;
	q->nalloc = n;
	return 0;
}

int vd_qiov_add(struct vd_qiov *q, void *base, size_t len)
{
	if (len == 0)
		return 0;
	/* Contiguous with the last element: extend it instead of adding one. */
	if (q->niov > 0) {
		struct iovec *last = &q->iov[q->niov - 1];

		if ((char *)last->iov_base + last->iov_len == (char *)base) {
			last->iov_len += len;
			q->size += len;
			return 0;
		}
	}
	if (q->niov == q->nalloc && qiov_grow(q) < 0)
		return -ENOMEM;
	q->iov[q->niov].iov_base = base;
	q->iov[q->niov].iov_len = len;
	q->niov++;
	q->size += len;
	return 0;
}

/* Index of the element holding byte off, and the offset within it. */
static int qiov_find(const struct vd_qiov *q, size_t off, size_t *in_elem)
{
	int i = 0;

	while (i < q->niov && off >= q->iov[i].iov_len) {
		off -= q->iov[i].iov_len;
		i++;
	}
	*in_elem = off;
	return i;
}

int vd_qiov_add_slice(struct vd_qiov *dst, const struct vd_qiov *src, size_t off, size_t len)
{
	size_t skip;
	int i = qiov_find(src, off, &skip);

	if (off > src->size || len > src->size - off)
		return -EINVAL;
	for (; len > 0 && i < src->niov; i++) {
		size_t n = src->iov[i].iov_len - skip;

		if (n > len)
			n = len;
		if (vd_qiov_add(dst, (char *)src->iov[i].iov_base + skip, n) < 0)
			return -ENOMEM;
		len -= n;
		skip = 0;
	}
	return 0;
}

/*
 * Walk [off, off+len) of q, calling fn on each contiguous piece with the
 * position within the range; stops early when fn returns false.
 */
static size_t qiov_walk(const struct vd_qiov *q, size_t off, size_t len,
			bool (*fn)(void *piece, size_t n, size_t pos, void *ctx), void *ctx)
{
	size_t skip, pos = 0;
	int i = qiov_find(q, off, &skip);

	for (; pos < len && i < q->niov; i++) {
		size_t n = q->iov[i].iov_len - skip;

		if (n > len - pos)
			n = len - pos;
		if (!fn((char *)q->iov[i].iov_base + skip, n, pos, ctx))
			break;
		pos += n;
		skip = 0;
	}
	return pos;
}

static bool piece_memset(void *piece, size_t n, size_t pos, void *ctx)
{
	(void)pos;
	memset(piece, *(int *)ctx, n);
	return true;
}

void vd_qiov_memset(struct vd_qiov *q, size_t off, int c, size_t len)
{
	qiov_walk(q, off, len, piece_memset, &c);
}

static bool piece_to_buf(void *piece, size_t n, size_t pos, void *ctx)
{
	memcpy((char *)ctx + pos, piece, n);
	return true;
}

size_t vd_qiov_to_buf(const struct vd_qiov *q, size_t off, void *buf, size_t len)
{
	return qiov_walk(q, off, len, piece_to_buf, buf);
}

static bool piece_from_buf(void *piece, size_t n, size_t pos, void *ctx)
{
	memcpy(piece, (const char *)ctx + pos, n);
	return true;
}

size_t vd_qiov_from_buf(struct vd_qiov *q, size_t off, const void *buf, size_t len)
{
	return qiov_walk(q, off, len, piece_from_buf, (void *)buf);
}

static bool buf_is_zero(const char *p, size_t n)
{
	/* Check the first byte, then compare the buffer with itself shifted by one. */
	return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

static bool piece_is_zero(void *piece, size_t n, size_t pos, void *ctx)
{
	(void)pos;
	if (buf_is_zero(piece, n))
		return true;
	*(bool *)ctx = false;
	return false;
}

bool vd_qiov_is_zero(const struct vd_qiov *q, size_t off, size_t len)
{
	bool zero = true;

	qiov_walk(q, off, len, piece_is_zero, &zero);
	return zero;
}

void *vd_blk_alloc(size_t len)
{
	void *p;

	if (posix_memalign(&p, 4096, len ? len : 1))
		return NULL;
	return p;
}

void vd_blk_free(void *p)
{
	free(p);
}
