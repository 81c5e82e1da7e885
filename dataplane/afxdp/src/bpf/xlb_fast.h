/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The XDP fast path, included by xlb.bpf.c: established flows the dataplane published in the
 * shared table `xlb_fast` are forwarded here, everything else is punted to the dataplane.
 *
 * The table (one BPF_F_MMAPABLE array of 64-byte elements, mapped by user space; the layout
 * is the one of src/fast.rs and the engine's fast table, which must agree word for word):
 *   element 0            header: magic, enabled, index_slots, index_base, lines_base, lines,
 *                        hash keys k0..k3 (u64 as two u32 words, low first)
 *   index_base..         index: u32 slots, 16 per element; 0 empty, ~0 tombstone, else line+1
 *   lines_base + line    one direction of one flow (lines 2p and 2p+1 are the two directions
 *                        of pair p)
 *
 * Rule of the road: every check that can punt comes before the first write (to the frame or
 * to the table). A punted frame reaches the dataplane exactly as it arrived.
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
	XLB_FAST_REASONS = 8,
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

static __always_inline int fast_punt(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&xlb_fast_stats, &reason);

	if (c)
		*c += 1;
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

static __always_inline __u64 hdr_key(const struct xlb_fast_elem *h, int i)
{
	return (__u64)h->w[XLB_FH_KEYS + 2 * i] | ((__u64)h->w[XLB_FH_KEYS + 2 * i + 1] << 32);
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

/* The line of the flow (saddr, daddr, ports, proto as read from the frame): hash, then linear
 * probing. Returns line | state << 32 (the line's state word, read before its keys), or -1. */
__noinline __s64 fast_find(__u32 w_saddr, __u32 w_daddr, __u32 w_ports, __u32 proto)
{
	struct xlb_fast_elem *hdr = fast_elem(0);
	__u32 mask, home, index_base, lines_base;
	__u64 h;

	if (!hdr)
		return -1;
	h = fold_mul(((__u64)w_saddr | ((__u64)w_daddr << 32)) ^ hdr_key(hdr, 0),
		     ((__u64)w_ports | ((__u64)proto << 32)) ^ hdr_key(hdr, 1));
	h = fold_mul(h ^ hdr_key(hdr, 2), hdr_key(hdr, 3));
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
	__u16 *check, old_check, new_check;
	__u64 sum;
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

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5 || !tcp->ack || tcp->syn ||
		    tcp->fin || tcp->rst)
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

	/* A partial checksum (the sender left it to the NIC) holds the folded pseudo-header sum
	 * of the frame as received; the sum over the message as received is then the complete
	 * sum, and its complement the checksum the sender meant. */
	old_check = *check;
	sum = (__u64)w_saddr + w_daddr + bpf_htons((__u16)proto) + bpf_htons((__u16)l4_len);
	if (old_check == csum_fold64(sum)) {
		__s64 s = fast_sum(ctx, l4_len);

		if (s < 0)
			return fast_punt(XLB_FAST_CSUM_TOO_LONG);
		old_check = ~csum_fold64((__u64)s);
		partial = 1;
	}

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

	{
		__u32 n_saddr = XLB_READ(d->w[XLB_FL_NEW_SADDR]);
		__u32 n_daddr = XLB_READ(d->w[XLB_FL_NEW_DADDR]);
		__u32 n_ports = XLB_READ(d->w[XLB_FL_NEW_PORTS]);
		__u16 old_ttl_word, new_ttl_word;
		__u64 acc;

		/* RFC 1624 eqn. 3 over native loads, which is the same arithmetic byte-swapped */
		acc = (__u64)(__u32)~w_saddr + n_saddr + (__u32)~w_daddr + n_daddr;
		old_ttl_word = *(__u16 *)&ip->ttl;
		ip->ttl -= 1;
		new_ttl_word = *(__u16 *)&ip->ttl;
		ip->saddr = n_saddr;
		ip->daddr = n_daddr;
		ip->check = ~csum_fold64((__u64)(__u16)~ip->check + acc +
					 (__u16)~old_ttl_word + new_ttl_word);

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
	}
	__builtin_memcpy(eth, &d->w[XLB_FL_MACS], 12);

	rule_key = (XLB_READ(d->w[XLB_FL_PROTO_RULE]) >> 16) * 2 + (line & 1);
	{
		struct xlb_fast_count *c = bpf_map_lookup_elem(&xlb_fast_cnt, &rule_key);

		if (c) {
			c->packets += 1;
			c->bytes += (__u64)(data_end - data);
		}
	}
	{
		__u32 fwd = XLB_FAST_FORWARDED;
		__u64 *c = bpf_map_lookup_elem(&xlb_fast_stats, &fwd);

		if (c)
			*c += 1;
	}
	return bpf_redirect_map(&xlb_tx, tx_port, 0);
}

#endif
