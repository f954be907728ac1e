/*
 * The kernel floor: UDP DNS forwarded by the kernel itself, never reaching a process.
 * A tc (clsact ingress) program on the loopback device: a query to 127.0.0.1:LB_PORT
 * gets the port of one of the two backends instead (chosen at random per query) and
 * goes on to that backend, and is recorded (client, backend, ID); an answer that
 * matches a record younger than 2 s gets LB_PORT back as its source port, and the
 * record goes. (A first version recorded clients only, without expiry: answers to
 * other programs' sockets that later got a port a client once had were rewritten
 * too, and nginx lost its UDP answers in the same run.) No copy, no wake-up of a
 * proxy, no socket of its own: what is left is two map operations and a checksum
 * update per packet, paid in the sender's system call. Loopback only, UDP only, no health checks, no
 * drain, no timeouts: not a usable proxy. bench/harness.py measures it as the "kernel
 * floor" row, to show what the speed targets would take: a proxy whose packets never
 * leave the kernel.
 *
 * Build: clang -O2 -g -target bpf -DLB_PORT=.. -DB1=.. -DB2=.. -c kernel-relay.bpf.c
 * Attach: tc qdisc add dev lo clsact
 *         tc filter add dev lo ingress bpf direct-action obj kernel-relay.bpf.o sec tc
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef LB_PORT
#error "build with -DLB_PORT=... -DB1=... -DB2=..."
#endif

#define LOOPBACK 0x7f000001

#define TIMEOUT_NS 2000000000ULL

/* A query in flight: who asked, which backend, with which ID. */
struct query {
    __u32 client_addr;
    __u16 client_port;
    __u16 backend_port;
    __u16 id;
    __u16 pad;
};

/* Queries in flight, with the time each was sent. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct query);
    __type(value, __u64);
} inflight SEC(".maps");

#define PORT_OFF (ETH_HLEN + sizeof(struct iphdr))
#define CSUM_OFF (PORT_OFF + offsetof(struct udphdr, check))

/* Replaces the UDP port at `off` (source or destination), checksum included. */
static __always_inline int set_port(struct __sk_buff *skb, __u32 off, __be16 old, __be16 new) {
    if (bpf_l4_csum_replace(skb, CSUM_OFF, old, new, sizeof(new)) < 0)
        return -1;
    return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

SEC("tc")
int relay(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + ETH_HLEN;
    struct udphdr *udp = data + PORT_OFF;
    __u16 *id = (void *)(udp + 1);
    /* Shorter than a DNS header: not ours. */
    if ((void *)(udp + 1) + 12 > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    /* Options would move the UDP header (the kernel's own sockets send none); a
     * fragment after the first has none. */
    if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP || ip->daddr != bpf_htonl(LOOPBACK) ||
        (ip->frag_off & bpf_htons(0x1fff)))
        return TC_ACT_OK;
    __be16 sport = udp->source, dport = udp->dest;
    if (dport == bpf_htons(LB_PORT)) {
        __be16 to = (bpf_get_prandom_u32() & 1) ? bpf_htons(B1) : bpf_htons(B2);
        struct query q = {.client_addr = ip->saddr, .client_port = sport, .backend_port = to, .id = *id};
        __u64 now = bpf_ktime_get_ns();
        bpf_map_update_elem(&inflight, &q, &now, BPF_ANY);
        if (set_port(skb, PORT_OFF + offsetof(struct udphdr, dest), dport, to) < 0)
            return TC_ACT_SHOT;
        return TC_ACT_OK;
    }
    if ((sport == bpf_htons(B1) || sport == bpf_htons(B2)) && ip->saddr == bpf_htonl(LOOPBACK)) {
        struct query q = {.client_addr = ip->daddr, .client_port = dport, .backend_port = sport, .id = *id};
        __u64 *sent = bpf_map_lookup_elem(&inflight, &q);
        if (!sent)
            return TC_ACT_OK;
        int fresh = *sent + TIMEOUT_NS > bpf_ktime_get_ns();
        bpf_map_delete_elem(&inflight, &q);
        if (!fresh)
            return TC_ACT_OK;
        if (set_port(skb, PORT_OFF + offsetof(struct udphdr, source), sport, bpf_htons(LB_PORT)) < 0)
            return TC_ACT_SHOT;
    }
    return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
