/*
 * UDP bulk sender and receiver for the virtio-net throughput bench: the host's end of a transfer
 * to or from the test guest, and both ends of the same transfer across a veth pair.
 *
 *   udp_floor send <ipv4> <port> <count>
 *       sendto()s <count> datagrams of 1472 bytes (one 1500-MTU frame each) from port <port> as
 *       fast as the socket takes them. Prints "sent <count> seconds <s>".
 *   udp_floor recv <port> <count> <idle_ms>
 *       Binds port <port> (8 MiB SO_RCVBUF), prints "ready", then receives until <count>
 *       datagrams came or none came for <idle_ms> (or none at all for 20 s). Prints
 *       "frames <n> bytes <b> seconds <s>": <s> from the first datagram to the last.
 *
 * Build: cc -O2 -o udp_floor udp_floor.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define PAYLOAD 1472
#define FIRST_WAIT_MS 20000

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int udp_socket(int port)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        perror("socket");
        exit(1);
    }
    int one = 1, buf = 8 << 20;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
        perror("bind");
        exit(1);
    }
    return s;
}

static int do_send(const char *ip, int port, long count)
{
    int s = udp_socket(port);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, ip, &to.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", ip);
        return 1;
    }
    static char buf[PAYLOAD];
    memset(buf, 0x5a, sizeof(buf));
    double t0 = now();
    for (long i = 0; i < count; i++) {
        if (sendto(s, buf, sizeof(buf), 0, (struct sockaddr *)&to, sizeof(to)) != PAYLOAD) {
            perror("sendto");
            return 1;
        }
    }
    printf("sent %ld seconds %.6f\n", count, now() - t0);
    return 0;
}

static int do_recv(int port, long count, int idle_ms)
{
    int s = udp_socket(port);
    printf("ready\n");
    fflush(stdout);
    static char buf[65536];
    long frames = 0, bytes = 0;
    double first = 0, last = 0;
    struct pollfd p = {.fd = s, .events = POLLIN};
    while (frames < count && poll(&p, 1, frames ? idle_ms : FIRST_WAIT_MS) > 0) {
        ssize_t n;
        while ((n = recv(s, buf, sizeof(buf), MSG_DONTWAIT)) >= 0) {
            last = now();
            if (!frames)
                first = last;
            frames++;
            bytes += n;
        }
    }
    printf("frames %ld bytes %ld seconds %.6f\n", frames, bytes, last - first);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "send"))
        return do_send(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "recv"))
        return do_recv(atoi(argv[2]), atol(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: udp_floor send IP PORT COUNT | recv PORT COUNT IDLE_MS\n");
    return 2;
}
