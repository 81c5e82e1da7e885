// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-sink's XDP program: counts what arrives, checks it, and either drops it or reflects it.
 *
 * Every frame is counted (packets and bytes per CPU). IPv4 and IPv6 frames carrying UDP or
 * TCP are then checked, when `sink_check` asks for it:
 * Frames that are not test traffic (neither the generator's marker nor the expected port:
 * the appliance's own neighbour probes, say) are counted apart and dropped. Test frames:
 *   - the address and port on one side are the expected ones: on the backend side
 *     (SINK_CHECK_DST) the destination must be the backend's address and port, i.e. the NAT
 *     rewrite happened; on the client side (SINK_CHECK_SRC) the source must be what the
 *     client sent to (the VIP and its port), i.e. the reply was translated back;
 *   - the IPv4 header checksum is valid, and the TCP/UDP checksum over the pseudo-header and
 *     the whole segment is valid (a UDP checksum of 0 over IPv4, "none", is counted apart).
 * A frame that fails a check is counted under its reason and dropped: a forwarder that
 * breaks packets cannot score. Frames that pass are `good`.
 *
 * Good frames are then dropped, or with `sink_reflect` sent back where they came from the
 * way a server would answer them: MACs, addresses and ports swapped (which
 * leaves both checksums as they are); UDP echoed as it is; a TCP SYN answered with a SYN-ACK
 * acknowledging the SYN (its bytes, the SYN's payload sent back, end at SINK_ISN + 1: the
 * number xlb-gen's ACK mode acknowledges is the SYN-ACK's end, exactly as a real client's
 * handshake ACK, which a tracker that confirms a flow on that ACK requires); a TCP segment
 * with data or a FIN answered with
 * the same bytes as an ACK of them (sequence = the ACK number it carried); pure ACKs and RSTs
 * are only counted. The TCP checksum is updated incrementally (RFC 1624) for the words that
 * change. The reflector keeps no state: every answer comes from the segment it answers.
 * Answers leave by XDP_REDIRECT to the receiving interface itself rather than XDP_TX: a veth
 * flushes XDP_TX frames to its peer only when the peer runs an XDP program, so a kernel
 * path (GRO on the peer, no program) would see 256 answers and then none; the redirect's
 * ndo_xdp_xmit flushes either way.
 *
 * Frames that carry xlb-gen's payload marker (magic "XLBG" right after the L4 header) are
 * counted as marked; one marked frame in `sink_sample_every` sends (send time, receive time,
 * sequence number) to user space through a ring buffer for the latency histogram. Both times
 * are CLOCK_MONOTONIC (bpf_ktime_get_ns) on the same host: on the backend side the difference
 * is the one-way latency through the appliance, on the client side the round trip.
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

/* Keep in sync with src/gen.rs and src/sink.rs. */
#define GEN_MAGIC 0x584c4247 /* "XLBG" */
#define SINK_CHECK_NONE 0
#define SINK_CHECK_DST 1
#define SINK_CHECK_SRC 2
/* The reflector's initial sequence number: xlb-gen's ACK mode acknowledges SINK_ISN + 1. */
#define SINK_ISN 0x10000000
/* Longest L4 segment checked (IPv4/IPv6 at MTU 1500 leave at most 1480). */
#define SINK_MAX_L4 2040
#define SINK_CSUM_CHUNK 512

/* 0: no latency samples. */
const volatile __u32 sink_sample_every = 0;
/* 1: answer good frames instead of dropping them. */
const volatile __u32 sink_reflect = 0;
/* SINK_CHECK_*: which side's address and port must match. */
const volatile __u32 sink_check = SINK_CHECK_NONE;
/* The expected address, IPv4 as ::ffff:a.b.c.d, network byte order. */
const volatile __u32 sink_addr[4] = {};
/* The expected UDP and TCP ports (host byte order), 0: any. */
const volatile __u32 sink_port_udp = 0;
const volatile __u32 sink_port_tcp = 0;

struct sink_stats {
	__u64 packets;
	__u64 bytes;
	__u64 marked;
	__u64 samples;
	__u64 samples_lost; /* ring buffer full */
	__u64 good;         /* passed every check */
	__u64 bad_addr;     /* wrong address on the checked side: NAT not done */
	__u64 bad_port;     /* wrong port on the checked side */
	__u64 bad_ip_csum;  /* IPv4 header checksum wrong */
	__u64 bad_l4_csum;  /* TCP/UDP checksum wrong */
	__u64 bad_frame;    /* truncated, bad lengths, IPv4 options, IPv6 extension headers */
	__u64 not_checked;  /* not test traffic: ARP, ICMP, or UDP/TCP with neither the
			     * generator's marker nor the expected port; only counted */
	__u64 l4_csum_none; /* UDP over IPv4 without checksum (0): valid, not verified */
	__u64 udp;
	__u64 tcp;
	__u64 syn;
	__u64 syn_ack;
	__u64 rst;
	__u64 reflected;
};

struct sink_sample {
	__u64 sent_ns;
	__u64 recv_ns;
	__u32 seq;
	__u32 cpu;
};

struct sink_scratch {
	__u8 b[SINK_MAX_L4 + 8];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sink_stats);
} sink_stats SEC(".maps");

