/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The XDP fast path, included by xlb.bpf.c: established flows the dataplane published in the
 * shared table `xlb_fast` are forwarded here, everything else is punted to the dataplane.
 *
 * The table (one BPF_F_MMAPABLE array of 64-byte elements, mapped by user space; the layout
 * is the one of src/fast.rs and the engine's fast table, which must agree word for word):
 *   element 0            header: magic, enabled, index_slots, index_base, lines_base, lines,
 *                        hash keys k0..k3 (u64 as two u32 words, low first)
 *   element 1            new-flow header: its switch and where the new-flow section is
 *   element 2            the engine's steering keys k0..k3 (which worker owns a new flow)
 *   index_base..         index: u32 slots, 16 per element; 0 empty, ~0 tombstone, else line+1
 *   lines_base + line    one direction of one flow (lines 2p and 2p+1 are the two directions
 *                        of pair p)
 *   then the new-flow section: rule index, rule entries, member entries, Maglev tables, and
 *   one ring per worker through which a SYN forwarded here is handed to the worker owning
 *   its flow (fast_syn below)
 *
 * Rule of the road: every check that can punt comes before the first write (to the frame or
 * to the table). A punted frame reaches the dataplane exactly as it arrived.
 *
 * Verification stays cheap: the loops and the SYN path are global functions, which the
 * verifier checks once each, not once per path of their callers.
 */
#ifndef XLB_FAST_H
#define XLB_FAST_H

#define XLB_FAST_MAGIC 0x584c4246 /* "XLBF" */
#define XLB_FAST_PROBES 16
#define XLB_FAST_EMPTY 0
#define XLB_FAST_TOMBSTONE 0xffffffff
/* longest L4 message whose partial checksum is completed here; longer ones are punted */
#define XLB_FAST_CSUM_MAX 1500
#define XLB_FAST_CSUM_CHUNK 64
/* rule ids the per-rule counters have room for */
#define XLB_FAST_RULES 4096

/* header words */
#define XLB_FH_MAGIC 0
#define XLB_FH_ENABLED 1
#define XLB_FH_INDEX_SLOTS 2
#define XLB_FH_INDEX_BASE 3
#define XLB_FH_LINES_BASE 4
#define XLB_FH_KEYS 8

/* line words */
#define XLB_FL_STATE 0
#define XLB_FL_INGRESS_PORT 1
#define XLB_FL_TX_PORT 2
#define XLB_FL_PROTO_RULE 3
#define XLB_FL_SADDR 4
#define XLB_FL_DADDR 5
#define XLB_FL_PORTS 6
#define XLB_FL_NEW_SADDR 7
#define XLB_FL_NEW_DADDR 8
#define XLB_FL_NEW_PORTS 9
#define XLB_FL_MACS 10
#define XLB_FL_NEXT_SEQ 13
#define XLB_FL_MAX_WIN 14
#define XLB_FL_LAST_SEEN 15

/* line state bits */
#define XLB_FS_FAST 0x1
#define XLB_FS_TCP 0x2
#define XLB_FS_PICKED_UP 0x4

#define XLB_MIN_ACK_SLACK 66000

/* new-flow header words (element XLB_NF_ELEM) */
#define XLB_NF_ELEM 1
#define XLB_NF_ENABLED 0
#define XLB_NF_RULE_SLOTS 1
#define XLB_NF_RULE_INDEX_BASE 2
#define XLB_NF_RULES_BASE 3
#define XLB_NF_RULES 4
#define XLB_NF_MEMBERS_BASE 5
#define XLB_NF_MEMBERS 6
#define XLB_NF_TABLES_BASE 7
#define XLB_NF_TABLE_WORDS 8
#define XLB_NF_RINGS_BASE 9
#define XLB_NF_RING_RECORDS 10
#define XLB_NF_RING_ELEMENTS 11
#define XLB_NF_WORKERS 12
/* the engine's steering key k0..k3, low word first (element XLB_STEER_ELEM) */
#define XLB_STEER_ELEM 2

/* rule entry words */
#define XLB_NFR_VIP 0
#define XLB_NFR_PORTS 1
#define XLB_NFR_PROTO_RULE 2
#define XLB_NFR_INGRESS_PORT 3
#define XLB_NFR_FLAGS 4
#define XLB_NFR_BACKEND_PORT 5
#define XLB_NFR_DIST 6
#define XLB_NFR_TABLE_OFF 7
#define XLB_NFR_TABLE_SLOTS 8
#define XLB_NFR_MEMBERS_OFF 9
#define XLB_NFR_MEMBERS_N 10
/* FLAGS: rewrite the destination address to the member's, the destination port to
 * BACKEND_PORT (neither: floating IP) */
#define XLB_NFR_DNAT_ADDR 0x1
#define XLB_NFR_DNAT_PORT 0x2
/* DIST: the engine's Distribution */
#define XLB_DIST_FIVE_TUPLE 0
#define XLB_DIST_SOURCE_IP 1
#define XLB_DIST_SOURCE_IP_PROTOCOL 2
/* the largest Maglev table (65 537 slots) */
#define XLB_MAGLEV_MAX 65537
#define XLB_NF_NO_MEMBER 0xffff

/* member entry words */
#define XLB_NFM_VALID 0
#define XLB_NFM_ADDR 1
#define XLB_NFM_TX_PORT 2
#define XLB_NFM_MACS 3

/* ring: PROD is word 0 of the ring's element 0, CONS word 0 of its element 1, record i the
 * two elements at 2 + 2 * (i & (records - 1)) */
#define XLB_RING_PROD_ELEM 0
#define XLB_RING_CONS_ELEM 1
#define XLB_RING_RECORDS_ELEM 2
#define XLB_RING_TRIES 4
/* record words */
#define XLB_NFQ_SEQ 0
#define XLB_NFQ_STAMP 1
#define XLB_NFQ_ADDR 2
#define XLB_NFQ_PORT 3
#define XLB_NFQ_RULE 4
#define XLB_NFQ_INGRESS_PORT 5
#define XLB_NFQ_LEN 6
#define XLB_NFQ_RESERVED 7
/* the IPv4 and TCP headers as received, 80 bytes at most, the rest zero */
#define XLB_NFQ_HEADERS 8
#define XLB_NFQ_HEADER_WORDS 20
/* the received frame's destination then source MAC (the worker learns the client's hop from
 * it, as from a frame it received itself); word 31 zero */
#define XLB_NFQ_MACS 28

/* the engine's flow hash (select.rs) */
#define XLB_FLOW_SEED 0x243F6A8885A308D3ULL
#define XLB_FLOW_MUL 0x9E3779B97F4A7C15ULL
/* the steering hash's last multiplier (hashkey.rs, ENDPOINT_MIX) */
#define XLB_ENDPOINT_MIX 0x9E3779B97F4A7C15ULL
/* the low word of an IPv4-mapped address (::ffff:a.b.c.d) without a.b.c.d; its high word is 0 */
#define XLB_V4_MAPPED 0xffff00000000ULL

/* punt reasons (and 0: forwarded), the keys of xlb_fast_stats; keep in sync with src/fast.rs */
enum xlb_fast_reason {
	XLB_FAST_FORWARDED = 0,
	XLB_FAST_MISS = 1,
	XLB_FAST_NOT_FAST = 2,
	XLB_FAST_WINDOW = 3,
	XLB_FAST_CSUM_TOO_LONG = 4,
	XLB_FAST_NO_TX = 5,
	XLB_FAST_NOT_ELIGIBLE = 6,
	XLB_FAST_WRONG_PORT = 7,
	/* SYNs of new flows */
	XLB_FAST_NEW_FORWARDED = 8,
	XLB_FAST_NEW_NO_RULE = 9,
	XLB_FAST_NEW_WRONG_PORT = 10,
	XLB_FAST_NEW_NO_MEMBER = 11,
	XLB_FAST_NEW_RING_FULL = 12,
	XLB_FAST_NEW_OFF = 13,
	XLB_FAST_REASONS = 14,
};

struct xlb_fast_elem {
	__u32 w[16];
};

struct xlb_fast_count {
	__u64 packets;
	__u64 bytes;
};

/* Sized by the loader (`max_entries` before load); one element (a zeroed header: everything
 * punts) when nobody asks for a fast path. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xlb_fast_elem);
} xlb_fast SEC(".maps");

/* key: the dataplane's port id; value: the ifindex, resolved in the namespace of the thread
 * that writes it */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} xlb_tx SEC(".maps");

