/* relay: accepts connections on one address and, for each, connects to another
 * with tf_connect; frames go both ways unchanged. One server does both sides on
 * one loop thread: the accepted and the outbound connections.
 *
 *   relay [-q] [-b auto|poll|epoll] [-Q MAX_QUEUED_BYTES] LISTEN_ADDRESS TARGET_ADDRESS
 *
 *   relay 127.0.0.1:6000 127.0.0.1:5882          TCP to TCP
 *   relay unix:/run/app.sock 127.0.0.1:5882      a local Unix socket in front of a TCP service
 *
 * Prints "listening on port N" ("listening on ADDRESS" without a TCP port), then
 * per client "pair IN OUT", "connected OUT PEER", "close ID reason=N" (not with
 * -q), "pause ID" / "resume ID" (always). SIGINT/SIGTERM print the stats and stop.
 *
 * Backpressure: a frame that does not fit in the other side's output queue
 * (TF_ERR_FULL) is held, and the side it came from is paused (tf_conn_pause:
 * the library stops reading it, TCP slows its peer). When the other side's
 * queue has drained to half, on_writable sends the held frame and resumes the
 * reader. Memory per pair stays within twice max queued output plus one frame.
 *
 * Each connection's user data (tf_conn_set_user_data) points to its pair,
 * freed when both sides' on_close have run. All callbacks run on the one loop
 * thread, so the pairs need no lock. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tcpframe.h"

struct pair {
    tf_conn_id in, out; /* accepted, outbound */
    int open;           /* sides whose on_close has not run yet */
    uint8_t *held[2];   /* a frame waiting for room: [0] for in, [1] for out */
    size_t held_len[2];
};

static tf_server *g_srv;
static const char *g_target;
static int g_quiet;

static struct pair *pair_of(tf_conn_id c) { return tf_conn_user_data(g_srv, c); }

/* Index of the side c is in its pair, and its partner. */
static int side(const struct pair *p, tf_conn_id c) { return c == p->out; }
static tf_conn_id partner(const struct pair *p, tf_conn_id c) { return c == p->in ? p->out : p->in; }

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static int on_connect(void *ud, tf_conn_id c, const char *peer) {
    (void)ud;
    if (pair_of(c) != NULL) { /* our outbound side is established */
        if (!g_quiet)
            say("connected %" PRIu64 " %s\n", c, peer);
        return 0;
    }
    struct pair *p = calloc(1, sizeof *p);
    if (p == NULL)
        return 1; /* refused: no on_close follows */
    p->in = c;
    if (tf_connect(g_srv, g_target, &p->out) != TF_OK) { /* max connections reached */
        fprintf(stderr, "relay: tf_connect %s: %s\n", g_target, tf_last_error());
        free(p);
        return 1;
    }
    p->open = 2;
    tf_conn_set_user_data(g_srv, c, p);
    tf_conn_set_user_data(g_srv, p->out, p); /* before its on_connect: same loop thread */
    if (!g_quiet)
        say("pair %" PRIu64 " %" PRIu64 "\n", c, p->out);
    return 0;
}

static void on_message(void *ud, tf_conn_id c, const uint8_t *data, size_t len) {
    (void)ud;
    struct pair *p = pair_of(c);
    if (p == NULL)
        return;
    tf_conn_id to = partner(p, c);
    int32_t rc = tf_send(g_srv, to, data, len); /* queued before `to` is up: written once it is */
    if (rc == TF_ERR_FULL) {
        int d = side(p, to);
        p->held[d] = malloc(len ? len : 1);
        if (p->held[d] == NULL) {
            tf_conn_close(g_srv, c);
            return;
        }
        memcpy(p->held[d], data, len);
        p->held_len[d] = len;
        tf_conn_pause(g_srv, c); /* no further on_message for c until resumed */
        say("pause %" PRIu64 "\n", c);
    } else if (rc != TF_OK) {
        tf_conn_close(g_srv, c); /* the other side is gone */
    }
}