/* Per-CPU copy of the segment being checksummed (bpf_csum_diff takes at most 512 bytes a
 * call, in multiples of 4: the copy gives it zero padding and bounds the verifier can see). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sink_scratch);
} sink_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} sink_samples SEC(".maps");

static __always_inline __u16 fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* Replaces one 16-bit word of a checksummed region, accumulating ~old + new. */
static __always_inline void put16(__u32 *acc, __u16 *p, __u16 v)
{
	*acc += (__u16)~*p;
	*acc += v;
	*p = v;
}

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

/*
 * Ones'-complement sum of the L4 segment at `off` (`len` bytes) plus `seed`, through the
 * per-CPU scratch copy; < 0 when the segment cannot be read.
 */
static __always_inline __s64 l4_sum(struct xdp_md *ctx, __u32 off, __u32 len, __s64 seed)
{
	struct sink_scratch *sc;
	__u32 zero = 0, len4, i;
	__s64 s = seed;

	if (len == 0 || len > SINK_MAX_L4)
		return -1;
	sc = bpf_map_lookup_elem(&sink_scratch, &zero);
	if (!sc)
		return -1;
	if (bpf_xdp_load_bytes(ctx, off, sc->b, len) < 0)
		return -1;
	/* zero padding up to a multiple of 4 */
	sc->b[len] = 0;
	sc->b[len + 1] = 0;
	sc->b[len + 2] = 0;
	len4 = (len + 3) & ~3u;
#pragma unroll
	for (i = 0; i < 4; i++) {
		__u32 start = i * SINK_CSUM_CHUNK, n;

		if (start >= len4)
			break;
		n = len4 - start;
		if (n > SINK_CSUM_CHUNK)
			n = SINK_CSUM_CHUNK;
		s = bpf_csum_diff(0, 0, (__be32 *)(sc->b + start), n, (__wsum)s);
		if (s < 0)
			return s;
	}
	return s;
}

/* The payload marker at `m`, or NULL. */
static __always_inline __u32 *marker_at(void *m, void *data_end)
{
	__u32 *p = m;

	if ((void *)(p + 4) > data_end || *p != bpf_htonl(GEN_MAGIC))
		return 0;
	return p;
}

static __always_inline void sample(struct sink_stats *st, __u32 *m, __u64 now)
{
	struct sink_sample *s;
	__u64 sent;

	st->marked++;
	if (!sink_sample_every || st->marked % sink_sample_every)
		return;
	s = bpf_ringbuf_reserve(&sink_samples, sizeof(*s), 0);
	if (!s) {
		st->samples_lost++;
		return;
	}
	__builtin_memcpy(&sent, &m[2], 8);
	s->sent_ns = bpf_be64_to_cpu(sent);
	s->recv_ns = now;
	s->seq = bpf_ntohl(m[1]);
	s->cpu = bpf_get_smp_processor_id();
	bpf_ringbuf_submit(s, 0);
	st->samples++;
}

/* Whether the 16-byte address at `a` (IPv6) equals sink_addr. */
static __always_inline int addr6_is(__u32 *a)
{
	return a[0] == sink_addr[0] && a[1] == sink_addr[1] && a[2] == sink_addr[2] &&
	       a[3] == sink_addr[3];
}