/* key: rule * 2 + direction (0 original, 1 reply) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_FAST_RULES * 2);
	__type(key, __u32);
	__type(value, struct xlb_fast_count);
} xlb_fast_cnt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_FAST_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} xlb_fast_stats SEC(".maps");

#define XLB_READ(x) (*(volatile typeof(x) *)&(x))
#define XLB_BARRIER() asm volatile("" ::: "memory")

/* the verdict of fast_path() when the frame goes on to the dataplane */
#define XLB_PUNT (-1)

/* one more frame of kind `key` in xlb_fast_stats (forwarded, or a punt reason) */
static __always_inline void fast_stat(__u32 key)
{
	__u64 *c = bpf_map_lookup_elem(&xlb_fast_stats, &key);

	if (c)
		*c += 1;
}

static __always_inline int fast_punt(__u32 reason)
{
	fast_stat(reason);
	return XLB_PUNT;
}

static __always_inline struct xlb_fast_elem *fast_elem(__u32 e)
{
	return bpf_map_lookup_elem(&xlb_fast, &e);
}

/* lo64(a * b) ^ hi64(a * b), the high half from four 32x32 products (BPF has no mulhi) */
static __always_inline __u64 fold_mul(__u64 a, __u64 b)
{
	__u64 a0 = a & 0xffffffff, a1 = a >> 32, b0 = b & 0xffffffff, b1 = b >> 32;
	__u64 p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
	__u64 mid = (p00 >> 32) + (p01 & 0xffffffff) + (p10 & 0xffffffff);
	__u64 lo = (p00 & 0xffffffff) | (mid << 32);
	__u64 hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);

	return lo ^ hi;
}

/* key k_i of an element holding k0..k3 from word `at`, each as its low word then its high */
static __always_inline __u64 elem_key(const struct xlb_fast_elem *e, int at, int i)
{
	return (__u64)e->w[at + 2 * i] | ((__u64)e->w[at + 2 * i + 1] << 32);
}

