// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb's XDP program: decide per packet whether the user-space dataplane owns it.
 *
 * One program is loaded once and attached to every interface the dataplane drives, so the
 * maps are shared by all of them: user space writes the owned addresses once, not once per
 * interface. The price is that one XSKMAP serves several interfaces, so its key is
 * `slot * XLB_MAX_QUEUES + rx_queue_index`, where `slot` is the interface's small dense
 * index taken from `xlb_ifaces` (still "keyed by rx queue index" within an interface).
 *
 * Everything the kernel must keep seeing (ARP, ND, router solicitations, multicast, the
 * host's own addresses) goes XDP_PASS, so the kernel stays the owner of neighbours and of
 * the host's own traffic.
 *
 * Before that, the fast path: frames of flows the dataplane published in `xlb_fast`
 * (established TCP, confirmed UDP, IPv4 without VLAN) are translated here and sent out of
 * the egress interface through `xlb_tx`. Any doubt is a punt: the frame, unmodified, takes
 * the path above to the dataplane, which stays the authority on every flow.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Keep in sync with src/xdp.rs. */
#define XLB_MAX_IFACES 64
#define XLB_MAX_QUEUES 64
#define XLB_IFACE_BACKEND_SIDE 0x1
/* no socket in the queue's slot: drop (TCP retransmits) rather than pass to the kernel */
#define XLB_IFACE_HOLD 0x2
/* attached natively and allowed to take the fast path; `port` is the dataplane's port id */
#define XLB_IFACE_FAST 0x4
#define XLB_ADDR_OWNED 1
#define XLB_ADDR_LOCAL 2

enum xlb_counter {
	XLB_CNT_REDIRECTED = 0,
	XLB_CNT_PASSED = 1,
	/* wanted by the dataplane, but no socket in the XSKMAP slot: passed to the kernel */
	XLB_CNT_NO_XSK = 2,
	XLB_CNT_MAX = 4,
};

struct xlb_iface {
	__u32 slot;
	__u32 flags;
	__u32 port;
};

/* IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d) so one map serves both families. */
struct xlb_addr {
	__u8 a[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XLB_MAX_IFACES * XLB_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xlb_xsks SEC(".maps");

/* A hash, not an array indexed by ifindex: ifindexes grow without bound on a host that
 * creates and deletes interfaces (every veth pair takes two new ones). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct xlb_iface);
} xlb_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct xlb_addr);
	__type(value, __u32);
} xlb_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xlb_counters SEC(".maps");

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&xlb_counters, &which);

	if (c)
		*c += 1;
}

static __always_inline int pass(void)
{
	count(XLB_CNT_PASSED);
	return XDP_PASS;
}

#include "xlb_fast.h"

static __always_inline int redirect(struct xdp_md *ctx, const struct xlb_iface *iface)
{
	__u32 q = ctx->rx_queue_index;
	long ret;

	if (q >= XLB_MAX_QUEUES) {
		count(XLB_CNT_NO_XSK);
		return XDP_PASS;
	}
	/* The low bits of flags are the action when the slot is empty (no worker socket: xlbd
	 * starting, restarting or down). By default the kernel gets the packet; with
	 * XLB_IFACE_HOLD it is dropped, so that the sender retransmits it once a worker is
	 * back and the host never sees untranslated traffic for the dataplane. */
	ret = bpf_redirect_map(&xlb_xsks, iface->slot * XLB_MAX_QUEUES + q,
			       (iface->flags & XLB_IFACE_HOLD) ? XDP_DROP : XDP_PASS);
	count(ret == XDP_REDIRECT ? XLB_CNT_REDIRECTED : XLB_CNT_NO_XSK);
	return ret;
}

SEC("xdp")
int xlb_xdp(struct xdp_md *ctx)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct xlb_addr key = {};
	const struct xlb_iface *iface;
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *kind;
	__u16 proto;
	void *l3;

	iface = bpf_map_lookup_elem(&xlb_ifaces, &ifindex);
	if (!iface)
		return pass();

	if (iface->flags & XLB_IFACE_FAST) {
		int action = fast_path(ctx, iface->port);

		if (action != XLB_PUNT)
			return action;
	}

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;

	if ((void *)(eth + 1) > data_end)
		return pass();
	proto = eth->h_proto;
	l3 = eth + 1;

	/* Up to two VLAN tags (802.1Q, 802.1ad QinQ), unrolled for the verifier. */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		struct vlan_hdr *vh = l3;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vh + 1) > data_end)
			return pass();
		proto = vh->proto;
		l3 = vh + 1;
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		__u8 first;

		if ((void *)(ip + 1) > data_end)
			return pass();
		first = ((__u8 *)&ip->daddr)[0];
		/* multicast and limited broadcast belong to the kernel */
		if ((first & 0xf0) == 0xe0 || ip->daddr == 0xffffffff)
			return pass();
		key.a[10] = 0xff;
		key.a[11] = 0xff;
		__builtin_memcpy(&key.a[12], &ip->daddr, 4);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;
		__u8 *d;

		if ((void *)(ip6 + 1) > data_end)
			return pass();
		d = ip6->daddr.in6_u.u6_addr8;
		/* multicast (ff00::/8: ND solicitations, MLD, RA) and link-local (fe80::/10) */
		if (d[0] == 0xff || (d[0] == 0xfe && (d[1] & 0xc0) == 0x80))
			return pass();
		/* Unicast neighbour solicitations and advertisements (types 133..137) are how the
		 * kernel confirms reachability: never take them, whatever the destination. */
		if (ip6->nexthdr == IPPROTO_ICMPV6) {
			__u8 *type = (__u8 *)(ip6 + 1);

			if ((void *)(type + 1) > data_end)
				return pass();
			if (*type >= 133 && *type <= 137)
				return pass();
		}
		__builtin_memcpy(key.a, d, 16);
	} else {
		/* ARP, LLDP, anything not IP */
		return pass();
	}

	kind = bpf_map_lookup_elem(&xlb_addrs, &key);
	if (kind) {
		if (*kind == XLB_ADDR_OWNED)
			return redirect(ctx, iface);
		/* one of the host's own addresses: ssh, probes, the control plane */
		return pass();
	}
	/* Behind a load balancer the backends' replies and outbound connections are addressed
	 * to the clients and the internet, not to the appliance: on the backend side every
	 * non-local destination is the dataplane's. */
	if (iface->flags & XLB_IFACE_BACKEND_SIDE)
		return redirect(ctx, iface);
	return pass();
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
