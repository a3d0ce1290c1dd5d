/* pipe: producers' frames go to every consumer, and a consumer that cannot keep
 * up slows the producers down instead of making the server buffer without bound.
 *
 *   pipe [-q] [-m MAX_QUEUED_BYTES] [ADDRESS]        (default 127.0.0.1:5882)
 *
 * A client says what it is with its first frame, "producer" or "consumer".
 * Every later frame of a producer is forwarded, in order, to every consumer.
 *
 * The canonical backpressure loop (libuv's uv_read_stop, Node's 'drain'):
 *   - tf_send to a consumer returns TF_ERR_FULL: keep that one frame for it and
 *     tf_conn_pause every producer. Paused inside a callback, a producer gets no
 *     further on_message, not even for frames already read; TCP then slows it.
 *   - on_writable(consumer): its queue has fallen to half the limit. Send the
 *     frame kept for it; once no consumer is blocked, tf_conn_resume the
 *     producers (what they had sent meanwhile is delivered first, in order).
 * With no consumer at all the producers wait too. Frames are limited to half
 * the queue limit, so a kept frame always fits once on_writable comes.
 * Prints "producer ID" / "consumer ID" as clients say who they are, and
 * "pause ID" / "resume ID" (ID: the consumer that caused it) as the flow
 * changes; SIGINT/SIGTERM stop it, printing forwarded=N pauses=N. Every
 * callback runs on the server's one loop thread: the state needs no lock. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tcpframe.h"

#define MAX_PEERS 1024

struct consumer {
    tf_conn_id id;
    uint8_t *held; /* the frame it could not take yet (malloc'd), or NULL */
    size_t held_len;
};

static struct {
    tf_server *srv;
    int quiet, paused;
    tf_conn_id producers[MAX_PEERS];
    struct consumer consumers[MAX_PEERS];
    size_t n_producers, n_consumers, blocked; /* blocked: consumers holding a frame */
    uint64_t forwarded, pauses;
} P;

static volatile sig_atomic_t g_signal;

static void on_signal(int sig) { g_signal = sig; }

static void say(const char *what, tf_conn_id id) {
    if (!P.quiet) {
        printf("%s %" PRIu64 "\n", what, id);
        fflush(stdout);
    }
}

/* Pauses or resumes every producer when the answer to "can the consumers take
 * more?" changes. */
static void update_flow(tf_conn_id why) {
    int want = P.n_consumers == 0 || P.blocked > 0;
    if (want == P.paused)
        return;
    P.paused = want;
    P.pauses += (uint64_t)want;
    for (size_t i = 0; i < P.n_producers; i++)
        (void)(want ? tf_conn_pause : tf_conn_resume)(P.srv, P.producers[i]);
    say(want ? "pause" : "resume", why);
}

/* One frame to one consumer; kept for it when its queue is full (then 1). */
static int forward(struct consumer *c, const uint8_t *data, size_t len) {
    int32_t rc = c->held ? TF_ERR_FULL : tf_send(P.srv, c->id, data, len);
    if (rc != TF_ERR_FULL)
        return 0; /* TF_OK, or the consumer is gone (on_close cleans up) */
    if (c->held || (c->held = malloc(len ? len : 1)) == NULL) {
        (void)tf_conn_close(P.srv, c->id); /* cannot keep it in order: drop that consumer */
        return 0;
    }
    memcpy(c->held, data, len);
    c->held_len = len;
    P.blocked++;
    return 1;
}

