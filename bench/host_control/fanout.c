/* fanout: what tf_send_many saves over one tf_send per connection.
 *
 *   fanout cpu [-n CONNS] [-r ROUNDS] [-s BYTES] [-b poll|epoll]
 *       CPU of the calling thread (CLOCK_THREAD_CPUTIME_ID, the thread's own
 *       getrusage clock in ns) for one frame to CONNS connections: CONNS
 *       tf_send calls vs one tf_send_many, from a host thread (the lock path)
 *       and from inside on_message (the loop thread's path). ROUNDS of each,
 *       interleaved; every round waits until the loop has written the previous
 *       one, so both variants meet the same idle loop. A child process holds
 *       the CONNS peers and reads everything.
 *   fanout mem [-n CONNS] [-s BYTES] [-m many|each]
 *       VmRSS growth of this process when one BYTES frame goes to CONNS peers
 *       that never read (SO_RCVBUF 4096), max queued output 2*BYTES+64 KiB:
 *       with one tf_send_many (the payload held once) or with CONNS tf_send
 *       calls (a copy each). Also MemAvailable's drop (kernel socket buffers
 *       included) for context.
 *
 * Output: "key=value" lines, read by run.sh. Only 127.0.0.1. */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t thread_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double process_cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

static long status_kb(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, strlen(field)) == 0)
            v = atol(line + strlen(field));
    if (f)
        fclose(f);
    return v;
}

static long meminfo_kb(const char *field) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, strlen(field)) == 0)
            v = atol(line + strlen(field));
    if (f)
        fclose(f);
    return v;
}

static void die(const char *what) {
    fprintf(stderr, "fanout: %s: %s (%s)\n", what, strerror(errno), tf_last_error());
    exit(1);
}

static void raise_nofile(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0) {
        r.rlim_cur = r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

/* ---- the peers, in a child process ---------------------------------------------------- */

static pid_t g_child = -1;

/* Forks a child that opens n connections to port (rcvbuf > 0: set first) and
 * reads everything (drain) or nothing; returns once all are connected. */
static void spawn_peers(uint16_t port, int n, int rcvbuf, int drain) {
    int ready[2];
    if (pipe(ready) != 0)
        die("pipe");
    g_child = fork();
    if (g_child < 0)
        die("fork");
    if (g_child > 0) {
        char c;
        close(ready[1]);
        if (read(ready[0], &c, 1) != 1)
            die("peers did not start");
        close(ready[0]);
        return;
    }
    close(ready[0]);
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlives the benchmark */
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            _exit(2);
        if (rcvbuf > 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons(port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
            _exit(3);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    if (write(ready[1], "r", 1) != 1)
        _exit(4);
    static char buf[1 << 16];
    struct epoll_event evs[256];
    for (;;) {
        if (!drain) {
            pause();
            continue;
        }
        int k = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < k; i++)
            if (read(evs[i].data.fd, buf, sizeof buf) <= 0)
                _exit(0);
    }
}

static void stop_peers(void) {
    if (g_child > 0) {
        kill(g_child, SIGKILL);
        waitpid(g_child, NULL, 0);
    }
    g_child = -1;
}

/* ---- the host ----------------------------------------------------------------------------- */

#define MAXC 100000

static struct {
    tf_server *srv;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    tf_conn_id ids[MAXC];
    int n;
    /* set by the main thread before a round inside on_message */
    const uint8_t *payload;
    size_t len;
    /* results of the rounds inside on_message */
    uint64_t cb_send_ns, cb_many_ns, cb_bad;
    int cb_rounds_done;
} G = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static tf_conn_id g_control; /* the main thread's own connection: triggers rounds */

static int on_connect(void *u, tf_conn_id c, const char *peer) {
    (void)u, (void)peer;
    pthread_mutex_lock(&G.mu);
    if (g_control == 0)
        g_control = c; /* the first one is ours */
    else if (G.n < MAXC)
        G.ids[G.n++] = c;
    pthread_cond_broadcast(&G.cv);
    pthread_mutex_unlock(&G.mu);
    return 0;
}

/* One round on the loop thread: 'S' = n tf_send calls, 'M' = one tf_send_many. */
static void on_message(void *u, tf_conn_id c, const uint8_t *d, size_t len) {
    (void)u, (void)c;
    if (len != 1)
        return;
    uint64_t t0 = thread_ns(), bad = 0;
    if (d[0] == 'S') {
        for (int i = 0; i < G.n; i++)
            bad += tf_send(G.srv, G.ids[i], G.payload, G.len) != TF_OK;
    } else {
        size_t q = 0;
        bad += tf_send_many(G.srv, G.ids, (size_t)G.n, G.payload, G.len, &q) != TF_OK || q != (size_t)G.n;
    }
    uint64_t dt = thread_ns() - t0;
    pthread_mutex_lock(&G.mu);
    if (d[0] == 'S')
        G.cb_send_ns += dt;
    else
        G.cb_many_ns += dt;
    G.cb_bad += bad;
    G.cb_rounds_done++;
    pthread_cond_broadcast(&G.cv);
    pthread_mutex_unlock(&G.mu);
}

static tf_server *start(uint64_t max_queued, int32_t backend) {
    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, on_connect, on_message, NULL};
    if (!cfg || tf_config_set_address(cfg, "127.0.0.1:0") != TF_OK ||
        tf_config_set_max_connections(cfg, MAXC) != TF_OK ||
        tf_config_set_max_queued_output(cfg, max_queued) != TF_OK ||
        tf_config_set_backend(cfg, backend) != TF_OK || tf_server_start(cfg, &cb, &G.srv) != TF_OK)
        die("start");
    tf_config_free(cfg);
    return G.srv;
}

static int connect_control(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
        die("connect");
    return fd;
}

static void wait_conns(int n) {
    double end = now_s() + 30;
    pthread_mutex_lock(&G.mu);
    while (G.n < n && now_s() < end) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&G.cv, &G.mu, &ts);
    }
    int got = G.n;
    pthread_mutex_unlock(&G.mu);
    if (got < n) {
        fprintf(stderr, "fanout: only %d of %d connections\n", got, n);
        exit(1);
    }
}

