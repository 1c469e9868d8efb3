/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What every file-based driver shares: opening a regular file or block
 * device, discovering its capacity and O_DIRECT alignment, and carrying out
 * one request synchronously (used by the sync and threads drivers, and for
 * the operations the asynchronous interfaces cannot express).
 */
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vd-internal.h"

#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

#define ZERO_BUF_SIZE (1u << 20)
#define FILE_MAX_QUEUES 256

static void *zero_buf;
static pthread_once_t zero_once = PTHREAD_ONCE_INIT;

static void zero_buf_init(void)
{
	/* Anonymous mmap: page aligned (good for O_DIRECT) and already zero. */
	void *p = mmap(NULL, ZERO_BUF_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	zero_buf = p == MAP_FAILED ? NULL : p;
}

/* Kernel-reported O_DIRECT alignment (Linux >= 6.1); 0 when unknown. */
static void statx_dio_align(int fd, int *mem_align, int *offset_align)
{
	struct statx stx;

	*mem_align = *offset_align = 0;
	if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN)) {
		*mem_align = (int)stx.stx_dio_mem_align;
		*offset_align = (int)stx.stx_dio_offset_align;
	}
}

/* Probe the smallest offset/length alignment an O_DIRECT read accepts. */
static int probe_request_alignment(int fd)
{
	void *buf;
	int found = 4096;

	if (posix_memalign(&buf, 4096, 4096))
		return 4096;
	for (int a = 512; a <= 4096; a *= 2) {
		if (pread(fd, buf, (size_t)a, 0) >= 0 || errno != EINVAL) {
			found = a;
			break;
		}
	}
	free(buf);
	return found;
}

static int probe_buf_alignment(int fd, int request_alignment)
{
	char *buf;
	int found = 4096;

	if (posix_memalign((void **)&buf, 4096, 8192))
		return 4096;
	for (int a = 512; a <= 4096; a *= 2) {
		if (pread(fd, buf + a, (size_t)request_alignment, 0) >= 0 || errno != EINVAL) {
			found = a;
			break;
		}
	}
	free(buf);
	return found;
}

static int discover_blockdev(struct vdisk *v, const char *who)
{
	uint64_t size;
	int lbs = 512, pbs = 512;
	unsigned int opt = 0;

	if (ioctl(v->dev_fd, BLKGETSIZE64, &size) < 0)
		return vd_error(errno, "%s: BLKGETSIZE64 on '%s': %s", who, v->path ? v->path : "fd", strerror(errno));
	ioctl(v->dev_fd, BLKSSZGET, &lbs);
	ioctl(v->dev_fd, BLKPBSZGET, &pbs);
	ioctl(v->dev_fd, BLKIOOPT, &opt);
	v->capacity = size;
	v->is_blockdev = true;
	v->optimal_io_alignment = pbs;
	v->optimal_io_size = (int)opt;
	if (v->direct) {
		v->request_alignment = lbs;
		v->buf_alignment = lbs;
	}
	return 0;
}

static void discover_file(struct vdisk *v, const struct stat *st)
{
	int mem_align, off_align;

	v->capacity = (uint64_t)st->st_size;
	v->optimal_io_size = (int)st->st_blksize;
	v->optimal_io_alignment = (int)st->st_blksize;
	if (!v->direct)
		return;
	statx_dio_align(v->dev_fd, &mem_align, &off_align);
	if (off_align <= 0)
		off_align = probe_request_alignment(v->dev_fd);
	if (mem_align <= 0)
		mem_align = probe_buf_alignment(v->dev_fd, off_align);
	v->request_alignment = off_align;
	v->buf_alignment = mem_align;
}

