/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The vhost-user wire format shared by the front end (the
 * virtio-blk-vhost-user driver, lib/drivers/) and the back end (vdiskd's
 * vhost-user-blk export, exports/): vhost-user messages
 * (docs/interop/vhost-user.rst in QEMU), virtio feature bits, the
 * virtio-blk configuration space and requests, and the split virtqueue
 * layout (virtio 1.1, sections 2.6 and 5.2).  Everything is little-endian,
 * which is host order on the hosts vhost-user runs on (users refuse to
 * build on big-endian hosts).
 */
#ifndef VD_VHOST_USER_H
#define VD_VHOST_USER_H

#include <stdbool.h>
#include <stdint.h>

/* vhost-user front-end requests (docs/interop/vhost-user.rst). */
enum vhu_request {
	VHU_GET_FEATURES = 1,
	VHU_SET_FEATURES = 2,
	VHU_SET_OWNER = 3,
	VHU_RESET_OWNER = 4,
	VHU_SET_MEM_TABLE = 5,
	VHU_SET_VRING_NUM = 8,
	VHU_SET_VRING_ADDR = 9,
	VHU_SET_VRING_BASE = 10,
	VHU_GET_VRING_BASE = 11,
	VHU_SET_VRING_KICK = 12,
	VHU_SET_VRING_CALL = 13,
	VHU_SET_VRING_ERR = 14,
	VHU_GET_PROTOCOL_FEATURES = 15,
	VHU_SET_PROTOCOL_FEATURES = 16,
	VHU_GET_QUEUE_NUM = 17,
	VHU_SET_VRING_ENABLE = 18,
	VHU_GET_CONFIG = 24,
	VHU_SET_CONFIG = 25,
	VHU_GET_INFLIGHT_FD = 31,
	VHU_SET_INFLIGHT_FD = 32,
	VHU_GET_MAX_MEM_SLOTS = 36,
	VHU_ADD_MEM_REG = 37,
	VHU_REM_MEM_REG = 38,
};

/* Header flags. */
#define VHU_VERSION 0x1u
#define VHU_VERSION_MASK 0x3u
#define VHU_FLAG_REPLY (1u << 2)
#define VHU_FLAG_NEED_REPLY (1u << 3)

/* Payload of SET_VRING_KICK/CALL: ring index in bits 0-7, bit 8 = no fd. */
#define VHU_VRING_IDX_MASK 0xffull
#define VHU_VRING_NOFD (1ull << 8)

/* Protocol features. */
#define VHU_PF_MQ 0
#define VHU_PF_REPLY_ACK 3
#define VHU_PF_CONFIG 9
#define VHU_PF_INFLIGHT_SHMFD 12
#define VHU_PF_CONFIGURE_MEM_SLOTS 15

/* Feature bits (virtio + vhost-user). */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VIRTIO_F_VERSION_1 32

#define BIT(n) (1ull << (n))

/* The largest message payload we send or accept. */
#define VHU_MAX_PAYLOAD 4096
/* SET_MEM_TABLE carries at most this many regions (and fds). */
#define VHU_MEM_TABLE_MAX 8
/* The ring index travels in 8 bits. */
#define VU_MAX_QUEUES 256

struct vhu_hdr {
	uint32_t request;
	uint32_t flags;
	uint32_t size;
} __attribute__((packed));

struct vhu_vring_state {
	uint32_t index;
	uint32_t num;
};

struct vhu_vring_addr {
	uint32_t index;
	uint32_t flags;
	uint64_t desc_user_addr;
	uint64_t used_user_addr;
	uint64_t avail_user_addr;
	uint64_t log_guest_addr;
};

struct vhu_mem_region {
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t mmap_offset;
};

struct vhu_mem_table {
	uint32_t nregions;
	uint32_t padding;
	struct vhu_mem_region regions[VHU_MEM_TABLE_MAX];
};