static __always_inline __u64 hdr_key(const struct xlb_fast_elem *h, int i)
{
	return elem_key(h, XLB_FH_KEYS, i);
}

/* The index hash (the engine's fast_hash) of address, address and port words as read from
 * the frame, and a protocol, under the header's keys. */
static __always_inline __u64 fast_hash(const struct xlb_fast_elem *hdr, __u32 w_saddr,
				       __u32 w_daddr, __u32 w_ports, __u32 proto)
{
	__u64 h = fold_mul(((__u64)w_saddr | ((__u64)w_daddr << 32)) ^ hdr_key(hdr, 0),
			   ((__u64)w_ports | ((__u64)proto << 32)) ^ hdr_key(hdr, 1));

	return fold_mul(h ^ hdr_key(hdr, 2), hdr_key(hdr, 3));
}

/* The high 64 bits of h * n for n < 2^31 (the engine's `reduce`, and the steering of a hash
 * onto n workers), from 32-bit halves: (h_hi * n + (h_lo * n >> 32)) >> 32 never overflows
 * for n < 2^31, and is exact (the low product's fraction never carries into the result). */
static __always_inline __u64 mul_hi(__u64 h, __u32 n)
{
	return ((h >> 32) * n + (((h & 0xffffffff) * n) >> 32)) >> 32;
}

/* MurmurHash3's 64-bit finaliser (the engine's fmix64) */
static __always_inline __u64 fmix64(__u64 h)
{
	h ^= h >> 33;
	h *= 0xFF51AFD7ED558CCDULL;
	h ^= h >> 33;
	h *= 0xC4CEB9FE1A85EC53ULL;
	return h ^ (h >> 33);
}

static __always_inline __u64 absorb(__u64 state, __u64 word)
{
	return fold_mul(state ^ word, XLB_FLOW_MUL);
}

/* The engine's flow_hash of a TCP tuple of IPv4 addresses (host order; as the engine's
 * IPv4-mapped `Addr`: low word XLB_V4_MAPPED | address, high word 0) under distribution
 * `dist` (checked by the caller: 0..2). */
static __always_inline __u64 flow_hash(__u32 dist, __u32 src, __u16 sport, __u32 dst, __u16 dport)
{
	__u64 h = XLB_FLOW_SEED;

	h = absorb(h, XLB_V4_MAPPED | src);
	h = absorb(h, 0);
	h = absorb(h, XLB_V4_MAPPED | dst);
	h = absorb(h, 0);
	if (dist == XLB_DIST_FIVE_TUPLE)
		h = absorb(h, ((__u64)IPPROTO_TCP << 32) | ((__u64)sport << 16) | dport);
	else if (dist == XLB_DIST_SOURCE_IP_PROTOCOL)
		h = absorb(h, (__u64)IPPROTO_TCP << 32);
	return fmix64(h);
}

/* One's-complement fold to 16 bits, not complemented; a non-zero input never folds to 0. */
static __always_inline __u16 csum_fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* serial-number order: a <= b */
static __always_inline int seq_le(__u32 a, __u32 b)
{
	return (__s32)(b - a) >= 0;
}

/* *p = v if v is later in serial order; a lost race means another CPU moved it at least as
 * far in the common case, and 4 tries bound the rest */
static __always_inline void advance_serial(__u32 *p, __u32 v)
{
	for (int t = 0; t < 4; t++) {
		__u32 cur = XLB_READ(*p);

		if (seq_le(v, cur) || __sync_val_compare_and_swap(p, cur, v) == cur)
			return;
	}
}

static __always_inline void grow(__u32 *p, __u32 v)
{
	for (int t = 0; t < 4; t++) {
		__u32 cur = XLB_READ(*p);

		if (v <= cur || __sync_val_compare_and_swap(p, cur, v) == cur)
			return;
	}
}

/* (The loops are global functions: the verifier checks each once, not once per path of its
 * caller.) */

/* One's-complement sum (wide, unfolded) of the `len` bytes at `l4`, as native loads: the same
 * value modulo 0xffff as the sum of big-endian 16-bit words, byte-swapped. Returns -1 when a
 * byte lies beyond the frame. */
__noinline __s64 fast_sum(struct xdp_md *ctx, __u32 len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* the L4 header of an untagged IPv4 frame without options */
	__u8 *l4 = (__u8 *)data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	__u64 sum = 0;
	__u32 off = 0;

	if (len > XLB_FAST_CSUM_MAX)
		return -1;
	for (int i = 0; i < XLB_FAST_CSUM_MAX / XLB_FAST_CSUM_CHUNK; i++) {
		__u8 *p;
		__s64 s;

		if (off + XLB_FAST_CSUM_CHUNK > len)
			break;
		p = l4 + (off & 0x7ff);
		if ((void *)(p + XLB_FAST_CSUM_CHUNK) > data_end)
			return -1;
		s = bpf_csum_diff(NULL, 0, (__be32 *)p, XLB_FAST_CSUM_CHUNK, 0);
		if (s < 0)
			return -1;
		sum += (__u32)s;
		off += XLB_FAST_CSUM_CHUNK;
	}
	for (int i = 0; i < XLB_FAST_CSUM_CHUNK / 4; i++) {
		__u8 *p;

		if (off + 4 > len)
			break;
		p = l4 + (off & 0x7ff);
		if ((void *)(p + 4) > data_end)
			return -1;
		sum += *(__u32 *)p;
		off += 4;
	}
	if (off + 2 <= len) {
		__u8 *p = l4 + (off & 0x7ff);

		if ((void *)(p + 2) > data_end)
			return -1;
		sum += *(__u16 *)p;
		off += 2;
	}
	if (off < len) {
		/* an odd last byte is the high byte of a word padded with zero */
		__u8 *p = l4 + (off & 0x7ff);
		__u8 pad[2] = {0, 0};

		if ((void *)(p + 1) > data_end)
			return -1;
		pad[0] = *p;
		sum += *(__u16 *)pad;
	}
	return (__s64)(sum & 0x7fffffffffffffffULL);
}

