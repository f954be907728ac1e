/*
 * The TCP floor: what splicing bytes between DNS clients and backends costs a
 * separate process here, for the "floor" row of bench/harness.py (next to
 * floor-relay.c, its UDP twin, on the same port). One thread, one epoll set
 * (level-triggered); each client connection gets a backend connection of its own
 * (the backends taken in turn), and whatever one side sends is written to the other
 * with one read and one write, as nginx's stream proxy does. No framing, no IDs, no
 * pipelining across clients, no timeouts, no half-close: not a usable proxy. If a
 * write would block, the rest is kept and reading that side pauses until the other
 * can take it.
 *
 * usage: floor-tcp-relay LISTEN_PORT BACKEND_PORT...   (all on 127.0.0.1, at most 8)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "floor-args.h"

#define MAX_FD 65536
#define BUF 65536

/* One direction of a spliced pair: bytes read from `fd` wait in `buf` for `peer`. */
struct side {
    int peer;
    size_t off, len;
    char *buf;
};

static struct side sides[MAX_FD];
static int ep;

static void watch(int fd, unsigned events, int op) {
    struct epoll_event e = {.events = events, .data.fd = fd};
    epoll_ctl(ep, op, fd, &e);
}

/* What `fd` waits for: to read while nothing it sent waits for the peer, to write
 * while the peer's bytes wait for it. */
static void rearm(int fd) {
    int peer = sides[fd].peer;
    watch(fd, (sides[fd].len ? 0 : EPOLLIN) | (sides[peer].len ? EPOLLOUT : 0), EPOLL_CTL_MOD);
}

static void close_pair(int fd) {
    int peer = sides[fd].peer;
    for (int k = 0; k < 2; k++) {
        int f = k ? peer : fd;
        free(sides[f].buf);
        memset(&sides[f], 0, sizeof sides[f]);
        close(f);
    }
}

/* Writes what `from` holds to its peer; what the peer cannot take yet stays. The
 * interest of both is set anew when that happens or when `was_blocked` (epoll_ctl
 * only when the state changes, not per message). Returns -1 if the pair is dead. */
static int flush(int from, int was_blocked) {
    struct side *s = &sides[from];
    while (s->len > 0) {
        ssize_t n = send(s->peer, s->buf + s->off, s->len, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0)
            return -1;
        s->off += n;
        s->len -= n;
    }
    if (s->len == 0)
        s->off = 0;
    if (s->len > 0 || was_blocked) {
        rearm(from);
        rearm(s->peer);
    }
    return 0;
}

int main(int argc, char **argv) {
    struct sockaddr_in la, backends[8];
    int nb = floor_args(argc, argv, &la, backends), next = 0;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ls < 0 || bind(ls, (struct sockaddr *)&la, sizeof la) != 0 || listen(ls, 1024) != 0) {
        perror("socket/bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    watch(ls, EPOLLIN, EPOLL_CTL_ADD);
    struct epoll_event ev[64];
    for (;;) {
        int n = epoll_wait(ep, ev, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            if (fd == ls) {
                int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                if (c < 0)
                    continue;
                /* Non-blocking: a backend whose accept queue is full must not stall
                 * the other connections. What the client sends meanwhile waits in
                 * its buffer until the connect completes (EPOLLOUT). */
                int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
                struct sockaddr_in *to = &backends[next];
                next = (next + 1) % nb;
                char *cb = malloc(BUF), *bb = malloc(BUF);
                if (c >= MAX_FD || b < 0 || b >= MAX_FD || !cb || !bb ||
                    (connect(b, (struct sockaddr *)to, sizeof *to) != 0 && errno != EINPROGRESS)) {
                    close(c);
                    if (b >= 0)
                        close(b);
                    free(cb);
                    free(bb);
                    continue;
                }
                int fl = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &fl, sizeof fl);
                setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &fl, sizeof fl);
                sides[c] = (struct side){.peer = b, .buf = cb};
                sides[b] = (struct side){.peer = c, .buf = bb};
                watch(c, EPOLLIN, EPOLL_CTL_ADD);
                watch(b, EPOLLIN, EPOLL_CTL_ADD);
                continue;
            }
            if (!sides[fd].buf)
                continue; /* closed earlier in this batch */
            if (ev[i].events & EPOLLOUT) {
                /* The peer's leftovers can go now. */
                if (flush(sides[fd].peer, 1) < 0) {
                    close_pair(fd);
                    continue;
                }
            }
            if (ev[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                struct side *s = &sides[fd];
                if (s->len > 0) {
                    /* Still waiting for the peer; a hang-up ends the pair (epoll
                     * reports it even while reading is paused). */
                    if (ev[i].events & (EPOLLHUP | EPOLLERR))
                        close_pair(fd);
                    continue;
                }
                ssize_t r = recv(fd, s->buf, BUF, 0);
                if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                    continue;
                if (r <= 0) {
                    /* EOF or an error: both sides close, what was buffered for the
                     * peer is dropped (a floor for DNS clients that close only when
                     * done, not a general proxy). */
                    close_pair(fd);
                    continue;
                }
                s->len = r;
                if (flush(fd, 0) < 0)
                    close_pair(fd);
            }
        }
    }
}
