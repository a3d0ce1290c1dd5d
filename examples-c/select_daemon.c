/* select_daemon: a single-threaded host that owns its event loop. tcpframe runs
 * in pull mode, so no callback ever runs on a foreign thread: the daemon waits in
 * select() on the server's descriptor next to its own (stdin), and takes events
 * with tf_server_poll(timeout 0) when that descriptor is readable.
 *
 *   select_daemon [ADDRESS]        (default 127.0.0.1:5882)
 *
 * Echoes every frame. Commands on stdin, one per line: "stats" prints the
 * server's stats, "quit" (or end of input) stops. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>

#include "tcpframe.h"

#define DEFAULT_ADDRESS "127.0.0.1:5882"
#define DRAIN_MS 1000
#define EVENT_BATCH 64
#define LINE_MAX_LEN 256

static void print_stats(const tf_stats *st) {
    printf("connections_active=%" PRIu64 "\n", st->connections_active);
    printf("connections_accepted=%" PRIu64 "\n", st->connections_accepted);
    printf("connections_rejected=%" PRIu64 "\n", st->connections_rejected);
    printf("frames_received=%" PRIu64 "\n", st->frames_received);
    printf("frames_sent=%" PRIu64 "\n", st->frames_sent);
    printf("bytes_received=%" PRIu64 "\n", st->bytes_received);
    printf("bytes_sent=%" PRIu64 "\n", st->bytes_sent);
    printf("closed_too_large=%" PRIu64 "\n", st->closed_too_large);
    printf("closed_idle=%" PRIu64 "\n", st->closed_idle);
}

static void handle_event(tf_server *srv, const tf_event *ev) {
    switch (ev->kind) {
    case TF_EVENT_CONNECT:
        /* data is the peer text, NUL-terminated, len bytes long */
        printf("connect %" PRIu64 " %.*s\n", ev->conn, (int)ev->len, (const char *)ev->data);
        break;
    case TF_EVENT_MESSAGE: {
        int32_t rc = tf_send(srv, ev->conn, ev->data, ev->len);
        if (rc == TF_ERR_FULL) {
            fprintf(stderr, "select_daemon: %" PRIu64 " is not reading; closing it\n", ev->conn);
            (void)tf_conn_close(srv, ev->conn);
        } else if (rc != TF_OK && rc != TF_ERR_NO_CONN && rc != TF_ERR_STOPPED) {
            fprintf(stderr, "select_daemon: tf_send: %s\n", tf_last_error());
        }
        break;
    }
    case TF_EVENT_CLOSE:
        printf("close %" PRIu64 " reason=%d\n", ev->conn, (int)ev->reason);
        break;
    default:
        fprintf(stderr, "select_daemon: unknown event kind %d\n", (int)ev->kind);
        break;
    }
}

/* Takes every waiting event without blocking. Returns 0, or -1 on an error. */
static int drain_events(tf_server *srv) {
    tf_event events[EVENT_BATCH];
    /* Bounded: a busy server must not starve stdin; select() brings us back. */
    for (int round = 0; round < 16; round++) {
        size_t count = 0;
        int32_t rc = tf_server_poll(srv, events, EVENT_BATCH, &count, 0);
        if (rc != TF_OK) {
            if (rc != TF_ERR_STOPPED)
                fprintf(stderr, "select_daemon: tf_server_poll: %s\n", tf_last_error());
            return -1;
        }
        for (size_t i = 0; i < count; i++)
            handle_event(srv, &events[i]);
        if (count < EVENT_BATCH)
            break;
    }
    fflush(stdout);
    return 0;
}

/* Runs one stdin command. Returns 1 to stop, 0 to go on. */
static int run_command(tf_server *srv, const char *line) {
    if (strcmp(line, "quit") == 0)
        return 1;
    if (strcmp(line, "stats") == 0) {
        tf_stats st;
        if (tf_server_stats(srv, &st) == TF_OK)
            print_stats(&st);
        else
            fprintf(stderr, "select_daemon: stats: %s\n", tf_last_error());
        fflush(stdout);
    } else if (line[0] != '\0') {
        fprintf(stderr, "select_daemon: unknown command '%s' (try stats, quit)\n", line);
    }
    return 0;
}

/* Reads what stdin has and runs each complete line. Returns 1 to stop. */
static int read_commands(tf_server *srv, char *line, size_t *used) {
    char chunk[512];
    ssize_t n = read(STDIN_FILENO, chunk, sizeof chunk);
    if (n < 0)
        return errno == EINTR ? 0 : 1;
    if (n == 0)
        return 1; /* end of input */
    for (ssize_t i = 0; i < n; i++) {
        char c = chunk[i];
        if (c == '\n') {
            if (*used > 0 && line[*used - 1] == '\r')
                (*used)--;
            line[*used] = '\0';
            *used = 0;
            if (run_command(srv, line))
                return 1;
        } else if (*used < LINE_MAX_LEN - 1) {
            line[(*used)++] = c; /* longer lines are cut, and then unknown */
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 2 || (argc == 2 && argv[1][0] == '-')) {
        fprintf(stderr, "usage: select_daemon [ADDRESS]   (default %s)\n", DEFAULT_ADDRESS);
        return 2;
    }
    const char *address = argc == 2 ? argv[1] : DEFAULT_ADDRESS;

    tf_config *cfg = tf_config_new();
    if (cfg == NULL) {
        fprintf(stderr, "select_daemon: out of memory\n");
        return 1;
    }
    if (tf_config_set_address(cfg, address) != TF_OK) {
        fprintf(stderr, "select_daemon: bad address %s: %s\n", address, tf_last_error());
        tf_config_free(cfg);
        return 2;
    }
    tf_server *srv = NULL;
    int32_t rc = tf_server_start_pull(cfg, &srv);
    tf_config_free(cfg);
    if (rc != TF_OK) {
        fprintf(stderr, "select_daemon: start on %s: %s\n", address, tf_last_error());
        return 1;
    }
    int sfd = tf_server_fd(srv);
    if (sfd < 0 || sfd >= FD_SETSIZE) {
        fprintf(stderr, "select_daemon: unusable server descriptor %d\n", sfd);
        tf_server_free(srv);
        return 1;
    }
    printf("listening on port %u\n", (unsigned)tf_server_port(srv));
    fflush(stdout);

    char line[LINE_MAX_LEN];
    size_t used = 0;
    int code = 0;
    for (;;) {
        fd_set rd;
        FD_ZERO(&rd);
        FD_SET(STDIN_FILENO, &rd);
        FD_SET(sfd, &rd);
        int n = select(sfd + 1, &rd, NULL, NULL, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("select_daemon: select");
            code = 1;
            break;
        }
        if (FD_ISSET(sfd, &rd) && drain_events(srv) != 0) {
            code = 1;
            break;
        }
        if (FD_ISSET(STDIN_FILENO, &rd) && read_commands(srv, line, &used))
            break;
    }

    printf("stopping\n");
    fflush(stdout);
    if (tf_server_stop(srv, DRAIN_MS) != TF_OK) {
        fprintf(stderr, "select_daemon: stop: %s\n", tf_last_error());
        code = 1;
    }
    /* The close events of the stop, if the library still hands them out. */
    (void)drain_events(srv);
    tf_server_free(srv);
    return code;
}