static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    (void)ud;
    for (size_t i = 0; i < P.n_producers; i++)
        if (P.producers[i] == conn) {
            tf_conn_id full = 0;
            for (size_t k = 0; k < P.n_consumers; k++)
                if (forward(&P.consumers[k], data, len))
                    full = P.consumers[k].id;
            P.forwarded++;
            update_flow(full);
            return;
        }
    for (size_t k = 0; k < P.n_consumers; k++)
        if (P.consumers[k].id == conn)
            return; /* consumers only read */
    /* The first frame: who is it? */
    if (len == 8 && memcmp(data, "producer", 8) == 0 && P.n_producers < MAX_PEERS) {
        /* tf_conn_pause inside its own on_message: the frames that came with
         * the hello are not delivered until the resume. */
        P.producers[P.n_producers++] = conn;
        if (P.paused)
            (void)tf_conn_pause(P.srv, conn); /* joins the others' wait */
        say("producer", conn);
    } else if (len == 8 && memcmp(data, "consumer", 8) == 0 && P.n_consumers < MAX_PEERS) {
        P.consumers[P.n_consumers++] = (struct consumer){conn, NULL, 0};
        say("consumer", conn);
        update_flow(conn);
    } else {
        (void)tf_conn_close(P.srv, conn);
    }
}

static void on_writable(void *ud, tf_conn_id conn) {
    (void)ud;
    for (size_t k = 0; k < P.n_consumers; k++) {
        struct consumer *c = &P.consumers[k];
        if (c->id != conn || c->held == NULL)
            continue;
        if (tf_send(P.srv, conn, c->held, c->held_len) == TF_ERR_FULL)
            return; /* a frame bigger than half the limit: wait for the next call */
        free(c->held);
        c->held = NULL;
        P.blocked--;
        update_flow(conn);
    }
}

static void on_close(void *ud, tf_conn_id conn, int32_t reason) {
    (void)ud, (void)reason;
    for (size_t i = 0; i < P.n_producers; i++)
        if (P.producers[i] == conn) {
            P.producers[i] = P.producers[--P.n_producers];
            break;
        }
    for (size_t k = 0; k < P.n_consumers; k++)
        if (P.consumers[k].id == conn) {
            if (P.consumers[k].held) {
                free(P.consumers[k].held);
                P.blocked--;
            }
            P.consumers[k] = P.consumers[--P.n_consumers];
            update_flow(conn);
            break;
        }
}

int main(int argc, char **argv) {
    uint64_t max_queued = 1u << 20;
    int opt;
    P.paused = 1; /* no consumer yet */
    while ((opt = getopt(argc, argv, "qm:")) != -1) {
        if (opt == 'q') {
            P.quiet = 1;
        } else if (opt == 'm') {
            max_queued = strtoull(optarg, NULL, 10);
        } else {
            fprintf(stderr, "usage: pipe [-q] [-m MAX_QUEUED_BYTES] [ADDRESS]\n");
            return 2;
        }
    }
    const char *address = optind < argc ? argv[optind] : "127.0.0.1:5882";
    /* SIGINT/SIGTERM blocked before the loop thread exists (it inherits the
     * mask), so they reach main only, inside sigsuspend: no lost wake-up. */
    struct sigaction sa;
    sigset_t block, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, &old);

    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, NULL, on_message, on_close};
    uint64_t max_frame = max_queued / 2 > 8 ? max_queued / 2 - 4 : 4; /* a kept frame fits at half */
    if (cfg == NULL || tf_config_set_address(cfg, address) != TF_OK ||
        tf_config_set_max_queued_output(cfg, max_queued) != TF_OK ||
        tf_config_set_max_frame(cfg, max_frame > UINT32_MAX ? UINT32_MAX : (uint32_t)max_frame) != TF_OK ||
        tf_config_set_on_writable(cfg, on_writable) != TF_OK ||
        tf_server_start(cfg, &cb, &P.srv) != TF_OK) {
        fprintf(stderr, "pipe: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 1;
    }
    tf_config_free(cfg);
    printf("listening on port %u\n", (unsigned)tf_server_port(P.srv));
    fflush(stdout);
    while (!g_signal)
        sigsuspend(&old);
    tf_server_stop(P.srv, 1000); /* no callback runs after it: P is ours again */
    printf("forwarded=%" PRIu64 " pauses=%" PRIu64 "\n", P.forwarded, P.pauses);
    for (size_t k = 0; k < P.n_consumers; k++)
        free(P.consumers[k].held);
    tf_server_free(P.srv);
    return 0;
}
