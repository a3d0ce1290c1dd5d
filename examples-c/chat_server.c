/* chat_server: every frame a client sends goes to every OTHER connected client.
 *
 *   chat_server [-q] [ADDRESS]        (default 127.0.0.1:5882)
 *
 * All callbacks of a server run on its one loop thread, one at a time, so the
 * list of members below needs no lock: on_connect adds, on_close removes,
 * on_message reads. Each frame goes out with ONE tf_send_many call: the
 * library copies the payload once and every recipient's queue shares it (from
 * 512 bytes on), instead of one copy per member. A member whose output queue
 * cannot take the frame is dropped, so one slow reader cannot make the server
 * buffer without bound. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tcpframe.h"

#define DEFAULT_ADDRESS "127.0.0.1:5882"
#define DRAIN_MS 1000
/* Per-member output limit (the library's default, set explicitly so that
 * on_message can tell which members were skipped as full). */
#define MAX_QUEUED (16u << 20)

static volatile sig_atomic_t g_signal;
static int g_wake[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    g_signal = sig;
    ssize_t n = write(g_wake[1], "x", 1);
    (void)n;
    errno = saved;
}

struct room {
    /* Written by tf_server_start before any callback runs: no lock needed. */
    tf_server *srv;
    /* Loop thread only. */
    tf_conn_id *members;
    tf_conn_id *to; /* scratch: the recipients of one frame (cap entries too) */
    size_t count, cap;
    int quiet;
};

static int on_connect(void *user_data, tf_conn_id conn, const char *peer) {
    struct room *r = user_data;
    if (r->count == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        tf_conn_id *m = realloc(r->members, cap * sizeof *m);
        if (m == NULL)
            return 1; /* refuse: we could not remember this member */
        r->members = m;
        tf_conn_id *t = realloc(r->to, cap * sizeof *t);
        if (t == NULL)
            return 1;
        r->to = t;
        r->cap = cap;
    }
    r->members[r->count++] = conn;
    if (!r->quiet) {
        printf("connect %" PRIu64 " %s\n", conn, peer);
        fflush(stdout);
    }
    return 0;
}

static void on_message(void *user_data, tf_conn_id from, const uint8_t *data, size_t len) {
    struct room *r = user_data;
    tf_server *srv = r->srv;
    size_t n = 0, queued = 0;
    for (size_t i = 0; i < r->count; i++)
        if (r->members[i] != from)
            r->to[n++] = r->members[i];
    int32_t rc = tf_send_many(srv, r->to, n, data, len, &queued);
    if (rc != TF_OK) {
        if (rc != TF_ERR_STOPPED)
            fprintf(stderr, "chat_server: tf_send_many: %s\n", tf_last_error());
        return;
    }
    if (queued == n)
        return;
    /* Some were skipped: members being dropped already, or whose queue could
     * not take this frame. Inside a callback no queue drains, so the latter
     * still have no room for it now: drop every member in that state (one that
     * took it but could not take another like it goes too, a frame early). */
    for (size_t i = 0; i < n; i++) {
        tf_conn_info info;
        if (tf_conn_get_info(srv, r->to[i], &info) == TF_OK &&
            info.queued_output + 4 + len > MAX_QUEUED) {
            fprintf(stderr, "chat_server: %" PRIu64 " is not reading; dropping it\n", r->to[i]);
            (void)tf_conn_close(srv, r->to[i]);
        }
    }
}

static void on_close(void *user_data, tf_conn_id conn, int32_t reason) {
    struct room *r = user_data;
    for (size_t i = 0; i < r->count; i++) {
        if (r->members[i] == conn) {
            r->members[i] = r->members[--r->count];
            break;
        }
    }
    if (!r->quiet) {
        printf("close %" PRIu64 " reason=%d\n", conn, (int)reason);
        fflush(stdout);
    }
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
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
        return -1;
    return 0;
}

int main(int argc, char **argv) {
    struct room room;
    memset(&room, 0, sizeof room);
    int opt;
    while ((opt = getopt(argc, argv, "qh")) != -1) {
        if (opt == 'q') {
            room.quiet = 1;
        } else {
            fprintf(stderr, "usage: chat_server [-q] [ADDRESS]   (default %s)\n", DEFAULT_ADDRESS);
            return opt == 'h' ? 0 : 2;
        }
    }
    const char *address = optind < argc ? argv[optind] : DEFAULT_ADDRESS;
    int code = 1;
    tf_config *cfg = NULL;
    tf_server *srv = NULL;

    if (install_signals() != 0) {
        perror("chat_server: signals");
        goto out;
    }
    cfg = tf_config_new();
    if (cfg == NULL) {
        fprintf(stderr, "chat_server: out of memory\n");
        goto out;
    }
    if (tf_config_set_address(cfg, address) != TF_OK) {
        fprintf(stderr, "chat_server: bad address %s: %s\n", address, tf_last_error());
        code = 2;
        goto out;
    }
    if (tf_config_set_max_queued_output(cfg, MAX_QUEUED) != TF_OK) {
        fprintf(stderr, "chat_server: %s\n", tf_last_error());
        goto out;
    }
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = &room;
    cb.on_connect = on_connect;
    cb.on_message = on_message;
    cb.on_close = on_close;
    int32_t rc = tf_server_start(cfg, &cb, &room.srv);
    if (rc != TF_OK) {
        fprintf(stderr, "chat_server: start on %s: %s\n", address, tf_last_error());
        goto out;
    }
    srv = room.srv;
    printf("listening on port %u\n", (unsigned)tf_server_port(srv));
    fflush(stdout);

    while (!g_signal) {
        struct pollfd p = {.fd = g_wake[0], .events = POLLIN, .revents = 0};
        if (poll(&p, 1, -1) < 0 && errno != EINTR) {
            perror("chat_server: poll");
            break;
        }
    }
    printf("signal %d: stopping\n", (int)g_signal);
    fflush(stdout);
    code = 0;
    if (tf_server_stop(srv, DRAIN_MS) != TF_OK) {
        fprintf(stderr, "chat_server: stop: %s\n", tf_last_error());
        code = 1;
    }

out:
    tf_server_free(srv); /* after this no callback runs: the room can go */
    tf_config_free(cfg);
    free(room.members);
    free(room.to);
    for (int i = 0; i < 2; i++)
        if (g_wake[i] >= 0)
            close(g_wake[i]);
    return code;
}
