/*
 * The floor: the least a separate UDP proxy process can cost per query on a machine.
 * One thread, one client socket, one upstream socket, poll(), recvfrom/sendto, no
 * parsing, no ID rewriting, one backend. Not a usable proxy (two clients using the
 * same ID at once get crossed answers); bench/harness.py runs it as the "floor" row
 * so the CPU per query of dnslb and dnsdist can be read against what forwarding
 * alone costs here.
 *
 * usage: floor-relay LISTEN_PORT BACKEND_PORT   (both on 127.0.0.1)
 */
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT\n", argv[0]);
        return 2;
    }
    int ls = socket(AF_INET, SOCK_DGRAM, 0), us = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &la.sin_addr);
    if (ls < 0 || us < 0 || bind(ls, (struct sockaddr *)&la, sizeof la) != 0) {
        perror("socket/bind");
        return 1;
    }
    struct sockaddr_in backend = la;
    backend.sin_port = htons(atoi(argv[2]));
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
                sendto(us, buf, n, 0, (struct sockaddr *)&backend, sizeof backend);
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
