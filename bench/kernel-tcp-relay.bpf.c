/*
 * The TCP kernel floor's BPF half (the other half: kernel-tcp-relay.c). Each client
 * connection and its backend connection sit in a sockhash under their socket cookies;
 * `peers` maps each cookie to the other's. Whatever arrives on one socket is sent out
 * of its peer by the kernel, never read by a process. Bytes on a socket that has no
 * peer yet are left for the process.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u64);
} socks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u64);
} peers SEC(".maps");

/* libbpf 1.1 (Debian 12) knows no "sk_skb/verdict"; attached as BPF_SK_SKB_VERDICT. */
SEC("sk_skb/stream_verdict")
int splice(struct __sk_buff *skb) {
    __u64 cookie = bpf_get_socket_cookie(skb);
    __u64 *peer = bpf_map_lookup_elem(&peers, &cookie);
    if (!peer)
        return SK_PASS;
    return bpf_sk_redirect_hash(skb, &socks, peer, 0);
}

char LICENSE[] SEC("license") = "GPL";
