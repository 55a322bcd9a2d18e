/*
 * Raw socket floor for page transfer, and the receiver both sides of the measurement share.
 *
 *   sock_floor drain tcp            listen on 127.0.0.1 (ephemeral port); prints "port <p>"
 *   sock_floor drain unix <path>    listen on <path>; prints "port 0"
 *       Then, for every connection: read() into a 4 MiB buffer and discard until EOF, close, print
 *       "got <bytes>". Runs until killed.
 *   sock_floor send tcp <port> <bytes> <bufsize> <writesize>
 *   sock_floor send unix <path> <bytes> <bufsize> <writesize>
 *       Connects, then write()s <bytes> in calls of <writesize> bytes, walking round one <bufsize>
 *       buffer of non-zero bytes (made resident before timing), shut(SHUT_WR)s and waits for the
 *       receiver to close (so the receiver's work is inside the time). Prints "sent <bytes> seconds <s>".
 *       A buffer larger than the last-level cache streams from memory as guest RAM does; vmmpy's
 *       send_memory writes at most 4 MiB per call (rust/transfer.rs WRITE_MAX).
 *
 * Socket options are those of vmmpy's migration sockets (rust/transfer.rs tune_socket), on both
 * ends: TCP_NODELAY for TCP; 4 MiB SO_SNDBUF and SO_RCVBUF for Unix sockets.
 * Build: cc -O2 -o sock_floor sock_floor.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define UNIX_BUF (4 << 20)
#define DRAIN_BUF (4 << 20)

static void die(const char *what) { perror(what); exit(1); }

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void tune(int fd, int is_tcp)
{
    int v;
    if (is_tcp) {
        v = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, sizeof v) < 0) die("TCP_NODELAY");
    } else {
        v = UNIX_BUF;
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) < 0) die("SO_SNDBUF");
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v) < 0) die("SO_RCVBUF");
    }
}

static _Noreturn void drain(int is_tcp, const char *path)
{
    int l;
    if (is_tcp) {
        l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = 0 };
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind tcp");
        socklen_t len = sizeof a;
        if (getsockname(l, (struct sockaddr *)&a, &len) < 0) die("getsockname");
        if (listen(l, 4) < 0) die("listen");
        printf("port %d\n", ntohs(a.sin_port));
    } else {
        l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        strncpy(a.sun_path, path, sizeof a.sun_path - 1);
        unlink(path);
        if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind unix");
        if (listen(l, 4) < 0) die("listen");
        printf("port 0\n");
    }
    fflush(stdout);
    char *buf = malloc(DRAIN_BUF);
    if (!buf) die("malloc");
    memset(buf, 0, DRAIN_BUF);
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) die("accept");
        tune(c, is_tcp);
        unsigned long long got = 0;
        for (;;) {
            ssize_t n = read(c, buf, DRAIN_BUF);
            if (n < 0) die("read");
            if (n == 0) break;
            got += (unsigned long long)n;
        }
        close(c);
        printf("got %llu\n", got);
        fflush(stdout);
    }
}

static int connect_to(int is_tcp, const char *where)
{
    int s;
    if (is_tcp) {
        s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(where)) };
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect tcp");
    } else {
        s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        strncpy(a.sun_path, where, sizeof a.sun_path - 1);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect unix");
    }
    tune(s, is_tcp);
    return s;
}

static int sender(int is_tcp, const char *where, unsigned long long bytes, size_t bufsize, size_t writesize)
{
    if (writesize == 0 || writesize > bufsize) writesize = bufsize;
    bufsize -= bufsize % writesize;
    char *buf = malloc(bufsize);
    if (!buf) die("malloc");
    memset(buf, 0x5a, bufsize); /* resident and non-zero before the clock starts */
    int s = connect_to(is_tcp, where);
    double t0 = now();
    unsigned long long left = bytes;
    size_t at = 0; /* where in the buffer the next call starts */
    while (left > 0) {
        size_t piece = left < writesize ? (size_t)left : writesize;
        if (at + piece > bufsize) at = 0;
        size_t off = 0;
        while (off < piece) {
            ssize_t n = write(s, buf + at + off, piece - off);
            if (n <= 0) die("write");
            off += (size_t)n;
        }
        at += piece;
        left -= piece;
    }
    if (shutdown(s, SHUT_WR) < 0) die("shutdown");
    char tmp[64];
    while (read(s, tmp, sizeof tmp) > 0) {
    }
    double t1 = now();
    close(s);
    printf("sent %llu seconds %.6f\n", bytes, t1 - t0);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "drain") == 0) {
        int is_tcp = strcmp(argv[2], "tcp") == 0;
        if (!is_tcp && argc < 4) goto usage;
        drain(is_tcp, is_tcp ? NULL : argv[3]);
    }
    if (argc >= 7 && strcmp(argv[1], "send") == 0)
        return sender(strcmp(argv[2], "tcp") == 0, argv[3], strtoull(argv[4], NULL, 0), (size_t)strtoull(argv[5], NULL, 0),
                      (size_t)strtoull(argv[6], NULL, 0));
usage:
    fprintf(stderr, "usage: %s drain tcp | drain unix <path> | send tcp|unix <port|path> <bytes> <bufsize> <writesize>\n", argv[0]);
    return 2;
}