/* The checksum the sender meant for the L4 message of `l4_len` bytes whose checksum field
 * holds *check, into *check; *partial = 1 when it had to be computed. A partial checksum (the
 * sender left it to the NIC, as a local stack on a veth does) holds the folded pseudo-header
 * sum of the frame as received; the sum over the message as received is then the complete
 * sum, and its complement the checksum meant. Returns -1 when the message is too long (or
 * not all inside the frame) to be summed here. */
static __always_inline int sender_check(struct xdp_md *ctx, __u32 w_saddr, __u32 w_daddr,
					__u8 proto, __u32 l4_len, __u16 *check, int *partial)
{
	__u64 sum = (__u64)w_saddr + w_daddr + bpf_htons((__u16)proto) + bpf_htons((__u16)l4_len);

	*partial = 0;
	if (*check == csum_fold64(sum)) {
		__s64 s = fast_sum(ctx, l4_len);

		if (s < 0)
			return -1;
		*check = ~csum_fold64((__u64)s);
		*partial = 1;
	}
	return 0;
}

/* Rewrites an untagged IPv4 frame without options for its next hop: source and destination
 * addresses and the L4 port word (as on the wire) to n_saddr, n_daddr, n_ports, with the IPv4
 * and L4 checksums updated incrementally (RFC 1624) from `old_check`, the checksum the sender
 * meant (sender_check); TTL - 1; the Ethernet addresses from `macs` (destination then source,
 * 12 bytes). A UDP datagram without a checksum stays without. */
static __always_inline void fast_rewrite(struct ethhdr *eth, struct iphdr *ip, __u8 *l4,
					 __u16 *check, __u8 proto, __u16 old_check, int partial,
					 __u32 n_saddr, __u32 n_daddr, __u32 n_ports,
					 const __u32 *macs)
{
	__u32 w_saddr = ip->saddr, w_daddr = ip->daddr, w_ports = *(__u32 *)l4;
	__u16 old_ttl_word, new_ttl_word, new_check;
	__u64 acc;

	/* RFC 1624 eqn. 3 over native loads, which is the same arithmetic byte-swapped */
	acc = (__u64)(__u32)~w_saddr + n_saddr + (__u32)~w_daddr + n_daddr;
	old_ttl_word = *(__u16 *)&ip->ttl;
	ip->ttl -= 1;
	new_ttl_word = *(__u16 *)&ip->ttl;
	ip->saddr = n_saddr;
	ip->daddr = n_daddr;
	ip->check = ~csum_fold64((__u64)(__u16)~ip->check + acc + (__u16)~old_ttl_word +
				 new_ttl_word);

	*(__u32 *)l4 = n_ports;
	if (proto == IPPROTO_UDP && old_check == 0 && !partial) {
		/* UDP without a checksum stays without */
	} else {
		acc += (__u64)(__u32)~w_ports + n_ports;
		new_check = ~csum_fold64((__u64)(__u16)~old_check + acc);
		if (proto == IPPROTO_UDP && new_check == 0)
			new_check = 0xffff;
		*check = new_check;
	}
	__builtin_memcpy(eth, macs, 12);
}

/* The line of the flow (saddr, daddr, ports, proto as read from the frame): hash, then linear
 * probing. Returns line | state << 32 (the line's state word, read before its keys), or -1. */
__noinline __s64 fast_find(__u32 w_saddr, __u32 w_daddr, __u32 w_ports, __u32 proto)
{
	struct xlb_fast_elem *hdr = fast_elem(0);
	__u32 mask, home, index_base, lines_base;
	__u64 h;

	if (!hdr)
		return -1;
	h = fast_hash(hdr, w_saddr, w_daddr, w_ports, proto);
	mask = XLB_READ(hdr->w[XLB_FH_INDEX_SLOTS]) - 1;
	index_base = XLB_READ(hdr->w[XLB_FH_INDEX_BASE]);
	lines_base = XLB_READ(hdr->w[XLB_FH_LINES_BASE]);
	home = (__u32)h & mask;
	for (int i = 0; i < XLB_FAST_PROBES; i++) {
		__u32 s = (home + i) & mask, v, state;
		struct xlb_fast_elem *slots, *d;

		slots = fast_elem(index_base + (s >> 4));
		if (!slots)
			return -1;
		v = XLB_READ(slots->w[s & 15]);
		if (v == XLB_FAST_EMPTY)
			return -1;
		if (v == XLB_FAST_TOMBSTONE)
			continue;
		d = fast_elem(lines_base + v - 1);
		if (!d)
			continue;
		/* the state first: the dataplane sets FAST last, and x86 keeps loads in order */
		state = XLB_READ(d->w[XLB_FL_STATE]);
		XLB_BARRIER();
		if ((XLB_READ(d->w[XLB_FL_PROTO_RULE]) & 0xff) == proto &&
		    XLB_READ(d->w[XLB_FL_SADDR]) == w_saddr &&
		    XLB_READ(d->w[XLB_FL_DADDR]) == w_daddr && XLB_READ(d->w[XLB_FL_PORTS]) == w_ports)
			return (__s64)(((__u64)(state & 0x7fffffff) << 32) | (v - 1));
	}
	return -1;
}