static int open_path(struct vdisk *v, const char *who)
{
	int flags = (v->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;

	if (v->direct)
		flags |= O_DIRECT;
	v->dev_fd = open(v->path, flags);
	if (v->dev_fd < 0) {
		int err = errno;

		struct stat st;

		if (err == EINVAL && v->direct && stat(v->path, &st) == 0 && S_ISDIR(st.st_mode))
			return vd_error(EISDIR, "%s: '%s' is a directory", who, v->path);
		if (err == EINVAL && v->direct)
			return vd_error(EINVAL, "%s: '%s': this filesystem does not support O_DIRECT (direct=true)",
					who, v->path);
		if ((err == EACCES || err == EROFS || err == EPERM) && !v->read_only)
			return vd_error(err, "%s: cannot open '%s' for writing: %s (set read-only=true?)", who,
					v->path, strerror(err));
		return vd_error(err, "%s: cannot open '%s': %s", who, v->path, strerror(err));
	}
	v->owns_dev_fd = true;
	return 0;
}

static int use_fd(struct vdisk *v, const char *who)
{
	int fl = fcntl(v->fd, F_GETFL);

	if (fl < 0)
		return vd_error(EBADF, "%s: fd %d is not open", who, v->fd);
	if (!v->read_only && (fl & O_ACCMODE) == O_RDONLY)
		return vd_error(EBADF, "%s: fd %d is open read-only but read-only=false", who, v->fd);
	if (v->direct && !(fl & O_DIRECT) && fcntl(v->fd, F_SETFL, fl | O_DIRECT) < 0)
		return vd_error(errno, "%s: cannot set O_DIRECT on fd %d: %s", who, v->fd, strerror(errno));
	v->dev_fd = v->fd;
	v->owns_dev_fd = false;
	return 0;
}

int vd_file_connect(struct vdisk *v, const char *who)
{
	struct stat st;
	int ret;

	if (v->fd >= 0 && v->path)
		return vd_error(EINVAL, "%s: set either 'path' or 'fd', not both", who);
	if (v->fd < 0 && (!v->path || !v->path[0]))
		return vd_error(EINVAL, "%s: property 'path' (or 'fd') must be set before connect", who);
	ret = v->fd >= 0 ? use_fd(v, who) : open_path(v, who);
	if (ret < 0)
		return ret;
	if (fstat(v->dev_fd, &st) < 0) {
		ret = vd_error(errno, "%s: fstat: %s", who, strerror(errno));
		goto fail;
	}
	if (S_ISDIR(st.st_mode)) {
		ret = vd_error(EISDIR, "%s: '%s' is a directory", who, v->path ? v->path : "fd");
		goto fail;
	}
	if (S_ISBLK(st.st_mode)) {
		ret = discover_blockdev(v, who);
		if (ret < 0)
			goto fail;
	} else if (S_ISREG(st.st_mode)) {
		discover_file(v, &st);
	} else {
		ret = vd_error(EINVAL, "%s: '%s' is neither a regular file nor a block device", who,
			       v->path ? v->path : "fd");
		goto fail;
	}
	v->max_queues = FILE_MAX_QUEUES;
	v->optimal_buf_alignment = v->buf_alignment > 1 ? v->buf_alignment : 1;
	v->max_transfer = 0;
	return 0;
fail:
	vd_file_close(v);
	return ret;
}

int vd_file_size(struct vdisk *v, const char *who, uint64_t *size)
{
	struct stat st;

	if (fstat(v->dev_fd, &st) < 0)
		return vd_error(errno, "%s: fstat: %s", who, strerror(errno));
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(v->dev_fd, BLKGETSIZE64, size) < 0)
			return vd_error(errno, "%s: BLKGETSIZE64: %s", who, strerror(errno));
		return 0;
	}
	*size = (uint64_t)st.st_size;
	return 0;
}

void vd_file_close(struct vdisk *v)
{
	if (v->dev_fd >= 0 && v->owns_dev_fd)
		close(v->dev_fd);
	v->dev_fd = -1;
}

int vd_file_flush(struct vdisk *v)
{
	return fdatasync(v->dev_fd) < 0 ? -errno : 0;
}

int vd_file_discard(struct vdisk *v, uint64_t offset, uint64_t len)
{
	if (len == 0)
		return 0;
	if (v->is_blockdev) {
		uint64_t range[2] = { offset, len };

		return ioctl(v->dev_fd, BLKDISCARD, range) < 0 ? -errno : 0;
	}
	if (fallocate(v->dev_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len) < 0)
		return errno == EOPNOTSUPP ? -ENOTSUP : -errno;
	return 0;
}

