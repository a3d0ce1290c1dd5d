/* instance: one tcpframe server meant to run behind HAProxy (or any balancer
 * that speaks the PROXY protocol v2), several of them side by side. It echoes
 * every frame, logs each client's real address, and leaves the pool without
 * dropping anyone:
 *
 *   SIGUSR1  drain: the listener is closed at once (the balancer's health check
 *            marks it down, new connections go elsewhere, a new instance can
 *            bind the same address), open connections are served on; when the
 *            last one has closed the instance stops and exits 0. With -t, after
 *            that many seconds it stops anyway.
 *   SIGTERM  stop now (queued output gets a second), exit 0. SIGINT too.
 *
 *   instance [-l LOGFILE] [-p PIDFILE] [-c MAX_PER_IP] [-t DRAIN_SECS] ADDRESS
 *
 * ADDRESS is anything tf_config_set_address takes ("127.0.0.1:7001",
 * "unix:/run/tcpframe/1.sock"). The pid file is written once the server
 * listens and removed at exit, so "the pid file exists" means "listening or
 * draining". One log line per event (to LOGFILE, appended, or stdout):
 *
 *   listening address=127.0.0.1:7001 pid=4242
 *   connect id=7 peer=203.0.113.7:41000       <- the client, from the PROXY header
 *   close id=7 peer=203.0.113.7:41000 frames=42 reason=0
 *   draining active=3
 *   drained ms=412                            <- the last connection has closed
 *   stopped pid=4242 accepted=... rejected=... frames_received=... frames_sent=...
 *
 * A health check (HAProxy sends a PROXY v2 LOCAL header with it) is logged
 * with the balancer's own address, as the library reports it. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

#define STOP_DRAIN_MS 1000

static volatile sig_atomic_t g_drain, g_stop;
static int g_wake[2] = {-1, -1};
static FILE *g_log;

static void on_signal(int sig) {
    int saved = errno;
    if (sig == SIGUSR1)
        g_drain = 1;
    else
        g_stop = 1;
    ssize_t n = write(g_wake[1], "x", 1); /* non-blocking; a full pipe already wakes */
    (void)n;
    errno = saved;
}

/* One line per call, flushed: several threads log (the loop's callbacks and
 * main), and stdio locks the stream for each call. */
static void logf_line(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(g_log, "%s\n", line);
    fflush(g_log);
}

/* What the instance keeps per connection, as tf_conn_set_user_data. */
struct conn_state {
    char peer[128];
    uint64_t frames;
};

struct app {
    tf_server *srv; /* written by tf_server_start before any callback runs */
};

static int on_connect(void *user_data, tf_conn_id conn, const char *peer) {
    struct app *a = user_data;
    struct conn_state *cs = calloc(1, sizeof *cs);
    if (cs == NULL)
        return 1; /* refuse: no memory for it */
    snprintf(cs->peer, sizeof cs->peer, "%s", peer);
    (void)tf_conn_set_user_data(a->srv, conn, cs);
    logf_line("connect id=%" PRIu64 " peer=%s", conn, peer);
    return 0;
}

static void on_message(void *user_data, tf_conn_id conn, const uint8_t *data, size_t len) {
    struct app *a = user_data;
    struct conn_state *cs = tf_conn_user_data(a->srv, conn);
    if (cs)
        cs->frames++; /* a connection's callbacks all run on its one loop thread */
    int32_t rc = tf_send(a->srv, conn, data, len);
    if (rc == TF_ERR_FULL) {
        logf_line("full id=%" PRIu64 ": not reading its echoes, closed", conn);
        (void)tf_conn_close(a->srv, conn);
    }
}

static void on_close(void *user_data, tf_conn_id conn, int32_t reason) {
    struct app *a = user_data;
    struct conn_state *cs = tf_conn_user_data(a->srv, conn);
    logf_line("close id=%" PRIu64 " peer=%s frames=%" PRIu64 " reason=%d", conn, cs ? cs->peer : "?",
              cs ? cs->frames : 0, (int)reason);
    free(cs); /* readable until on_close returns; ours to free */
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int install_signals(void) {
    if (pipe(g_wake) != 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        int fl = fcntl(g_wake[i], F_GETFL);
        if (fl < 0 || fcntl(g_wake[i], F_SETFL, fl | O_NONBLOCK) != 0 ||
            fcntl(g_wake[i], F_SETFD, FD_CLOEXEC) != 0)
            return -1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0 ||
        sigaction(SIGUSR1, &sa, NULL) != 0)
        return -1;
    return 0;
}

/* Writes the pid file whole or not at all (a reader never sees half of it). */
static int write_pidfile(const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "%ld\n", (long)getpid());
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: instance [-l LOGFILE] [-p PIDFILE] [-c MAX_PER_IP] [-t DRAIN_SECS] ADDRESS\n");
}