/* Whether a segment of direction `d` lies in the window of an established flow: the engine's
 * rule (tcp.rs `in_window` and `ack_in_window`) for an ACK without SYN, FIN or RST. */
static __always_inline int tcp_in_window(const struct xlb_fast_elem *d,
					 const struct xlb_fast_elem *r, __u32 state,
					 __u32 seq, __u32 end, __u32 ack)
{
	__u32 next = XLB_READ(d->w[XLB_FL_NEXT_SEQ]);
	__u32 win = XLB_READ(r->w[XLB_FL_MAX_WIN]);
	__u32 sent = XLB_READ(r->w[XLB_FL_NEXT_SEQ]);
	__u32 slack = XLB_READ(d->w[XLB_FL_MAX_WIN]);
	__u32 hi;

	if (slack < XLB_MIN_ACK_SLACK)
		slack = XLB_MIN_ACK_SLACK;
	if (!seq_le(end, next + win) || !seq_le(next - win - 1, end))
		return 0;
	hi = (state & XLB_FS_PICKED_UP) ? sent + slack : sent;
	return seq_le(ack, hi) && seq_le(sent - slack, ack);
}

/* The entry of the load-balancing rule of TCP frontend w_daddr:port (the frame's words; `w_dport`
 * is the frame's port word with its source half zeroed): the rule index's hash and linear
 * probing, as the engine writes it. Returns the rule entry number, or -1. */
__noinline __s64 fast_rule_find(__u32 w_daddr, __u32 w_dport)
{
	struct xlb_fast_elem *hdr = fast_elem(0), *nf = fast_elem(XLB_NF_ELEM);
	__u32 mask, home, index_base, rules_base, rules;

	if (!hdr || !nf)
		return -1;
	mask = XLB_READ(nf->w[XLB_NF_RULE_SLOTS]) - 1;
	index_base = XLB_READ(nf->w[XLB_NF_RULE_INDEX_BASE]);
	rules_base = XLB_READ(nf->w[XLB_NF_RULES_BASE]);
	rules = XLB_READ(nf->w[XLB_NF_RULES]);
	home = (__u32)fast_hash(hdr, 0, w_daddr, w_dport, IPPROTO_TCP) & mask;
	for (int i = 0; i < XLB_FAST_PROBES; i++) {
		__u32 s = (home + i) & mask, v;
		struct xlb_fast_elem *slots, *r;

		slots = fast_elem(index_base + (s >> 4));
		if (!slots)
			return -1;
		v = XLB_READ(slots->w[s & 15]);
		if (v == XLB_FAST_EMPTY)
			return -1;
		if (v > rules)
			continue;
		r = fast_elem(rules_base + v - 1);
		if (!r)
			continue;
		if (XLB_READ(r->w[XLB_NFR_VIP]) == w_daddr &&
		    XLB_READ(r->w[XLB_NFR_PORTS]) == w_dport &&
		    (XLB_READ(r->w[XLB_NFR_PROTO_RULE]) & 0xffff) == IPPROTO_TCP)
			return v - 1;
	}
	return -1;
}

/* The member entry the rule entry `rule` sends the TCP flow saddr:sport -> daddr:dport (host
 * order) to: the engine's Maglev choice, slot reduce(flow_hash(dist, tuple), m) of the rule's
 * table. Returns the member entry's element, or -1 (no member to send to: punt). */
static __always_inline __s64 nf_member(const struct xlb_fast_elem *nf,
				       const struct xlb_fast_elem *rule, __u32 saddr,
				       __u16 sport, __u32 daddr, __u16 dport)
{
	__u32 dist = XLB_READ(rule->w[XLB_NFR_DIST]);
	__u32 m = XLB_READ(rule->w[XLB_NFR_TABLE_SLOTS]);
	__u32 members_n = XLB_READ(rule->w[XLB_NFR_MEMBERS_N]);
	__u32 slot, word, v, member, entry;
	struct xlb_fast_elem *t;

	if (dist > XLB_DIST_SOURCE_IP_PROTOCOL || m == 0 || m > XLB_MAGLEV_MAX)
		return -1;
	slot = (__u32)mul_hi(flow_hash(dist, saddr, sport, daddr, dport), m);
	word = XLB_READ(rule->w[XLB_NFR_TABLE_OFF]) + slot / 2;
	if (word >= XLB_READ(nf->w[XLB_NF_TABLE_WORDS]))
		return -1;
	t = fast_elem(XLB_READ(nf->w[XLB_NF_TABLES_BASE]) + word / 16);
	if (!t)
		return -1;
	v = XLB_READ(t->w[word & 15]);
	member = (slot & 1) ? v >> 16 : v & 0xffff;
	if (member == XLB_NF_NO_MEMBER || member >= members_n)
		return -1;
	entry = XLB_READ(rule->w[XLB_NFR_MEMBERS_OFF]) + member;
	if (entry >= XLB_READ(nf->w[XLB_NF_MEMBERS]))
		return -1;
	return XLB_READ(nf->w[XLB_NF_MEMBERS_BASE]) + entry;
}

