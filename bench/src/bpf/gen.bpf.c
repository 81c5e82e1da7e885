// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-gen's XDP program: run by BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on a template
 * frame built in user space (Ethernet + IPv4 without options or IPv6 without extension
 * headers + UDP or TCP, full checksums). Per frame it
 *   - writes the template's headers and marker back over the frame: live-frame
 *     pages are recycled without being reset, and whatever the frame met on its way (a
 *     reflector swapping addresses, a forwarder rewriting MACs) changed them;
 *   - takes a global sequence number (atomic add on one array slot, so it is unique across
 *     CPUs and survives the thread migrating between runs),
 *   - derives the flow from it: source port, then source address (the last 32 bits for IPv6),
 *   - for TCP writes the sequence number: in SYN mode the frame counter, in ACK mode the
 *     flow's own byte stream (flow + 1 + bytes the flow sent before), so that each flow's
 *     segments follow its handshake in order,
 *   - when the frame has room, writes the 16-byte payload marker: magic, sequence number,
 *     CLOCK_MONOTONIC send time (bpf_ktime_get_ns),
 *   - fixes the IPv4 and TCP/UDP checksums incrementally (RFC 1624) from the template's,
 *   - paced (gen_ns_per_frame), waits until the frame is due, spinning in the program, so
 *     that one BPF_PROG_RUN call sends a whole paced run with frames evenly spaced (the
 *     kernel flushes every batch_size frames: user space keeps that batch small);
 *   - and redirects the frame to the egress interface in `gen_tx[0]`.
 * The payload beyond the marker is the template's (zeros): nothing on the benchmark's paths
 * writes payload bytes. Offsets are fixed, which keeps the verifier simple.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
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
#define GEN_L4_4 (GEN_L3 + 20)
#define GEN_L4_6 (GEN_L3 + 40)
#define GEN_TMPL_MAX 96

enum gen_counter {
	GEN_CNT_FRAMES = 0,  /* frames the program handled: the sequence number source */
	GEN_CNT_NO_EGRESS = 1, /* bpf_redirect_map found no egress: dropped */
	GEN_CNT_MAX = 2,
};

/* Set before load (read-only after: the verifier prunes the other modes). */
const volatile __u32 gen_mode = GEN_MODE_UDP;
/* 1: IPv6. */
const volatile __u32 gen_ipv6 = 0;
/* Distinct (source address, source port) tuples, >= 1. */
const volatile __u32 gen_flows = 1;
/* Source ports per source address, 1..65536, from gen_port_base. */
const volatile __u32 gen_port_span = 1;
const volatile __u32 gen_port_base = 1024;
/* First source address (IPv4, or the last 32 bits of the IPv6 one), host byte order. */
const volatile __u32 gen_src_base = 0;
/* 1: the frame is long enough for the payload marker. */
const volatile __u32 gen_marker = 0;
/* TCP payload bytes per segment (ACK mode's sequence numbers advance by it). */
const volatile __u32 gen_tcp_payload = 0;
/* Pacing in the program: nanoseconds between frames (0: flat out), and how late a frame may
 * be before the schedule moves on (the debt is forgiven rather than sent as a burst). */
const volatile __u64 gen_ns_per_frame = 0;
const volatile __u64 gen_slack_ns = 0;
/* The template's first bytes: headers and the marker (magic, zeros), as 16-bit words in
 * memory order (every header length here is even). */
const volatile __u16 gen_tmpl[GEN_TMPL_MAX / 2] = {};

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} gen_tx SEC(".maps");

/* The pacing schedule, set by user space before a paced run: frame `base_n` is due at
 * `start_ns`, each later one `gen_ns_per_frame` after the one before. */
struct gen_pace {
	__u64 start_ns;
	__u64 base_n;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gen_pace);
} gen_pace SEC(".maps");

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

static long wait_until(__u64 i, void *due)
{
	return bpf_ktime_get_ns() >= *(__u64 *)due ? 1 : 0;
}

/* Waits (spinning in the program, at most ~30 ms) until frame `n` is due. */
static __always_inline void pace(__u64 n)
{
	struct gen_pace *p;
	__u32 zero = 0;
	__u64 due, now;

	p = bpf_map_lookup_elem(&gen_pace, &zero);
	if (!p || n < p->base_n)
		return;
	due = p->start_ns + (n - p->base_n) * gen_ns_per_frame;
	now = bpf_ktime_get_ns();
	if (now > due + gen_slack_ns) {
		/* late (preempted): forgive the debt, the schedule restarts from now */
		p->start_ns += now - due;
		return;
	}
	if (now < due)
		bpf_loop(1 << 20, wait_until, &due, 0);
}