/* Waits until the loop has written `frames` frames in all. */
static void wait_sent(uint64_t frames) {
    tf_stats st;
    double end = now_s() + 30;
    do {
        tf_server_stats(G.srv, &st);
        if (st.frames_sent >= frames)
            return;
        usleep(200);
    } while (now_s() < end);
    fprintf(stderr, "fanout: the loop wrote only %" PRIu64 " of %" PRIu64 " frames\n", st.frames_sent,
            frames);
    exit(1);
}

static int cmd_cpu(int n, int rounds, size_t size, int32_t backend) {
    uint8_t *payload = malloc(size ? size : 1);
    memset(payload, 'f', size);
    G.payload = payload;
    G.len = size;
    start(64u << 20, backend);
    uint16_t port = tf_server_port(G.srv);
    int ctl = connect_control(port);
    spawn_peers(port, n, 0, 1);
    wait_conns(n);
    uint64_t sent = 0, host_send_ns = 0, host_many_ns = 0, bad = 0;
    double cpu0 = process_cpu_s();
    /* warm-up: one of each, from both paths */
    for (int w = 0; w < 2; w++) {
        for (int i = 0; i < G.n; i++)
            bad += tf_send(G.srv, G.ids[i], payload, size) != TF_OK;
        sent += (uint64_t)n;
        wait_sent(sent);
    }
    /* from a host thread */
    for (int r = 0; r < rounds; r++) {
        for (int v = 0; v < 2; v++) {
            int many = (r + v) % 2; /* interleaved, each first half the time */
            uint64_t t0 = thread_ns();
            if (many) {
                size_t q = 0;
                bad += tf_send_many(G.srv, G.ids, (size_t)n, payload, size, &q) != TF_OK || q != (size_t)n;
            } else {
                for (int i = 0; i < n; i++)
                    bad += tf_send(G.srv, G.ids[i], payload, size) != TF_OK;
            }
            uint64_t dt = thread_ns() - t0;
            if (many)
                host_many_ns += dt;
            else
                host_send_ns += dt;
            sent += (uint64_t)n;
            wait_sent(sent);
        }
    }
    /* inside on_message (the loop thread) */
    for (int r = 0; r < rounds; r++) {
        for (int v = 0; v < 2; v++) {
            uint8_t which = (r + v) % 2 ? 'M' : 'S';
            uint8_t fr[5] = {1, 0, 0, 0, which};
            int before;
            pthread_mutex_lock(&G.mu);
            before = G.cb_rounds_done;
            pthread_mutex_unlock(&G.mu);
            if (write(ctl, fr, 5) != 5)
                die("write");
            pthread_mutex_lock(&G.mu);
            while (G.cb_rounds_done == before)
                pthread_cond_wait(&G.cv, &G.mu);
            pthread_mutex_unlock(&G.mu);
            sent += (uint64_t)n;
            wait_sent(sent);
        }
    }
    double cpu = process_cpu_s() - cpu0;
    bad += G.cb_bad;
    printf("conns=%d rounds=%d payload=%zu backend=%s\n", n, rounds, size,
           backend == TF_BACKEND_POLL ? "poll" : "epoll");
    printf("host_send_us_per_round=%.2f\n", (double)host_send_ns / rounds / 1e3);
    printf("host_many_us_per_round=%.2f\n", (double)host_many_ns / rounds / 1e3);
    printf("host_ratio=%.3f\n", (double)host_many_ns / (double)host_send_ns);
    printf("cb_send_us_per_round=%.2f\n", (double)G.cb_send_ns / rounds / 1e3);
    printf("cb_many_us_per_round=%.2f\n", (double)G.cb_many_ns / rounds / 1e3);
    printf("cb_ratio=%.3f\n", (double)G.cb_many_ns / (double)G.cb_send_ns);
    printf("process_cpu_s=%.3f frames_written=%" PRIu64 " refused=%" PRIu64 "\n", cpu, sent, bad);
    stop_peers();
    close(ctl);
    tf_server_stop(G.srv, 0);
    tf_server_free(G.srv);
    free(payload);
    return bad ? 1 : 0;
}

