/* burn_echo.c — the benchmark's CPU-bound tcpframe host: on_message does
 * about US microseconds of CPU work on the payload (a fixed number of hash
 * rounds, calibrated once at start-up on this machine), then echoes the frame.
 * With several loop threads (-t N), the connections' work runs on N cores.
 *
 *   burn_echo [-t THREADS] [-u US] [-b auto|poll|epoll] [ADDRESS]
 *             (defaults: 1 thread, 20 us, auto, 127.0.0.1:0)
 *
 * The work is a fixed amount (not a clock to wait for), so a preempted or
 * slower thread does the same work per frame. Prints "burn: N rounds = US us"
 * and "listening on port N" (flushed); SIGINT/SIGTERM stop it.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { (void)sig; g_stop = 1; }

static uint64_t g_rounds = 1;     /* hash rounds per frame */
static volatile uint64_t g_sink; /* keeps the work observable */

/* `rounds` rounds of an FNV-style hash over the payload: the per-frame work. */
static uint64_t burn(const uint8_t *d, size_t n, uint64_t rounds) {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t r = 0; r < rounds; r++) {
        h ^= n ? d[r % n] : (uint8_t)r;
        h *= 1099511628211ull;
        h ^= h >> 29;
    }
    return h;
}

static double thread_cpu_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

/* The payload length of the calibration, read at run time: a constant
 * would let the compiler turn `r % n` into a mask, and the calibration would
 * run faster than the work per frame does. */
static volatile size_t g_cal_len = 64;

/* Rounds per microsecond: the best of several timed runs (least disturbed). */
static double calibrate(void) {
    uint8_t d[64];
    memset(d, 0x5a, sizeof d);
    double best = 0;
    for (int i = 0; i < 7; i++) {
        const uint64_t n = 2000000;
        double t0 = thread_cpu_us();
        g_sink += burn(d, g_cal_len, n);
        double dt = thread_cpu_us() - t0;
        if (dt > 0 && n / dt > best)
            best = n / dt;
    }
    return best;
}

struct app {
    tf_server *srv;
};

static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    struct app *a = ud;
    g_sink += burn(data, len, g_rounds);
    int32_t rc = tf_send(a->srv, conn, data, len);
    if (rc == TF_ERR_FULL)
        (void)tf_conn_close(a->srv, conn);
}

int main(int argc, char **argv) {
    uint32_t threads = 1;
    double us = 20;
    int32_t backend = TF_BACKEND_AUTO;
    int opt;
    while ((opt = getopt(argc, argv, "t:u:b:h")) != -1) {
        switch (opt) {
        case 't': threads = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'u': us = atof(optarg); break;
        case 'b':
            backend = strcmp(optarg, "poll") == 0 ? TF_BACKEND_POLL
                    : strcmp(optarg, "epoll") == 0 ? TF_BACKEND_EPOLL : TF_BACKEND_AUTO;
            break;
        default:
            fprintf(stderr, "usage: burn_echo [-t THREADS] [-u US] [-b auto|poll|epoll] [ADDRESS]\n");
            return opt == 'h' ? 0 : 2;
        }
    }
    const char *address = optind < argc ? argv[optind] : "127.0.0.1:0";
    double per_us = calibrate();
    g_rounds = (uint64_t)(per_us * us + 0.5);
    if (g_rounds == 0)
        g_rounds = 1;
    printf("burn: %llu rounds = %.1f us (%.0f rounds/us), %u loop thread(s)\n",
           (unsigned long long)g_rounds, us, per_us, threads);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    tf_config *cfg = tf_config_new();
    if (cfg == NULL || tf_config_set_address(cfg, address) != TF_OK ||
        tf_config_set_threads(cfg, threads) != TF_OK || tf_config_set_backend(cfg, backend) != TF_OK ||
        tf_config_set_max_connections(cfg, 100000) != TF_OK) {
        fprintf(stderr, "burn_echo: configuration: %s\n", tf_last_error());
        return 2;
    }
    struct app app = {NULL};
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = &app;
    cb.on_message = on_message;
    int32_t rc = tf_server_start(cfg, &cb, &app.srv);
    tf_config_free(cfg);
    if (rc != TF_OK) {
        fprintf(stderr, "burn_echo: start on %s: %s\n", address, tf_last_error());
        return 1;
    }
    printf("listening on port %u\n", (unsigned)tf_server_port(app.srv));
    fflush(stdout);
    while (!g_stop) {
        struct timespec nap = {0, 50 * 1000 * 1000};
        nanosleep(&nap, NULL); /* SIGINT interrupts it */
    }
    tf_server_stop(app.srv, 1000);
    tf_server_free(app.srv);
    return 0;
}
