/*
 * The floor: the least a separate UDP proxy process can cost per query on a machine.
 * One thread, one client socket, one upstream socket, poll(), recvfrom/sendto, no
 * parsing; queries alternate between the backends, as the proxies' queries spread
 * over the same backends. Each query gets an ID of the relay's own (a counter) and
 * its answer goes back to the client that sent it with the client's ID, so no two
 * clients' answers are crossed while fewer than 65536 queries are in flight: every
 * query is answered, as through a real proxy. (The first version kept the client's
 * ID. dnsperf's 8 clients reuse each other's IDs, so 1-10 % of the answers went to
 * the wrong client and were lost, and that relay measured 20-30 % cheaper per
 * answered query than this one, sleeping 0.8 instead of 1.3 times per query: a
 * floor no correct proxy could reach.) Not a usable proxy: no checks,
 * no timeouts, no health. bench/harness.py runs it as the "floor" row so the CPU per
 * query of dnslb and dnsdist can be read against what forwarding alone costs here.
 *
 * usage: floor-relay LISTEN_PORT BACKEND_PORT...   (all on 127.0.0.1, at most 8)
 */
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#include "floor-args.h"

int main(int argc, char **argv) {
    struct sockaddr_in la, backends[8];
    int nb = floor_args(argc, argv, &la, backends), next = 0;
    int ls = socket(AF_INET, SOCK_DGRAM, 0), us = socket(AF_INET, SOCK_DGRAM, 0);
    if (ls < 0 || us < 0 || bind(ls, (struct sockaddr *)&la, sizeof la) != 0) {
        perror("socket/bind");
        return 1;
    }
    /* Indexed by the relay's ID: who asked, and with which ID. */
    static struct sockaddr_in clients[65536];
    static unsigned char client_id[65536][2];
    unsigned short id = 0;
    static unsigned char buf[65536];
    struct pollfd p[2] = {{ls, POLLIN, 0}, {us, POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0)
            continue;
        if (p[0].revents) {
            struct sockaddr_in c;
            socklen_t cl = sizeof c;
            ssize_t n = recvfrom(ls, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&c, &cl);
            if (n >= 12) {
                id++;
                clients[id] = c;
                client_id[id][0] = buf[0];
                client_id[id][1] = buf[1];
                buf[0] = id >> 8;
                buf[1] = id & 0xff;
                struct sockaddr_in *b = &backends[next];
                next = (next + 1) % nb;
                sendto(us, buf, n, 0, (struct sockaddr *)b, sizeof *b);
            }
        }
        if (p[1].revents) {
            ssize_t n = recv(us, buf, sizeof buf, MSG_DONTWAIT);
            if (n >= 12) {
                unsigned short k = buf[0] << 8 | buf[1];
                buf[0] = client_id[k][0];
                buf[1] = client_id[k][1];
                sendto(ls, buf, n, 0, (struct sockaddr *)&clients[k], sizeof clients[k]);
            }
        }
    }
}