/* Writes the template's first `len` bytes (an even constant) over the frame, word by word
 * through the volatile array (a memcpy from a cast-away-volatile pointer would let the
 * compiler copy the zeros it was initialised with instead). */
#define RESTORE(len)                                                                  \
	do {                                                                          \
		__u16 *w = data;                                                      \
		int i;                                                                \
		if (data + (len) > data_end)                                          \
			return XDP_ABORTED;                                           \
		_Pragma("unroll") for (i = 0; i < (len) / 2; i++) w[i] = gen_tmpl[i]; \
	} while (0)

SEC("xdp")
int xlb_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 key = GEN_CNT_FRAMES, l3acc = 0, l4acc = 0, flow, sport, saddr, l4off;
	__u16 *l4check, *marker;
	__u64 *cnt, n, ts;
	long ret;

	/* Headers and the marker back to the template's (magic, zeros). */
	if (!gen_ipv6) {
		if (gen_mode == GEN_MODE_UDP) {
			if (gen_marker)
				RESTORE(GEN_L4_4 + 8 + GEN_MARKER_LEN);
			else
				RESTORE(GEN_L4_4 + 8);
		} else {
			if (gen_marker)
				RESTORE(GEN_L4_4 + 20 + GEN_MARKER_LEN);
			else
				RESTORE(GEN_L4_4 + 20);
		}
	} else {
		if (gen_mode == GEN_MODE_UDP) {
			if (gen_marker)
				RESTORE(GEN_L4_6 + 8 + GEN_MARKER_LEN);
			else
				RESTORE(GEN_L4_6 + 8);
		} else {
			if (gen_marker)
				RESTORE(GEN_L4_6 + 20 + GEN_MARKER_LEN);
			else
				RESTORE(GEN_L4_6 + 20);
		}
	}
	l4off = gen_ipv6 ? GEN_L4_6 : GEN_L4_4;
	if (data + l4off + (gen_mode == GEN_MODE_UDP ? 8 : 20) +
		    (gen_marker ? GEN_MARKER_LEN : 0) > data_end)
		return XDP_ABORTED;

	cnt = bpf_map_lookup_elem(&gen_counters, &key);
	if (!cnt)
		return XDP_ABORTED;
	n = __sync_fetch_and_add(cnt, 1);
	if (gen_ns_per_frame)
		pace(n);
	flow = (__u32)(n % gen_flows);
	sport = gen_port_base + flow % gen_port_span;
	saddr = gen_src_base + flow / gen_port_span;

	/* Source address: in the IPv4 header and the TCP/UDP pseudo-header. */
	if (!gen_ipv6) {
		struct iphdr *ip = data + GEN_L3;

		if ((void *)(ip + 1) > data_end)
			return XDP_ABORTED;
		put32(&l3acc, (__u16 *)&ip->saddr, bpf_htonl(saddr));
		ip->check = csum_apply(ip->check, l3acc);
		l4acc = l3acc;
	} else {
		struct ipv6hdr *ip6 = data + GEN_L3;

		if ((void *)(ip6 + 1) > data_end)
			return XDP_ABORTED;
		put32(&l4acc, (__u16 *)&ip6->saddr.in6_u.u6_addr32[3], bpf_htonl(saddr));
	}

	if (gen_mode == GEN_MODE_UDP) {
		struct udphdr *udp = data + l4off;

		if ((void *)(udp + 1) > data_end)
			return XDP_ABORTED;
		put16(&l4acc, &udp->source, bpf_htons((__u16)sport));
		l4check = &udp->check;
		marker = (void *)(udp + 1);
	} else {
		struct tcphdr *tcp = data + l4off;
		__u32 seq;

		if ((void *)(tcp + 1) > data_end)
			return XDP_ABORTED;
		put16(&l4acc, &tcp->source, bpf_htons((__u16)sport));
		if (gen_mode == GEN_MODE_ACK)
			seq = flow + 1 + (__u32)(n / gen_flows) * gen_tcp_payload;
		else
			seq = (__u32)n;
		put32(&l4acc, (__u16 *)&tcp->seq, bpf_htonl(seq));
		l4check = &tcp->check;
		marker = (void *)(tcp + 1);
	}

	if (gen_marker) {
		__u64 be;
		__u16 w[4];

		if ((void *)marker + GEN_MARKER_LEN > data_end)
			return XDP_ABORTED;
		/* marker[0..2] holds the magic (restored above). */
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
	/* 0 means "no checksum" in UDP: send its ones-complement twin instead. */
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
