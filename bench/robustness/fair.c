/* fair PORT MODE SECONDS [PAYLOAD]: ping-pong latency on connection B while
 * connection A streams PAYLOAD-byte frames (default 1) at an echo server.
 *
 *   MODE none   only B (the unloaded latency)
 *   MODE blast  A sends 1 MiB batches of length-prefixed frames as fast as the
 *               server takes them; a second thread drains A's echoes.
 *
 * B sends one 64-byte frame, waits for the whole echo, sleeps 200 us, repeats,
 * for SECONDS (at most 200,000 pings). Adapted from the adversarial review's
 * repro/fair.c: bounded (a 5 s receive timeout on every socket, so a server
 * that stops answering ends the run) and a machine-readable result line:
 *
 *   FAIR mode=M payload=P pings=N p50_us=.. p99_us=.. p999_us=.. max_us=..
 *        a_sent_mb=.. a_back_mb=.. a_back_mbps=.. status=ok|timeout
 *
 * Only 127.0.0.1. Exit status 0 on ok, 3 when B's echo timed out. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_PINGS 200000

static int port;
static volatile int stop;
static size_t payload = 1;
static long long drained, blasted; /* written by one thread each, read at the end */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int dial(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (connect(s, (void *)&a, sizeof a)) {
        perror("fair: connect");
        exit(1);
    }
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return s;
}

static void *drain(void *p) {
    int s = *(int *)p;
    static char buf[65536];
    ssize_t n;
    while (!stop && (n = recv(s, buf, sizeof buf, 0)) > 0) drained += n;
    return 0;
}

static void *blast(void *p) {
    int s = *(int *)p;
    size_t fl = 4 + payload, n = (1 << 20) / fl;
    if (n == 0) n = 1;
    char *b = malloc(n * fl);
    for (size_t i = 0; i < n; i++) {
        uint32_t l = (uint32_t)payload; /* little-endian host assumed (x86/arm64) */
        memcpy(b + i * fl, &l, 4);
        memset(b + i * fl + 4, 'a', payload);
    }
    while (!stop) {
        ssize_t w = send(s, b, n * fl, MSG_NOSIGNAL);
        if (w <= 0) break;
        blasted += w;
    }
    free(b);
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int rexact(int s, char *b, size_t n) {
    while (n) {
        ssize_t r = recv(s, b, n, 0);
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: fair PORT none|blast SECONDS [PAYLOAD]\n");
        return 2;
    }
    port = atoi(argv[1]);
    int blasting = !strcmp(argv[2], "blast");
    double secs = atof(argv[3]);
    if (secs <= 0 || secs > 60) secs = 3;
    if (argc > 4) payload = strtoul(argv[4], 0, 0);
    pthread_t tb, td;
    int a = -1;
    double t_blast = 0;
    if (blasting) {
        a = dial();
        pthread_create(&td, 0, drain, &a);
        pthread_create(&tb, 0, blast, &a);
        t_blast = now();
        usleep(300000);
    }
    int b = dial();
    char f[68] = {64, 0, 0, 0}, r[68];
    memset(f + 4, 'p', 64);
    static double lat[MAX_PINGS];
    int n = 0, timeout = 0;
    double end = now() + secs;
    long long back0 = drained;
    double t0 = now();
    while (now() < end && n < MAX_PINGS) {
        double t = now();
        if (send(b, f, sizeof f, MSG_NOSIGNAL) != (ssize_t)sizeof f || rexact(b, r, sizeof r)) {
            timeout = 1;
            break;
        }
        lat[n++] = (now() - t) * 1e6;
        usleep(200);
    }
    double window = now() - t0;
    long long back = drained - back0;
    stop = 1;
    if (blasting) {
        shutdown(a, SHUT_RDWR);
        pthread_join(tb, 0);
        pthread_join(td, 0);
    }
    if (n == 0) lat[n++] = 0;
    qsort(lat, (size_t)n, sizeof lat[0], cmp);
    (void)t_blast;
    printf("FAIR mode=%s payload=%zu pings=%d p50_us=%.0f p99_us=%.0f p999_us=%.0f max_us=%.0f "
           "a_sent_mb=%.1f a_back_mb=%.1f a_back_mbps=%.1f status=%s\n",
           argv[2], payload, n, lat[n / 2], lat[n * 99 / 100], lat[n * 999 / 1000], lat[n - 1],
           blasted / 1e6, drained / 1e6, window > 0 ? back / 1e6 / window : 0.0, timeout ? "timeout" : "ok");
    return timeout ? 3 : 0;
}