struct vhu_single_region {
	uint64_t padding;
	struct vhu_mem_region region;
};

/* GET_INFLIGHT_FD / SET_INFLIGHT_FD payload ("inflight description"). */
struct vhu_inflight {
	uint64_t mmap_size;
	uint64_t mmap_offset;
	uint16_t num_queues;
	uint16_t queue_size;
	uint16_t padding[2];
};

/*
 * The inflight I/O tracking area of split rings (vhost-user.rst, "Inflight
 * I/O tracking"): one region per virtqueue, back to back, each a header and
 * queue_size descriptor states, rounded up to VHU_INFLIGHT_ALIGN bytes (the
 * alignment QEMU's and DPDK's back ends use; the back end that allocates the
 * area chooses, the front end only keeps it).
 */
struct vhu_inflight_desc {
	uint8_t inflight; /* head descriptor taken and not yet used */
	uint8_t padding[5];
	uint16_t next;    /* list of the last batch of used heads */
	uint64_t counter; /* order in which heads were taken */
};

struct vhu_inflight_split {
	uint64_t features;
	uint16_t version; /* VHU_INFLIGHT_VERSION; 0: not initialized yet */
	uint16_t desc_num;
	uint16_t last_batch_head;
	uint16_t used_idx; /* used->idx once the last batch's inflight flags were cleared */
	struct vhu_inflight_desc desc[];
};
_Static_assert(sizeof(struct vhu_inflight_desc) == 16 && sizeof(struct vhu_inflight_split) == 16,
	       "inflight area layout");

#define VHU_INFLIGHT_VERSION 1
#define VHU_INFLIGHT_ALIGN 64u

/* Bytes of one virtqueue's region in the inflight area. */
static inline uint64_t vhu_inflight_queue_bytes(uint16_t queue_size)
{
	uint64_t n = sizeof(struct vhu_inflight_split) + sizeof(struct vhu_inflight_desc) * (uint64_t)queue_size;

	return (n + VHU_INFLIGHT_ALIGN - 1) / VHU_INFLIGHT_ALIGN * VHU_INFLIGHT_ALIGN;
}

/* virtio-blk configuration space, up to write_zeroes_may_unmap (virtio 1.1 5.2.4). */
struct virtio_blk_config {
	uint64_t capacity;
	uint32_t size_max;
	uint32_t seg_max;
	uint16_t cylinders;
	uint8_t heads;
	uint8_t sectors;
	uint32_t blk_size;
	uint8_t physical_block_exp;
	uint8_t alignment_offset;
	uint16_t min_io_size;
	uint32_t opt_io_size;
	uint8_t writeback;
	uint8_t unused0;
	uint16_t num_queues;
	uint32_t max_discard_sectors;
	uint32_t max_discard_seg;
	uint32_t discard_sector_alignment;
	uint32_t max_write_zeroes_sectors;
	uint32_t max_write_zeroes_seg;
	uint8_t write_zeroes_may_unmap;
	uint8_t unused1[3];
} __attribute__((packed));
_Static_assert(sizeof(struct virtio_blk_config) == 60, "virtio_blk_config layout");

struct vhu_config {
	uint32_t offset;
	uint32_t size;
	uint32_t flags;
	struct virtio_blk_config cfg;
} __attribute__((packed));

/* virtio-blk requests (virtio 1.1 5.2.6). */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_WZ_F_UNMAP 1u
#define VIRTIO_BLK_SECTOR 512u

struct virtio_blk_outhdr {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};

struct virtio_blk_dwz {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

/* Split virtqueue (virtio 1.1 2.6). */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1
#define VU_RING_MAX 1024u /* libvhost-user's and the kernel's VIRTQUEUE_MAX_SIZE */

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[]; /* num entries, then used_event */
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[]; /* num entries, then avail_event (u16) */
};

/* True if the other side asked to be notified when idx moves from old to new past event. */
static inline bool vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
	return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}


#endif