/* The worker owning the flow of client saddr:sport (host order) among `workers`: the
 * engine's steer() of the client endpoint (HashKey::endpoint under the steering key). */
static __always_inline __u32 nf_owner(const struct xlb_fast_elem *keys, __u32 saddr,
				      __u16 sport, __u32 workers)
{
	__u64 h;

	if (workers <= 1)
		return 0;
	h = fold_mul((XLB_V4_MAPPED | saddr) ^ elem_key(keys, 0, 0), elem_key(keys, 0, 1));
	h = fold_mul(h ^ sport ^ elem_key(keys, 0, 2), elem_key(keys, 0, 3));
	h = fold_mul(h, XLB_ENDPOINT_MIX);
	return (__u32)mul_hi(h, workers);
}

/*
 * A pure SYN (SYN without ACK, FIN, RST) that arrived on dataplane port `port`: the start of
 * a new flow of a load-balancing rule the engine published in the new-flow section. The
 * member is chosen here as the engine would, the SYN is rewritten and sent out of the
 * member's egress, and its headers as received go into the ring of the worker owning the
 * flow, which then installs the flow as if it had forwarded the SYN itself. XDP_REDIRECT, or
 * XLB_PUNT with the frame untouched and nothing written.
 */
__noinline int fast_syn(struct xdp_md *ctx, __u32 port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	struct xlb_fast_elem *nf, *keys, *rule, *member, *prod, *cons, *rec0, *rec1;
	__u32 tot_len, hlen, w_saddr, w_daddr, w_ports, w_dport, flags, tx_port, n_daddr, n_ports;
	__u32 workers, owner, ring, records, ring_elements, seq = 0, words, rule_id;
	__u16 sport, dport, n_dport, old_check;
	__s64 found;
	int partial, reserved = 0;

	/* Eligible: untagged IPv4 without options, not a fragment, a hop left; TCP, a pure SYN
	 * whose header is all inside the frame, without payload (the worker's next_seq would
	 * have to count it). */
	if ((void *)(tcp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->ihl != 5 || ip->version != 4 || (ip->frag_off & bpf_htons(0x3fff)) ||
	    ip->ttl <= 1 || ip->protocol != IPPROTO_TCP || tcp->doff < 5 || !tcp->syn ||
	    tcp->ack || tcp->fin || tcp->rst)
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);
	tot_len = bpf_ntohs(ip->tot_len);
	hlen = tcp->doff * 4;
	if (tot_len != sizeof(*ip) + hlen || (void *)ip + tot_len > data_end)
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);

	nf = fast_elem(XLB_NF_ELEM);
	keys = fast_elem(XLB_STEER_ELEM);
	if (!nf || !keys || XLB_READ(nf->w[XLB_NF_ENABLED]) != 1)
		return fast_punt(XLB_FAST_NEW_OFF);

	w_saddr = ip->saddr;
	w_daddr = ip->daddr;
	w_ports = *(__u32 *)tcp;
	/* A published flow never takes a SYN here (the worker tracks it). */
	if (fast_find(w_saddr, w_daddr, w_ports, IPPROTO_TCP) >= 0)
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);

	/* the port word with its source half zero: the rule's key */
	w_dport = w_ports & bpf_htonl(0x0000ffff);
	found = fast_rule_find(w_daddr, w_dport);
	if (found < 0)
		return fast_punt(XLB_FAST_NEW_NO_RULE);
	rule = fast_elem(XLB_READ(nf->w[XLB_NF_RULES_BASE]) + (__u32)found);
	if (!rule)
		return fast_punt(XLB_FAST_NEW_NO_RULE);
	if (XLB_READ(rule->w[XLB_NFR_INGRESS_PORT]) != port)
		return fast_punt(XLB_FAST_NEW_WRONG_PORT);

	sport = bpf_ntohs(tcp->source);
	dport = bpf_ntohs(tcp->dest);
	found = nf_member(nf, rule, bpf_ntohl(w_saddr), sport, bpf_ntohl(w_daddr), dport);
	if (found < 0)
		return fast_punt(XLB_FAST_NEW_NO_MEMBER);
	member = fast_elem((__u32)found);
	if (!member || XLB_READ(member->w[XLB_NFM_VALID]) != 1)
		return fast_punt(XLB_FAST_NEW_NO_MEMBER);

	tx_port = XLB_READ(member->w[XLB_NFM_TX_PORT]);
	if (!bpf_map_lookup_elem(&xlb_tx, &tx_port))
		return fast_punt(XLB_FAST_NO_TX);

	old_check = tcp->check;
	if (sender_check(ctx, w_saddr, w_daddr, IPPROTO_TCP, hlen, &old_check, &partial) < 0)
		return fast_punt(XLB_FAST_CSUM_TOO_LONG);

	/* The owner's ring, checked whole (its last element exists) before a record is reserved:
	 * nothing after the reservation may fail. */
	workers = XLB_READ(nf->w[XLB_NF_WORKERS]);
	owner = nf_owner(keys, bpf_ntohl(w_saddr), sport, workers);
	records = XLB_READ(nf->w[XLB_NF_RING_RECORDS]);
	ring_elements = XLB_READ(nf->w[XLB_NF_RING_ELEMENTS]);
	ring = XLB_READ(nf->w[XLB_NF_RINGS_BASE]) + owner * ring_elements;
	if (records == 0 || (records & (records - 1)) || ring_elements != 2 + 2 * records ||
	    !fast_elem(ring + ring_elements - 1))
		return fast_punt(XLB_FAST_NEW_RING_FULL);
	prod = fast_elem(ring + XLB_RING_PROD_ELEM);
	cons = fast_elem(ring + XLB_RING_CONS_ELEM);
	if (!prod || !cons)
		return fast_punt(XLB_FAST_NEW_RING_FULL);
	for (int t = 0; t < XLB_RING_TRIES; t++) {
		__u32 p = XLB_READ(prod->w[0]), c = XLB_READ(cons->w[0]);

		if (p - c >= records)
			break;
		if (__sync_val_compare_and_swap(&prod->w[0], p, p + 1) == p) {
			seq = p;
			reserved = 1;
			break;
		}
	}
	if (!reserved)
		return fast_punt(XLB_FAST_NEW_RING_FULL);

	/* ----- committed: nothing below punts ----- */
	flags = XLB_READ(rule->w[XLB_NFR_FLAGS]);
	n_daddr = (flags & XLB_NFR_DNAT_ADDR) ? XLB_READ(member->w[XLB_NFM_ADDR]) : w_daddr;
	n_dport = (flags & XLB_NFR_DNAT_PORT) ? (__u16)XLB_READ(rule->w[XLB_NFR_BACKEND_PORT])
					      : dport;
	/* the source half as on the wire, the new destination port in network order */
	n_ports = w_ports;
	((__u16 *)&n_ports)[1] = bpf_htons(n_dport);
	rule_id = XLB_READ(rule->w[XLB_NFR_PROTO_RULE]) >> 16;

	/* The record (headers and MACs as received), then its sequence number last: the worker takes a
	 * record only once SEQ says it is complete (x86 keeps stores in order). Inside the ring,
	 * checked above: the lookups cannot fail. */
	rec0 = fast_elem(ring + XLB_RING_RECORDS_ELEM + 2 * (seq & (records - 1)));
	rec1 = fast_elem(ring + XLB_RING_RECORDS_ELEM + 2 * (seq & (records - 1)) + 1);
	if (rec0 && rec1) {
		/* no clock read for a SYN (the worker installs at its own time; a clock read
		 * is a sixth of the SYN's cost here): 0, not stamped */
		rec0->w[XLB_NFQ_STAMP] = 0;
		rec0->w[XLB_NFQ_ADDR] = XLB_READ(member->w[XLB_NFM_ADDR]);
		rec0->w[XLB_NFQ_PORT] = n_dport;
		rec0->w[XLB_NFQ_RULE] = rule_id;
		rec0->w[XLB_NFQ_INGRESS_PORT] = port;
		rec0->w[XLB_NFQ_LEN] = tot_len;
		rec0->w[XLB_NFQ_RESERVED] = 0;
		words = tot_len / 4;
#pragma unroll
		for (int i = 0; i < XLB_NFQ_HEADER_WORDS; i++) {
			__u32 *src = (__u32 *)ip + i, v = 0;

			/* the IPv4 header and the TCP header up to its options lie inside the
			 * frame (checked on entry); only option words need a check */
			if (i < 10)
				v = *src;
			else if (i < words && (void *)(src + 1) <= data_end)
				v = *src;
			if (XLB_NFQ_HEADERS + i < 16)
				rec0->w[XLB_NFQ_HEADERS + i] = v;
			else
				rec1->w[XLB_NFQ_HEADERS + i - 16] = v;
		}
		__builtin_memcpy(&rec1->w[XLB_NFQ_MACS - 16], eth, 12);
		rec1->w[15] = 0;
		XLB_BARRIER();
		XLB_READ(rec0->w[XLB_NFQ_SEQ]) = seq + 1;
	}

	fast_rewrite(eth, ip, (__u8 *)tcp, &tcp->check, IPPROTO_TCP, old_check, partial, w_saddr,
		     n_daddr, n_ports, &member->w[XLB_NFM_MACS]);
	fast_stat(XLB_FAST_NEW_FORWARDED);
	return bpf_redirect_map(&xlb_tx, tx_port, 0);
}

