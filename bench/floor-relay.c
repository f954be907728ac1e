/*
 * The floor: the least a separate UDP proxy process can cost per query on a machine.
 * One thread, one client socket, one upstream socket, poll(), recvfrom/sendto, no
 * parsing, no ID rewriting; queries alternate between the backends, as the proxies'
 * queries spread over the same backends. Not a usable proxy (two clients using the
 * same ID at once get crossed answers); bench/harness.py runs it as the "floor" row
 * so the CPU per query of dnslb and dnsdist can be read against what forwarding
 * alone costs here.
 *
 * usage: floor-relay LISTEN_PORT BACKEND_PORT...   (all on 127.0.0.1, at most 8)
 */
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc < 3 || argc > 10) {
        fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT...\n", argv[0]);
        return 2;
    }
    int ls = socket(AF_INET, SOCK_DGRAM, 0), us = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &la.sin_addr);
    if (ls < 0 || us < 0 || bind(ls, (struct sockaddr *)&la, sizeof la) != 0) {
        perror("socket/bind");
        return 1;
    }
    struct sockaddr_in backends[8];
    int nb = argc - 2, next = 0;
    for (int i = 0; i < nb; i++) {
        backends[i] = la;
        backends[i].sin_port = htons(atoi(argv[i + 2]));
    }
    static struct sockaddr_in clients[65536];
    static char buf[65536];
    struct pollfd p[2] = {{ls, POLLIN, 0}, {us, POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0)
            continue;
        if (p[0].revents) {
            struct sockaddr_in c;
            socklen_t cl = sizeof c;
            ssize_t n = recvfrom(ls, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&c, &cl);
            if (n >= 12) {
                clients[(unsigned char)buf[0] << 8 | (unsigned char)buf[1]] = c;
                struct sockaddr_in *b = &backends[next];
                next = (next + 1) % nb;
                sendto(us, buf, n, 0, (struct sockaddr *)b, sizeof *b);
            }
        }
        if (p[1].revents) {
            ssize_t n = recv(us, buf, sizeof buf, MSG_DONTWAIT);
            if (n >= 12) {
                struct sockaddr_in *c = &clients[(unsigned char)buf[0] << 8 | (unsigned char)buf[1]];
                sendto(ls, buf, n, 0, (struct sockaddr *)c, sizeof *c);
            }
        }
    }
}
