// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-sink's XDP program: count every frame that arrives (packets and bytes per CPU), and
 * XDP_DROP it. Frames that carry xlb-gen's payload marker (IPv4, UDP or TCP, magic "XLBG"
 * right after the L4 header) are counted as marked; one marked frame in `sink_sample_every`
 * sends (send time, receive time, sequence number) to user space through a ring buffer,
 * for the latency histogram. Both times are CLOCK_MONOTONIC (bpf_ktime_get_ns) on the same
 * host, so their difference is the one-way latency through whatever lies in between.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Keep in sync with src/gen.rs and src/sink.rs. */
#define GEN_MAGIC 0x584c4247 /* "XLBG" */

/* 0: no latency samples. */
const volatile __u32 sink_sample_every = 0;

struct sink_stats {
	__u64 packets;
	__u64 bytes;
	__u64 marked;
	__u64 samples;
	__u64 samples_lost; /* ring buffer full */
};

struct sink_sample {
	__u64 sent_ns;
	__u64 recv_ns;
	__u32 seq;
	__u32 cpu;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sink_stats);
} sink_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} sink_samples SEC(".maps");

/* The payload marker of an xlb-gen frame, or NULL. */
static __always_inline __u32 *find_marker(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 ihl, *m;
	void *l4;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return NULL;
	ihl = ip->ihl & 0xf;
	if (ihl < 5)
		return NULL;
	l4 = (void *)ip + ihl * 4;
	if (ip->protocol == IPPROTO_UDP) {
		m = l4 + sizeof(struct udphdr);
	} else if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		__u32 doff;

		if ((void *)(tcp + 1) > data_end)
			return NULL;
		doff = tcp->doff & 0xf;
		if (doff < 5)
			return NULL;
		m = l4 + doff * 4;
	} else {
		return NULL;
	}
	if ((void *)(m + 4) > data_end || *m != bpf_htonl(GEN_MAGIC))
		return NULL;
	return m;
}

SEC("xdp")
int xlb_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 now = bpf_ktime_get_ns();
	struct sink_stats *st;
	struct sink_sample *s;
	__u32 zero = 0, *m;
	__u64 sent;

	st = bpf_map_lookup_elem(&sink_stats, &zero);
	if (!st)
		return XDP_DROP;
	st->packets++;
	st->bytes += data_end - data;
	m = find_marker(data, data_end);
	if (!m)
		return XDP_DROP;
	st->marked++;
	if (!sink_sample_every || st->marked % sink_sample_every)
		return XDP_DROP;
	s = bpf_ringbuf_reserve(&sink_samples, sizeof(*s), 0);
	if (!s) {
		st->samples_lost++;
		return XDP_DROP;
	}
	__builtin_memcpy(&sent, &m[2], 8);
	s->sent_ns = bpf_be64_to_cpu(sent);
	s->recv_ns = now;
	s->seq = bpf_ntohl(m[1]);
	s->cpu = bpf_get_smp_processor_id();
	bpf_ringbuf_submit(s, 0);
	st->samples++;
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