static __always_inline int addr4_is(__u32 a)
{
	return sink_addr[0] == 0 && sink_addr[1] == 0 && sink_addr[2] == bpf_htonl(0xffff) &&
	       a == sink_addr[3];
}

SEC("xdp")
int xlb_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 now = bpf_ktime_get_ns();
	struct ethhdr *eth = data;
	struct sink_stats *st;
	__u32 zero = 0, l4off, l4len, proto, addr_ok, pseudo;
	__u16 sport, dport, want_port;
	int marked;
	__s64 sum;
	void *l4;
	int v6;

	st = bpf_map_lookup_elem(&sink_stats, &zero);
	if (!st)
		return XDP_DROP;
	st->packets++;
	st->bytes += data_end - data;

	if ((void *)(eth + 1) > data_end)
		goto bad_frame;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 tot;

		if ((void *)(ip + 1) > data_end)
			goto bad_frame;
		if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP) {
			st->not_checked++;
			return XDP_DROP;
		}
		if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
			goto bad_frame;
		tot = bpf_ntohs(ip->tot_len);
		if (tot < 20 || (void *)ip + tot > data_end)
			goto bad_frame;
		v6 = 0;
		proto = ip->protocol;
		l4 = (void *)(ip + 1);
		l4off = sizeof(*eth) + 20;
		l4len = tot - 20;
		if (sink_check != SINK_CHECK_NONE) {
			if (fold(bpf_csum_diff(0, 0, (__be32 *)ip, 20, 0)) != 0xffff) {
				st->bad_ip_csum++;
				return XDP_DROP;
			}
			addr_ok = addr4_is(sink_check == SINK_CHECK_DST ? ip->daddr : ip->saddr);
		} else {
			addr_ok = 1;
		}
		/* the pseudo-header's addresses */
		sum = bpf_csum_diff(0, 0, (__be32 *)&ip->saddr, 8, 0);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			goto bad_frame;
		if (ip6->nexthdr != IPPROTO_UDP && ip6->nexthdr != IPPROTO_TCP) {
			st->not_checked++;
			return XDP_DROP;
		}
		l4len = bpf_ntohs(ip6->payload_len);
		if ((void *)(ip6 + 1) + l4len > data_end)
			goto bad_frame;
		v6 = 1;
		proto = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
		l4off = sizeof(*eth) + sizeof(*ip6);
		if (sink_check != SINK_CHECK_NONE)
			addr_ok = addr6_is(sink_check == SINK_CHECK_DST ? (__u32 *)&ip6->daddr
									: (__u32 *)&ip6->saddr);
		else
			addr_ok = 1;
		sum = bpf_csum_diff(0, 0, (__be32 *)&ip6->saddr, 32, 0);
	} else {
		st->not_checked++;
		return XDP_DROP;
	}

	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end || l4len < sizeof(*udp) ||
		    bpf_ntohs(udp->len) != l4len)
			goto bad_frame;
		st->udp++;
		sport = bpf_ntohs(udp->source);
		dport = bpf_ntohs(udp->dest);
		want_port = sink_port_udp;
		marked = marker_at(udp + 1, data_end) != 0;
	} else {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end || l4len < sizeof(*tcp) || tcp->doff < 5 ||
		    tcp->doff * 4 > l4len)
			goto bad_frame;
		st->tcp++;
		sport = bpf_ntohs(tcp->source);
		dport = bpf_ntohs(tcp->dest);
		want_port = sink_port_tcp;
		marked = marker_at((void *)tcp + tcp->doff * 4, data_end) != 0;
	}

	if (sink_check != SINK_CHECK_NONE) {
		/* Test traffic carries the generator's marker or the expected port; anything else
		 * (the appliance's own neighbour probes, say) is not the forwarder's doing. */
		if (!marked && want_port &&
		    (sink_check == SINK_CHECK_DST ? dport : sport) != want_port) {
			st->not_checked++;
			return XDP_DROP;
		}
		if (!addr_ok) {
			st->bad_addr++;
			return XDP_DROP;
		}
		if (want_port && (sink_check == SINK_CHECK_DST ? dport : sport) != want_port) {
			st->bad_port++;
			return XDP_DROP;
		}
		if (proto == IPPROTO_UDP && !v6 && ((struct udphdr *)l4)->check == 0) {
			st->l4_csum_none++;
		} else {
			/* pseudo-header: zero, protocol, L4 length (one 32-bit word covers the
			 * IPv4 and IPv6 forms alike for lengths below 65536) */
			pseudo = bpf_htonl((proto << 16) | l4len);
			sum = bpf_csum_diff(0, 0, &pseudo, 4, (__wsum)sum);
			if (sum < 0)
				goto bad_frame;
			sum = l4_sum(ctx, l4off, l4len, sum);
			if (sum < 0)
				goto bad_frame;
			if (fold(sum) != 0xffff) {
				st->bad_l4_csum++;
				return XDP_DROP;
			}
		}
	}
	st->good++;

	/* Packet pointers are re-derived after the helper calls above. */
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if (data + l4off > data_end || l4off > 64)
		return XDP_DROP;
	l4 = data + l4off;

	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		__u32 *m;
		__u16 p;

		if ((void *)(udp + 1) > data_end)
			return XDP_DROP;
		m = marker_at(udp + 1, data_end);
		if (m)
			sample(st, m, now);
		if (!sink_reflect)
			return XDP_DROP;
		p = udp->source;
		udp->source = udp->dest;
		udp->dest = p;
	} else {
		struct tcphdr *tcp = l4;
		__u32 seq, ack, plen, acc = 0, *m;
		__u16 *flags_word, flags, p;

		if ((void *)(tcp + 1) > data_end)
			return XDP_DROP;
		m = marker_at((void *)tcp + ((tcp->doff & 0xf) * 4), data_end);
		if (m)
			sample(st, m, now);
		if (tcp->rst) {
			st->rst++;
			return XDP_DROP;
		}
		if (tcp->syn) {
			if (tcp->ack)
				st->syn_ack++;
			else
				st->syn++;
		}
		plen = l4len - tcp->doff * 4;
		if (!sink_reflect || (tcp->syn && tcp->ack) ||
		    (!tcp->syn && !tcp->fin && plen == 0))
			return XDP_DROP;
		seq = bpf_ntohl(tcp->seq);
		ack = bpf_ntohl(tcp->ack_seq);
		flags_word = (__u16 *)((void *)tcp + 12);
		if (tcp->syn) {
			/* SYN -> SYN-ACK */
			put32(&acc, (__u16 *)&tcp->ack_seq, bpf_htonl(seq + 1 + plen));
			put32(&acc, (__u16 *)&tcp->seq, bpf_htonl(SINK_ISN - plen));
			flags = *flags_word;
			((__u8 *)&flags)[1] = 0x12; /* SYN | ACK */
		} else {
			/* data (and/or FIN) -> the same bytes back, acknowledging them */
			put32(&acc, (__u16 *)&tcp->seq, bpf_htonl(ack));
			put32(&acc, (__u16 *)&tcp->ack_seq,
			      bpf_htonl(seq + plen + (tcp->fin ? 1 : 0)));
			flags = *flags_word;
			((__u8 *)&flags)[1] = tcp->fin ? 0x11 : 0x10; /* (FIN |) ACK */
		}
		put16(&acc, flags_word, flags);
		tcp->check = csum_apply(tcp->check, acc);
		p = tcp->source;
		tcp->source = tcp->dest;
		tcp->dest = p;
	}

	/* addresses and MACs: swapped, which no checksum sees */
	{
		__u8 mac[ETH_ALEN];

		__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
		__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
		__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	}
	if (!v6) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 a;

		if ((void *)(ip + 1) > data_end)
			return XDP_DROP;
		a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct in6_addr a;

		if ((void *)(ip6 + 1) > data_end)
			return XDP_DROP;
		a = ip6->saddr;
		ip6->saddr = ip6->daddr;
		ip6->daddr = a;
	}
	st->reflected++;
	return bpf_redirect(ctx->ingress_ifindex, 0);

bad_frame:
	st->bad_frame++;
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