static int cmd_mem(int n, size_t size, int many) {
    uint8_t *payload = malloc(size);
    memset(payload, 'm', size); /* touched: counted before the baseline */
    start(2 * (uint64_t)size + (64u << 10), TF_BACKEND_AUTO);
    uint16_t port = tf_server_port(G.srv);
    int ctl = connect_control(port);
    spawn_peers(port, n, 4096, 0);
    wait_conns(n);
    sleep(1);
    long rss0 = status_kb("VmRSS:"), avail0 = meminfo_kb("MemAvailable:");
    size_t queued = 0;
    double t0 = now_s();
    uint64_t c0 = thread_ns();
    if (many) {
        if (tf_send_many(G.srv, G.ids, (size_t)n, payload, size, &queued) != TF_OK)
            die("tf_send_many");
    } else {
        for (int i = 0; i < n; i++)
            queued += tf_send(G.srv, G.ids[i], payload, size) == TF_OK;
    }
    double call_cpu_ms = (double)(thread_ns() - c0) / 1e6, call_ms = (now_s() - t0) * 1e3;
    long rss1 = status_kb("VmRSS:");
    sleep(2); /* the loop writes what the kernel takes */
    long rss2 = status_kb("VmRSS:"), hwm = status_kb("VmHWM:"), avail2 = meminfo_kb("MemAvailable:");
    tf_stats st;
    tf_server_stats(G.srv, &st);
    printf("mode=%s conns=%d payload=%zu queued=%zu\n", many ? "send_many" : "send_each", n, size, queued);
    printf("call_ms=%.1f call_cpu_ms=%.1f\n", call_ms, call_cpu_ms);
    printf("rss_before_kib=%ld rss_after_call_kib=%ld rss_after_2s_kib=%ld vmhwm_kib=%ld\n", rss0, rss1,
           rss2, hwm);
    printf("rss_growth_mib=%.1f\n", (double)(rss2 > rss1 ? rss2 - rss0 : rss1 - rss0) / 1024.0);
    printf("memavailable_drop_mib=%.1f bytes_written_to_kernel_mib=%.1f\n", (double)(avail0 - avail2) / 1024.0,
           (double)st.bytes_sent / 1048576.0);
    stop_peers();
    close(ctl);
    tf_server_stop(G.srv, 0);
    tf_server_free(G.srv);
    free(payload);
    return queued == (size_t)n ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2 || (strcmp(argv[1], "cpu") != 0 && strcmp(argv[1], "mem") != 0)) {
        fprintf(stderr, "usage: fanout cpu|mem [-n CONNS] [-r ROUNDS] [-s BYTES] [-b poll|epoll] [-m many|each]\n");
        return 2;
    }
    int n = 1000, rounds = 2000, many = 1, opt;
    size_t size = 64;
    int32_t backend = TF_BACKEND_EPOLL;
    int mem = strcmp(argv[1], "mem") == 0;
    if (mem)
        size = 1u << 20;
    optind = 2;
    while ((opt = getopt(argc, argv, "n:r:s:b:m:")) != -1) {
        switch (opt) {
        case 'n': n = atoi(optarg); break;
        case 'r': rounds = atoi(optarg); break;
        case 's': size = (size_t)strtoull(optarg, NULL, 10); break;
        case 'b': backend = strcmp(optarg, "poll") == 0 ? TF_BACKEND_POLL : TF_BACKEND_EPOLL; break;
        case 'm': many = strcmp(optarg, "each") != 0; break;
        default: return 2;
        }
    }
    if (n < 1 || n > MAXC || rounds < 1)
        return 2;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    int rc = mem ? cmd_mem(n, size, many) : cmd_cpu(n, rounds, size, backend);
    stop_peers();
    return rc;
}
