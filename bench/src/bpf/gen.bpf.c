// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-gen's XDP program: run by BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on a template
 * frame built in user space (Ethernet + IPv4 without options + UDP or TCP, full checksums).
 * Per frame it
 *   - takes a global sequence number (atomic add on one array slot, so it is unique across
 *     CPUs and survives the thread migrating between runs),
 *   - derives the flow from it: source port and source address,
 *   - for TCP writes the sequence number into th->seq,
 *   - when the frame has room, writes the 16-byte payload marker: magic, sequence number,
 *     CLOCK_MONOTONIC send time (bpf_ktime_get_ns),
 *   - fixes the IPv4 and TCP/UDP checksums incrementally (RFC 1624) from the words it
 *     actually replaced, so it is correct whatever the page held before (live-frame pages
 *     are recycled without their data being reset),
 *   - and redirects the frame to the egress interface in `gen_tx[0]`.
 * Offsets are fixed (IPv4 header without options), which keeps the verifier simple.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Keep in sync with src/gen.rs. */
#define GEN_MODE_UDP 0
#define GEN_MODE_SYN 1
#define GEN_MODE_ACK 2
#define GEN_MARKER_LEN 16
#define GEN_L3 14
#define GEN_L4 (GEN_L3 + 20)
#define GEN_UDP_PAYLOAD (GEN_L4 + 8)
#define GEN_TCP_PAYLOAD (GEN_L4 + 20)

enum gen_counter {
	GEN_CNT_FRAMES = 0,  /* frames the program handled: the sequence number source */
	GEN_CNT_NO_EGRESS = 1, /* bpf_redirect_map found no egress: dropped */
	GEN_CNT_MAX = 2,
};

/* Set before load (read-only after: the verifier prunes the other modes). */
const volatile __u32 gen_mode = GEN_MODE_UDP;
/* Distinct (source address, source port) tuples, >= 1. */
const volatile __u32 gen_flows = 1;
/* Source ports per source address, 1..65536, from gen_port_base. */
const volatile __u32 gen_port_span = 1;
const volatile __u32 gen_port_base = 1024;
/* First source IPv4 address, host byte order. */
const volatile __u32 gen_src_base = 0;
/* 1: the frame is long enough for the payload marker. */
const volatile __u32 gen_marker = 0;

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} gen_tx SEC(".maps");

/* A plain array, not per-CPU: the frame counter is the sequence number. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, GEN_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} gen_counters SEC(".maps");

/* Replaces one 16-bit word of a checksummed region, accumulating ~old + new. */
static __always_inline void put16(__u32 *acc, __u16 *p, __u16 v)
{
	*acc += (__u16)~*p;
	*acc += v;
	*p = v;
}

/* Replaces a 32-bit big-endian field given as two words, in memory order. */
static __always_inline void put32(__u32 *acc, __u16 *p, __u32 be)
{
	__u16 w[2];

	__builtin_memcpy(w, &be, 4);
	put16(acc, &p[0], w[0]);
	put16(acc, &p[1], w[1]);
}

/* HC' = ~(~HC + sum(~m + m')) */
static __always_inline __u16 csum_apply(__u16 check, __u32 acc)
{
	acc += (__u16)~check;
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	return (__u16)~acc;
}

SEC("xdp")
int xlb_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + GEN_L3;
	__u32 key = GEN_CNT_FRAMES, l3acc = 0, l4acc = 0, flow, sport, saddr;
	__u16 *l4check, *marker;
	__u64 *cnt, n, ts;
	long ret;

	if (gen_mode == GEN_MODE_UDP) {
		if (data + GEN_UDP_PAYLOAD + (gen_marker ? GEN_MARKER_LEN : 0) > data_end)
			return XDP_ABORTED;
	} else {
		if (data + GEN_TCP_PAYLOAD + (gen_marker ? GEN_MARKER_LEN : 0) > data_end)
			return XDP_ABORTED;
	}
	cnt = bpf_map_lookup_elem(&gen_counters, &key);
	if (!cnt)
		return XDP_ABORTED;
	n = __sync_fetch_and_add(cnt, 1);
	flow = (__u32)(n % gen_flows);
	sport = gen_port_base + flow % gen_port_span;
	saddr = gen_src_base + flow / gen_port_span;

	/* Source address: in the IPv4 header and the TCP/UDP pseudo-header. */
	put32(&l3acc, (__u16 *)&ip->saddr, bpf_htonl(saddr));
	ip->check = csum_apply(ip->check, l3acc);
	l4acc = l3acc;

	if (gen_mode == GEN_MODE_UDP) {
		struct udphdr *udp = data + GEN_L4;

		put16(&l4acc, &udp->source, bpf_htons((__u16)sport));
		l4check = &udp->check;
		marker = data + GEN_UDP_PAYLOAD;
	} else {
		struct tcphdr *tcp = data + GEN_L4;

		put16(&l4acc, &tcp->source, bpf_htons((__u16)sport));
		put32(&l4acc, (__u16 *)&tcp->seq, bpf_htonl((__u32)n));
		l4check = &tcp->check;
		marker = data + GEN_TCP_PAYLOAD;
	}

	if (gen_marker) {
		__u64 be;
		__u16 w[4];

		/* marker[0..2] holds the magic, written once in the template. */
		put32(&l4acc, &marker[2], bpf_htonl((__u32)n));
		ts = bpf_ktime_get_ns();
		be = bpf_cpu_to_be64(ts);
		__builtin_memcpy(w, &be, 8);
		put16(&l4acc, &marker[4], w[0]);
		put16(&l4acc, &marker[5], w[1]);
		put16(&l4acc, &marker[6], w[2]);
		put16(&l4acc, &marker[7], w[3]);
	}

	*l4check = csum_apply(*l4check, l4acc);
	/* 0 means "no checksum" in UDP over IPv4: send its ones-complement twin instead. */
	if (gen_mode == GEN_MODE_UDP && *l4check == 0)
		*l4check = 0xffff;

	ret = bpf_redirect_map(&gen_tx, 0, XDP_DROP);
	if (ret != XDP_REDIRECT) {
		key = GEN_CNT_NO_EGRESS;
		cnt = bpf_map_lookup_elem(&gen_counters, &key);
		if (cnt)
			__sync_fetch_and_add(cnt, 1);
	}
	return ret;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
