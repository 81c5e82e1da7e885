// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-xdp-fwd's XDP program: the kernel's own fast path between two interfaces, the
 * benchmark's ceiling. Attached natively to both; every IPv4/IPv6 frame that arrives on one
 * leaves by the other (XDP_REDIRECT through a devmap) with its MACs rewritten: destination
 * the next hop on that side, source the egress interface's. Nothing else: no TTL, no
 * checksum, no NAT, no lookup. ARP and everything that is not IP go to the kernel.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Keep in sync with src/redirect.rs. */
struct fwd_port {
	__u32 ifindex;     /* this side's interface */
	__u8 next_hop[6];  /* MAC frames leaving by this side go to */
	__u8 own[6];       /* this side's MAC */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct fwd_port);
} fwd_ports SEC(".maps");

/* Port index -> egress ifindex. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} fwd_tx SEC(".maps");

/* Per CPU: 0 redirected, 1 passed to the kernel. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} fwd_counters SEC(".maps");

static __always_inline void count(__u32 k)
{
	__u64 *c = bpf_map_lookup_elem(&fwd_counters, &k);

	if (c)
		(*c)++;
}

SEC("xdp")
int xlb_xdp_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct fwd_port *p0, *out;
	__u32 zero = 0, egress;

	if ((void *)(eth + 1) > data_end ||
	    (eth->h_proto != bpf_htons(ETH_P_IP) && eth->h_proto != bpf_htons(ETH_P_IPV6))) {
		count(1);
		return XDP_PASS;
	}
	p0 = bpf_map_lookup_elem(&fwd_ports, &zero);
	if (!p0)
		return XDP_PASS;
	egress = ctx->ingress_ifindex == p0->ifindex ? 1 : 0;
	out = bpf_map_lookup_elem(&fwd_ports, &egress);
	if (!out)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, out->next_hop, ETH_ALEN);
	__builtin_memcpy(eth->h_source, out->own, ETH_ALEN);
	count(0);
	return bpf_redirect_map(&fwd_tx, egress, XDP_DROP);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
