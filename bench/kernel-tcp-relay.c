/*
 * The TCP kernel floor, for the "kernel floor" row of bench/harness.py (next to
 * kernel-relay.bpf.c, its UDP twin, on the same port). As floor-tcp-relay.c, each
 * client connection gets a backend connection of its own (the backends taken in
 * turn); unlike it, the bytes are spliced by the kernel: both sockets go into a BPF
 * sockhash whose verdict program (kernel-tcp-relay.bpf.c) sends what arrives on one
 * out of the other. This process only accepts, connects and closes. What the kernel's
 * splicing costs (it hands each redirected segment to a kernel worker thread) is in
 * the harness's machine CPU, not in this process's. No framing, no timeouts, no
 * half-close: not a usable proxy.
 *
 * usage: kernel-tcp-relay BPF_OBJECT LISTEN_PORT BACKEND_PORT...   (all on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "floor-args.h"

#define MAX_FD 65536

static int peer_of[MAX_FD];
static uint64_t cookie_of[MAX_FD];
/* Bumped when an fd is paired, and carried in its epoll events: an event of an
 * earlier batch's pair whose fd number was reused in the same batch is stale. */
static uint32_t generation[MAX_FD];
static int ep, socks, peers;

static uint64_t cookie(int fd) {
    uint64_t c = 0;
    socklen_t len = sizeof c;
    getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &len);
    return c;
}

static void close_pair(int fd) {
    int pair[2] = {fd, peer_of[fd]};
    for (int k = 0; k < 2; k++) {
        bpf_map_delete_elem(peers, &cookie_of[pair[k]]);
        peer_of[pair[k]] = 0; /* a later event of this batch for it is stale */
        close(pair[k]);       /* leaves the sockhash by itself */
    }
}

/* Splices a new client connection to a backend connection, or closes it. */
static void pair(int cfd, struct sockaddr_in *backend) {
    int bfd = socket(AF_INET, SOCK_STREAM, 0);
    if (bfd < 0 || bfd >= MAX_FD || cfd >= MAX_FD ||
        connect(bfd, (struct sockaddr *)backend, sizeof *backend) != 0) {
        perror("backend");
        close(cfd);
        if (bfd >= 0)
            close(bfd);
        return;
    }
    uint64_t cc = cookie(cfd), bc = cookie(bfd), cv = cfd, bv = bfd;
    /* The backend socket joins the sockhash first and the client's last: until then
     * the client's bytes stay in its receive queue (drained below) instead of
     * meeting a peer that cannot be redirected to, which would drop them. */
    if (bpf_map_update_elem(socks, &bc, &bv, BPF_ANY) || bpf_map_update_elem(peers, &cc, &bc, BPF_ANY) ||
        bpf_map_update_elem(peers, &bc, &cc, BPF_ANY) || bpf_map_update_elem(socks, &cc, &cv, BPF_ANY)) {
        perror("sockhash");
        bpf_map_delete_elem(peers, &cc);
        bpf_map_delete_elem(peers, &bc);
        close(cfd);
        close(bfd);
        return;
    }
    peer_of[cfd] = bfd, peer_of[bfd] = cfd, cookie_of[cfd] = cc, cookie_of[bfd] = bc;
    /* What the client sent before its socket joined the sockhash waits here. (A
     * message split across that moment could reach the backend out of order: dnsperf
     * sends whole messages, so the benchmark does not meet it.) */
    char buf[65536];
    ssize_t n;
    while ((n = recv(cfd, buf, sizeof buf, MSG_DONTWAIT)) > 0)
        for (ssize_t off = 0, w; off < n; off += w)
            if ((w = send(bfd, buf + off, n - off, 0)) <= 0)
                break;
    for (int k = 0; k < 2; k++) {
        int fd = k ? bfd : cfd;
        struct epoll_event e = {.events = EPOLLRDHUP, .data.u64 = (uint64_t)++generation[fd] << 32 | fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    }
}

int main(int argc, char **argv) {
    struct sockaddr_in la, backends[8];
    if (argc < 2) {
        fprintf(stderr, "usage: %s BPF_OBJECT LISTEN_PORT BACKEND_PORT...\n", argv[0]);
        return 2;
    }
    int nb = floor_args(argc - 1, argv + 1, &la, backends), next = 0;
    struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
    if (!obj || bpf_object__load(obj)) {
        fprintf(stderr, "loading %s failed\n", argv[1]);
        return 1;
    }
    struct bpf_program *prog = bpf_object__find_program_by_name(obj, "splice");
    socks = bpf_object__find_map_fd_by_name(obj, "socks");
    peers = bpf_object__find_map_fd_by_name(obj, "peers");
    if (!prog || socks < 0 || peers < 0 ||
        bpf_prog_attach(bpf_program__fd(prog), socks, BPF_SK_SKB_VERDICT, 0)) {
        perror("attaching the verdict program");
        return 1;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ls < 0 || bind(ls, (struct sockaddr *)&la, sizeof la) || listen(ls, 1024)) {
        perror("listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = (uint64_t)ls}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = (int)(evs[i].data.u64 & 0xffffffff);
            uint32_t gen = evs[i].data.u64 >> 32;
            if (fd == ls) {
                int cfd = accept(ls, NULL, NULL);
                if (cfd >= 0)
                    pair(cfd, &backends[next++ % nb]);
            } else if (peer_of[fd] > 0 && gen == generation[fd]) {
                close_pair(fd);
            }
        }
    }
}