static int write_zero_buffers(struct vdisk *v, uint64_t offset, uint64_t len)
{
	pthread_once(&zero_once, zero_buf_init);
	if (!zero_buf)
		return -ENOMEM;
	while (len > 0) {
		size_t chunk = len > ZERO_BUF_SIZE ? ZERO_BUF_SIZE : (size_t)len;
		ssize_t n = pwrite(v->dev_fd, zero_buf, chunk, (off_t)offset);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		offset += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

/*
 * Write-zeroes: without NO_UNMAP the range may be deallocated (punch hole /
 * unmap); with NO_UNMAP it stays allocated (zero range).  NO_FALLBACK refuses
 * to write zero buffers when the efficient way is not available.
 */
int vd_file_write_zeroes(struct vdisk *v, uint64_t offset, uint64_t len, uint32_t flags)
{
	bool unmap = !(flags & VDISK_REQ_NO_UNMAP);
	int mode, ret;

	if (len == 0)
		return 0;
	if (v->is_blockdev) {
		/* Block devices: PUNCH_HOLE = zero without fallback, ZERO_RANGE = may fall back. */
		mode = unmap || (flags & VDISK_REQ_NO_FALLBACK) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
								 : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
		if (!unmap && (flags & VDISK_REQ_NO_FALLBACK))
			return -ENOTSUP;
	} else {
		mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	}
	if (fallocate(v->dev_fd, mode, (off_t)offset, (off_t)len) == 0)
		ret = 0;
	else if (errno != EOPNOTSUPP && errno != ENOTSUP && errno != EINVAL && errno != ENODEV)
		return -errno;
	else if (flags & VDISK_REQ_NO_FALLBACK)
		return -ENOTSUP;
	else
		ret = write_zero_buffers(v, offset, len);
	if (ret == 0 && (flags & VDISK_REQ_FUA))
		ret = vd_file_flush(v);
	return ret;
}

/* preadv/pwritev until done; a short transfer continues where it stopped. */
static int rw_full(struct vdisk *v, struct vd_request *r)
{
	bool wr = r->op == VD_OP_WRITE;
	int rwf = wr && (r->flags & VDISK_REQ_FUA) ? RWF_DSYNC : 0;
	struct iovec stack_iov[16], *iov = (struct iovec *)r->iov, *copy = NULL;
	int iovcnt = r->iovcnt;
	uint64_t off = r->offset, left = r->len;
	int ret = 0;

	while (left > 0) {
		ssize_t n = wr ? pwritev2(v->dev_fd, iov, iovcnt, (off_t)off, rwf)
			       : preadv2(v->dev_fd, iov, iovcnt, (off_t)off, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			ret = -errno;
			break;
		}
		if (n == 0) {
			if (wr) {
				ret = -EIO;
				break;
			}
			/* The file shrank under us: what is past EOF reads as zeroes. */
			for (int i = 0; i < iovcnt; i++)
				memset(iov[i].iov_base, 0, iov[i].iov_len);
			break;
		}
		left -= (uint64_t)n;
		off += (uint64_t)n;
		if (left == 0)
			break;
		if (!copy) { /* first short transfer: take a private copy of the iovec to advance */
			copy = iovcnt <= 16 ? stack_iov : malloc(sizeof(*copy) * (size_t)iovcnt);
			if (!copy) {
				ret = -ENOMEM;
				break;
			}
			memcpy(copy, iov, sizeof(*copy) * (size_t)iovcnt);
			iov = copy;
		}
		while ((size_t)n >= iov->iov_len) {
			n -= (ssize_t)iov->iov_len;
			iov++;
			iovcnt--;
		}
		iov->iov_base = (char *)iov->iov_base + n;
		iov->iov_len -= (size_t)n;
	}
	if (copy && copy != stack_iov)
		free(copy);
	return ret;
}

int vd_file_execute(struct vdisk *v, struct vd_request *r)
{
	switch (r->op) {
	case VD_OP_READ:
	case VD_OP_WRITE:
		return rw_full(v, r);
	case VD_OP_FLUSH:
		return vd_file_flush(v);
	case VD_OP_DISCARD:
		return vd_file_discard(v, r->offset, r->len);
	case VD_OP_WRITE_ZEROES:
		return vd_file_write_zeroes(v, r->offset, r->len, r->flags);
	}
	return -EINVAL;
}
