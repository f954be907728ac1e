/*
 * The command line both floor relays take (floor-relay.c, floor-tcp-relay.c):
 * LISTEN_PORT BACKEND_PORT..., all on 127.0.0.1, at most 8 backends.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>

/* Fills the listening address and the backends' (the usage and exit 2 if the command
 * line is wrong); returns the number of backends. */
static int floor_args(int argc, char **argv, struct sockaddr_in *la, struct sockaddr_in backends[8]) {
    if (argc < 3 || argc > 10) {
        fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT...\n", argv[0]);
        exit(2);
    }
    *la = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &la->sin_addr);
    int nb = argc - 2;
    for (int i = 0; i < nb; i++) {
        backends[i] = *la;
        backends[i].sin_port = htons(atoi(argv[i + 2]));
    }
    return nb;
}