/*
 * The fast path for a frame that arrived on dataplane port `port`: XDP_REDIRECT out of the
 * flow's egress, or XLB_PUNT with the frame untouched.
 */
static __noinline int fast_path(struct xdp_md *ctx, __u32 port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct xlb_fast_elem *hdr, *d, *r = NULL;
	__u32 w_saddr, w_daddr, w_ports, tot_len, l4_len, seq = 0, ack = 0, end = 0;
	__u32 state, line, lines_base, tx_port, rule_key;
	__u16 *check, old_check;
	__s64 found;
	__u8 *l4;
	__u8 proto;
	int partial = 0;

	hdr = fast_elem(0);
	if (!hdr || XLB_READ(hdr->w[XLB_FH_MAGIC]) != XLB_FAST_MAGIC ||
	    XLB_READ(hdr->w[XLB_FH_ENABLED]) != 1)
		return XLB_PUNT;
	lines_base = XLB_READ(hdr->w[XLB_FH_LINES_BASE]);

	/* Eligible frames: untagged IPv4 without options, not a fragment, a hop left; TCP ACK
	 * without SYN/FIN/RST, or UDP. */
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);
	if (ip->ihl != 5 || ip->version != 4 || (ip->frag_off & bpf_htons(0x3fff)) ||
	    ip->ttl <= 1)
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(*ip) || (void *)ip + tot_len > data_end)
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);
	proto = ip->protocol;
	l4 = (__u8 *)(ip + 1);
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)l4;
		__u32 hlen;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5)
			return fast_punt(XLB_FAST_NOT_ELIGIBLE);
		/* the first segment of a new flow */
		if (tcp->syn && !tcp->ack && !tcp->fin && !tcp->rst)
			return fast_syn(ctx, port);
		if (!tcp->ack || tcp->syn || tcp->fin || tcp->rst)
			return fast_punt(XLB_FAST_NOT_ELIGIBLE);
		hlen = tcp->doff * 4;
		if (tot_len < sizeof(*ip) + hlen)
			return fast_punt(XLB_FAST_NOT_ELIGIBLE);
		l4_len = tot_len - sizeof(*ip);
		seq = bpf_ntohl(tcp->seq);
		ack = bpf_ntohl(tcp->ack_seq);
		end = seq + (l4_len - hlen);
		check = &tcp->check;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)l4;

		if ((void *)(udp + 1) > data_end)
			return fast_punt(XLB_FAST_NOT_ELIGIBLE);
		l4_len = bpf_ntohs(udp->len);
		if (l4_len < sizeof(*udp) || l4_len > tot_len - sizeof(*ip))
			return fast_punt(XLB_FAST_NOT_ELIGIBLE);
		check = &udp->check;
	} else {
		return fast_punt(XLB_FAST_NOT_ELIGIBLE);
	}
	w_saddr = ip->saddr;
	w_daddr = ip->daddr;
	w_ports = *(__u32 *)l4;

	found = fast_find(w_saddr, w_daddr, w_ports, proto);
	if (found < 0)
		return fast_punt(XLB_FAST_MISS);
	line = (__u32)found;
	state = (__u32)(found >> 32);
	d = fast_elem(lines_base + line);
	if (!d)
		return fast_punt(XLB_FAST_MISS);
	if (!(state & XLB_FS_FAST))
		return fast_punt(XLB_FAST_NOT_FAST);
	if (XLB_READ(d->w[XLB_FL_INGRESS_PORT]) != port)
		return fast_punt(XLB_FAST_WRONG_PORT);

	if (proto == IPPROTO_TCP) {
		r = fast_elem(lines_base + (line ^ 1));
		if (!r || !(state & XLB_FS_TCP) || !tcp_in_window(d, r, state, seq, end, ack))
			return fast_punt(XLB_FAST_WINDOW);
	}

	old_check = *check;
	if (sender_check(ctx, w_saddr, w_daddr, proto, l4_len, &old_check, &partial) < 0)
		return fast_punt(XLB_FAST_CSUM_TOO_LONG);

	tx_port = XLB_READ(d->w[XLB_FL_TX_PORT]);
	if (!bpf_map_lookup_elem(&xlb_tx, &tx_port))
		return fast_punt(XLB_FAST_NO_TX);

	/* ----- committed: nothing below punts ----- */
	if (proto == IPPROTO_TCP && r) {
		struct tcphdr *tcp = (void *)l4;
		__u32 shift = (state >> 8) & 0xf;

		if (shift > 14)
			shift = 14;
		advance_serial(&d->w[XLB_FL_NEXT_SEQ], end);
		grow(&d->w[XLB_FL_MAX_WIN], (__u32)bpf_ntohs(tcp->window) << shift);
	}
	advance_serial(&d->w[XLB_FL_LAST_SEEN], (__u32)(bpf_ktime_get_ns() >> 16) + 1);

	fast_rewrite(eth, ip, l4, check, proto, old_check, partial, XLB_READ(d->w[XLB_FL_NEW_SADDR]),
		     XLB_READ(d->w[XLB_FL_NEW_DADDR]), XLB_READ(d->w[XLB_FL_NEW_PORTS]),
		     &d->w[XLB_FL_MACS]);

	rule_key = (XLB_READ(d->w[XLB_FL_PROTO_RULE]) >> 16) * 2 + (line & 1);
	{
		struct xlb_fast_count *c = bpf_map_lookup_elem(&xlb_fast_cnt, &rule_key);

		if (c) {
			c->packets += 1;
			c->bytes += (__u64)(data_end - data);
		}
	}
	fast_stat(XLB_FAST_FORWARDED);
	return bpf_redirect_map(&xlb_tx, tx_port, 0);
}

#endif
