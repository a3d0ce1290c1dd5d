/* ud_echo: an echo host for bench/loadgen that, with -u, keeps per-connection
 * state the tcpframe way: on_connect allocates it and attaches it with
 * tf_conn_set_user_data, every on_message fetches it with tf_conn_user_data
 * and updates it, on_close frees it. Without -u the same counters live in one
 * global struct (what a host needs no lookup for). Everything else is
 * echo_server's: tf_send back, SIGINT/SIGTERM stop.
 *
 *   ud_echo [-u] [-b poll|epoll] ADDRESS
 *
 * Prints "listening on port N" (loadgen reads it) and at the end
 * "frames=N lookups=N". */
#define _GNU_SOURCE

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "tcpframe.h"

struct conn_state {
    uint64_t frames, bytes;
};

static tf_server *g_srv;
static int g_ud;
static struct conn_state g_all; /* without -u */
static uint64_t g_lookups;
static volatile sig_atomic_t g_signal;

static void on_signal(int sig) { g_signal = sig; }

static int on_connect(void *u, tf_conn_id c, const char *peer) {
    (void)u, (void)peer;
    if (g_ud) {
        struct conn_state *s = calloc(1, sizeof *s);
        if (s == NULL || tf_conn_set_user_data(g_srv, c, s) != TF_OK) {
            free(s);
            return 1;
        }
    }
    return 0;
}

static void on_message(void *u, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)u;
    struct conn_state *s = &g_all;
    if (g_ud) {
        s = tf_conn_user_data(g_srv, c);
        g_lookups++;
    }
    s->frames++;
    s->bytes += n;
    int32_t rc = tf_send(g_srv, c, d, n);
    if (rc == TF_ERR_FULL)
        (void)tf_conn_close(g_srv, c);
}

static void on_close(void *u, tf_conn_id c, int32_t reason) {
    (void)u, (void)reason;
    if (g_ud) {
        struct conn_state *s = tf_conn_user_data(g_srv, c);
        g_all.frames += s ? s->frames : 0;
        free(s);
    }
}

int main(int argc, char **argv) {
    int32_t backend = TF_BACKEND_EPOLL;
    int opt;
    while ((opt = getopt(argc, argv, "ub:")) != -1) {
        if (opt == 'u')
            g_ud = 1;
        else if (opt == 'b')
            backend = strcmp(optarg, "poll") == 0 ? TF_BACKEND_POLL : TF_BACKEND_EPOLL;
        else
            return 2;
    }
    const char *address = optind < argc ? argv[optind] : "127.0.0.1:0";
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0) {
        r.rlim_cur = r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
    struct sigaction sa;
    sigset_t block, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, &old); /* the loop thread inherits it */
    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, on_connect, on_message, on_close};
    if (!cfg || tf_config_set_address(cfg, address) != TF_OK ||
        tf_config_set_max_connections(cfg, 20000) != TF_OK ||
        tf_config_set_backend(cfg, backend) != TF_OK || tf_server_start(cfg, &cb, &g_srv) != TF_OK) {
        fprintf(stderr, "ud_echo: %s\n", tf_last_error());
        return 1;
    }
    tf_config_free(cfg);
    printf("listening on port %u\n", (unsigned)tf_server_port(g_srv));
    fflush(stdout);
    while (!g_signal)
        sigsuspend(&old);
    tf_server_stop(g_srv, 1000);
    printf("frames=%" PRIu64 " lookups=%" PRIu64 "\n", g_all.frames, g_lookups);
    tf_server_free(g_srv);
    return 0;
}