/* The queue of c has room again: send what was held for it, resume its partner. */
static void on_writable(void *ud, tf_conn_id c) {
    (void)ud;
    struct pair *p = pair_of(c);
    if (p == NULL)
        return;
    int d = side(p, c);
    if (p->held[d] == NULL)
        return;
    int32_t rc = tf_send(g_srv, c, p->held[d], p->held_len[d]);
    if (rc == TF_ERR_FULL)
        return; /* on_writable comes again */
    free(p->held[d]);
    p->held[d] = NULL;
    tf_conn_resume(g_srv, partner(p, c));
    say("resume %" PRIu64 "\n", partner(p, c));
}

static void on_close(void *ud, tf_conn_id c, int32_t reason) {
    (void)ud;
    struct pair *p = pair_of(c);
    if (!g_quiet)
        say("close %" PRIu64 " reason=%d\n", c, (int)reason);
    if (p == NULL)
        return;
    tf_conn_close(g_srv, partner(p, c)); /* writes what is queued for it, then closes */
    if (--p->open == 0) {
        free(p->held[0]);
        free(p->held[1]);
        free(p);
    }
}

static int parse_backend(const char *s, int32_t *out) {
    if (strcmp(s, "auto") == 0)
        *out = TF_BACKEND_AUTO;
    else if (strcmp(s, "poll") == 0)
        *out = TF_BACKEND_POLL;
    else if (strcmp(s, "epoll") == 0)
        *out = TF_BACKEND_EPOLL;
    else
        return -1;
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: relay [-q] [-b auto|poll|epoll] [-Q MAX_QUEUED_BYTES] LISTEN_ADDRESS TARGET_ADDRESS\n");
}

int main(int argc, char **argv) {
    int32_t backend = TF_BACKEND_AUTO;
    unsigned long long max_queued = 0;
    int opt;
    while ((opt = getopt(argc, argv, "qb:Q:h")) != -1) {
        if (opt == 'q') {
            g_quiet = 1;
        } else if (opt == 'b' && parse_backend(optarg, &backend) == 0) {
        } else if (opt == 'Q') {
            char *end;
            max_queued = strtoull(optarg, &end, 10);
            if (*end != '\0' || max_queued == 0) {
                usage();
                return 2;
            }
        } else {
            usage();
            return opt == 'h' ? 0 : 2;
        }
    }
    if (argc - optind != 2) {
        usage();
        return 2;
    }
    const char *listen_at = argv[optind];
    g_target = argv[optind + 1];

    /* SIGINT/SIGTERM are taken by sigwait() below: block them before the
     * library's loop thread starts, so that it inherits the mask. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, on_connect, on_message, on_close};
    if (cfg == NULL || tf_config_set_address(cfg, listen_at) != TF_OK ||
        tf_config_set_backend(cfg, backend) != TF_OK ||
        (max_queued && tf_config_set_max_queued_output(cfg, max_queued) != TF_OK) ||
        tf_config_set_on_writable(cfg, on_writable) != TF_OK) {
        fprintf(stderr, "relay: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 2;
    }
    int32_t rc = tf_server_start(cfg, &cb, &g_srv);
    tf_config_free(cfg);
    if (rc != TF_OK) {
        fprintf(stderr, "relay: start on %s: %s\n", listen_at, tf_last_error());
        return 1;
    }
    if (tf_server_port(g_srv) != 0)
        printf("listening on port %u\n", (unsigned)tf_server_port(g_srv));
    else
        printf("listening on %s\n", listen_at);
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    printf("signal %d: stopping\n", sig);
    tf_server_stop(g_srv, 1000); /* every on_close runs: the pairs are freed */
    tf_stats st;
    tf_server_stats(g_srv, &st);
    printf("connections_accepted=%" PRIu64 "\nframes_received=%" PRIu64 "\nframes_sent=%" PRIu64 "\n",
           st.connections_accepted, st.frames_received, st.frames_sent);
    tf_server_free(g_srv);
    return 0;
}
