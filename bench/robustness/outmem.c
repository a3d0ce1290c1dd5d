/* outmem MODE N FRAME [MAX_QUEUED] [DEADLINE_S]: memory of queued output.
 *
 * Starts a tcpframe server (max_queued_output MAX_QUEUED, default 16 MiB) and a
 * child process with N peers (receive buffer 16 KiB) that never read (MODE
 * never) or read 16 KiB every 5 ms each (MODE slow). A host thread (not the
 * loop thread) keeps every connection's queue full: tf_send of FRAME-byte
 * frames until TF_ERR_FULL, over and over (1 ms apart). The server process's
 * VmRSS is sampled every 50 ms (growth = peak - base; end_growth = the last
 * sample - base); the run ends 1 s after every connection was
 * found full on one pass (never mode), after 5 s (slow mode), or at DEADLINE_S
 * (default 30). Prints one line:
 *
 *   OUTMEM mode=M n=N frame=F maxq_mib=Q base_mib=.. peak_mib=.. growth_mib=..
 *          ratio=growth/(N*Q) end_growth_mib=.. queued_mib=.. fill_s=.. status=full|deadline
 *
 * queued_mib: bytes (prefixes included) that tf_send accepted; the kernel's
 * socket buffers hold part of them. Adapted from the adversarial review's
 * repro/outmem.c and outmem_never.c (which sample for a fixed 10 s). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

#define MAXN 256

static tf_server *srv;
static atomic_int quit, nconn, filled;
static tf_conn_id ids[MAXN];
static int N;
static size_t FR;
static atomic_llong queued;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int on_connect(void *u, tf_conn_id c, const char *peer) {
    (void)u;
    (void)peer;
    int i = atomic_load(&nconn);
    if (i < MAXN) {
        ids[i] = c;
        atomic_store(&nconn, i + 1); /* the loop thread is the only writer */
    }
    return 0;
}

static void on_message(void *u, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)u;
    (void)c;
    (void)d;
    (void)n;
}

static long rss_mib_x1024(void) { /* KiB */
    FILE *f = fopen("/proc/self/status", "r");
    char l[256];
    long v = 0;
    while (fgets(l, sizeof l, f))
        if (!strncmp(l, "VmRSS:", 6)) v = atol(l + 6);
    fclose(f);
    return v;
}

static void *producer(void *p) {
    (void)p;
    uint8_t *b = calloc(1, FR);
    while (!atomic_load(&quit)) {
        int all_full = 1;
        int n = atomic_load(&nconn);
        for (int i = 0; i < n; i++) {
            int32_t rc;
            int sent = 0;
            while ((rc = tf_send(srv, ids[i], b, FR)) == TF_OK) {
                atomic_fetch_add(&queued, (long long)(FR + 4));
                sent = 1;
                if (atomic_load(&quit)) break;
            }
            if (sent || rc != TF_ERR_FULL) all_full = 0;
        }
        if (all_full && n == N) atomic_store(&filled, 1);
        usleep(1000);
    }
    free(b);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: outmem never|slow N FRAME [MAX_QUEUED] [DEADLINE_S]\n");
        return 2;
    }
    int slow = !strcmp(argv[1], "slow");
    N = atoi(argv[2]);
    FR = strtoul(argv[3], 0, 0);
    unsigned long long maxq = argc > 4 ? strtoull(argv[4], 0, 0) : 16ull << 20;
    double deadline_s = argc > 5 ? atof(argv[5]) : 30;
    if (N < 1 || N > MAXN || FR < 1) return 2;

    tf_config *cfg = tf_config_new();
    tf_config_set_address(cfg, "127.0.0.1:0");
    tf_config_set_max_queued_output(cfg, maxq);
    tf_callbacks cb = {0, on_connect, on_message, 0};
    if (tf_server_start(cfg, &cb, &srv) != TF_OK) {
        fprintf(stderr, "outmem: start: %s\n", tf_last_error());
        return 1;
    }
    tf_config_free(cfg);
    int port = tf_server_port(srv);

    int pp[2];
    if (pipe(pp)) return 1;
    pid_t kid = fork();
    if (kid == 0) { /* the peers: stop when the parent closes the pipe, or after deadline + 10 s */
        close(pp[1]);
        int s[MAXN];
        for (int i = 0; i < N; i++) {
            s[i] = socket(AF_INET, SOCK_STREAM, 0);
            int rb = 16384;
            setsockopt(s[i], SOL_SOCKET, SO_RCVBUF, &rb, sizeof rb);
            struct sockaddr_in a = {0};
            a.sin_family = AF_INET;
            a.sin_port = htons(port);
            a.sin_addr.s_addr = htonl(0x7f000001);
            if (connect(s[i], (void *)&a, sizeof a)) _exit(1);
        }
        static char buf[16384];
        double end = now() + deadline_s + 10;
        struct pollfd pf = {pp[0], POLLIN, 0};
        while (now() < end && poll(&pf, 1, 5) == 0)
            if (slow)
                for (int i = 0; i < N; i++) (void)!recv(s[i], buf, sizeof buf, MSG_DONTWAIT);
        _exit(0);
    }
    close(pp[0]);
    double t0 = now();
    while (atomic_load(&nconn) < N && now() - t0 < 5) usleep(10000);
    usleep(300000);
    long base = rss_mib_x1024();
    pthread_t t;
    double tstart = now(), tfull = 0;
    pthread_create(&t, 0, producer, 0);
    long peak = base;
    for (;;) {
        usleep(50000);
        long r = rss_mib_x1024();
        if (r > peak) peak = r;
        double el = now() - tstart;
        if (!slow && tfull == 0 && atomic_load(&filled)) tfull = el;
        if (!slow && tfull > 0 && el > tfull + 1) break;
        if (slow && el > 5) break;
        if (el > deadline_s) break;
    }
    long last = rss_mib_x1024();
    atomic_store(&quit, 1);
    pthread_join(t, 0);
    close(pp[1]);
    waitpid(kid, 0, 0);
    double total = (double)N * (double)maxq / 1048576.0;
    double growth = (peak - base) / 1024.0;
    printf("OUTMEM mode=%s n=%d frame=%zu maxq_mib=%.0f base_mib=%.1f peak_mib=%.1f growth_mib=%.1f ratio=%.2f "
           "end_growth_mib=%.1f queued_mib=%.1f fill_s=%.1f status=%s\n",
           slow ? "slow" : "never", N, FR, maxq / 1048576.0, base / 1024.0, peak / 1024.0, growth,
           growth / total, (last - base) / 1024.0, atomic_load(&queued) / 1048576.0, tfull, slow ? "timed" : (tfull > 0 ? "full" : "deadline"));
    fflush(stdout);
    tf_server_stop(srv, 0);
    tf_server_free(srv);
    return 0;
}