int main(int argc, char **argv) {
    const char *logfile = NULL, *pidfile = NULL;
    unsigned long per_ip = 0, drain_secs = 0;
    int opt;
    while ((opt = getopt(argc, argv, "l:p:c:t:h")) != -1) {
        char *end = NULL;
        switch (opt) {
        case 'l':
            logfile = optarg;
            break;
        case 'p':
            pidfile = optarg;
            break;
        case 'c':
        case 't': {
            unsigned long v = strtoul(optarg, &end, 10);
            if (end == optarg || *end != '\0' || v > UINT32_MAX) {
                usage();
                return 2;
            }
            *(opt == 'c' ? &per_ip : &drain_secs) = v;
            break;
        }
        default:
            usage();
            return 2;
        }
    }
    if (optind != argc - 1) {
        usage();
        return 2;
    }
    const char *address = argv[optind];
    g_log = stdout;
    if (logfile && (g_log = fopen(logfile, "a")) == NULL) {
        perror("instance: log file");
        return 1;
    }
    if (install_signals() != 0) {
        perror("instance: signals");
        return 1;
    }

    /* What an instance behind a balancer is configured with. */
    tf_config *cfg = tf_config_new();
    if (cfg == NULL || tf_config_set_address(cfg, address) != TF_OK ||
        tf_config_set_proxy_protocol(cfg, TF_PROXY_V2) != TF_OK ||
        tf_config_set_max_connections_per_ip(cfg, (uint32_t)per_ip) != TF_OK) {
        fprintf(stderr, "instance: config: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 2;
    }
    struct app app = {NULL};
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = &app;
    cb.on_connect = on_connect;
    cb.on_message = on_message;
    cb.on_close = on_close;
    int32_t rc = tf_server_start(cfg, &cb, &app.srv);
    tf_config_free(cfg);
    if (rc != TF_OK) {
        fprintf(stderr, "instance: cannot listen on %s: %s\n", address, tf_last_error());
        logf_line("failed address=%s error=%s", address, tf_last_error());
        return 1;
    }
    if (pidfile && write_pidfile(pidfile) != 0) {
        perror("instance: pid file");
        tf_server_free(app.srv);
        return 1;
    }
    logf_line("listening address=%s pid=%ld", address, (long)getpid());

    double drain_started = -1;
    tf_stats st;
    while (!g_stop) {
        struct pollfd p = {.fd = g_wake[0], .events = POLLIN, .revents = 0};
        int n = poll(&p, 1, drain_started >= 0 ? 20 : -1);
        if (n > 0) {
            char buf[16];
            while (read(g_wake[0], buf, sizeof buf) > 0) {
            }
        }
        if (g_drain && drain_started < 0) {
            rc = tf_server_drain(app.srv); /* the listener is closed when this returns */
            if (rc != TF_OK)
                logf_line("drain failed: %d %s", (int)rc, tf_last_error());
            drain_started = now_ms();
            tf_server_stats(app.srv, &st);
            logf_line("draining active=%" PRIu64, st.connections_active);
        }
        if (drain_started >= 0) {
            tf_server_stats(app.srv, &st);
            if (st.connections_active == 0) {
                logf_line("drained ms=%.0f", now_ms() - drain_started);
                break;
            }
            if (drain_secs > 0 && now_ms() - drain_started >= (double)drain_secs * 1000) {
                logf_line("drain deadline active=%" PRIu64 ": stopping them", st.connections_active);
                break;
            }
        }
    }
    tf_server_stop(app.srv, STOP_DRAIN_MS); /* on_close runs for any still open */
    tf_server_stats(app.srv, &st);
    logf_line("stopped pid=%ld accepted=%" PRIu64 " rejected=%" PRIu64 " frames_received=%" PRIu64
              " frames_sent=%" PRIu64,
              (long)getpid(), st.connections_accepted, st.connections_rejected, st.frames_received,
              st.frames_sent);
    tf_server_free(app.srv);
    if (pidfile)
        unlink(pidfile);
    if (g_log != stdout)
        fclose(g_log);
    close(g_wake[0]);
    close(g_wake[1]);
    return 0;
}
