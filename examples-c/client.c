/* client: a tcpframe client built on the library's outbound connections: a
 * server with address "none" (no listener) and one tf_connect. Sends each
 * stdin line, without its newline, as one frame; prints each frame it receives
 * as one line.
 *
 *   client [-t WAIT_MS] [ADDRESS]   (default 127.0.0.1:5882; also "[::1]:5882",
 *                                    "localhost:5882", "unix:/path", "unix:@name")
 *
 * tf_connect takes numeric addresses only: a host name is resolved here with
 * getaddrinfo and each of its addresses is tried in turn. At end of input it
 * waits, up to WAIT_MS (default 5000), until it has received as many frames as
 * it sent (the echo server's promise), then exits 0. It exits 1 on a timeout, a
 * connection error or a malformed reply (a frame over the 8 MiB limit).
 *
 * Threads: the library's loop thread runs the callbacks (it prints the frames);
 * the main thread reads stdin and calls tf_send. They share `S`, under its lock. */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

#define DEFAULT_ADDRESS "127.0.0.1:5882"
#define MAX_FRAME 8388608u /* the library's default max frame */
#define MAX_TRIES 16       /* addresses tried for one host name */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int connected, closed, writable, write_error;
    int32_t reason;
    long received;
    char why[256]; /* the library's last log line: why a connect failed */
} S = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, ""};

static int wake[2] = {-1, -1}; /* on_close wakes the main thread's poll() */

static int on_connect(void *ud, tf_conn_id conn, const char *peer) {
    (void)ud, (void)conn, (void)peer;
    pthread_mutex_lock(&S.mu);
    S.connected = 1;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
    return 0;
}

static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    (void)ud, (void)conn;
    int bad = (len > 0 && fwrite(data, 1, len, stdout) != len) || putchar('\n') == EOF ||
              fflush(stdout) != 0;
    pthread_mutex_lock(&S.mu);
    S.received++;
    S.write_error |= bad;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
}

static void on_close(void *ud, tf_conn_id conn, int32_t reason) {
    (void)ud, (void)conn;
    pthread_mutex_lock(&S.mu);
    int was_connected = S.connected;
    S.closed = 1;
    S.reason = reason;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
    if (was_connected) /* (a failed connect is dial's business) */
        (void)!write(wake[1], "x", 1);
}

static void on_writable(void *ud, tf_conn_id conn) {
    (void)ud, (void)conn;
    pthread_mutex_lock(&S.mu);
    S.writable = 1;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
}

static void on_log(void *ud, int32_t level, const char *msg) {
    (void)ud, (void)level;
    const char *p = strstr(msg, "failed to connect: ");
    pthread_mutex_lock(&S.mu);
    if (p != NULL)
        snprintf(S.why, sizeof S.why, "%s", p + strlen("failed to connect: "));
    pthread_mutex_unlock(&S.mu);
}

/* Waits on S.cv until `deadline` (CLOCK_REALTIME); 0 when it passed. Lock held. */
static int wait_until(const struct timespec *deadline) {
    return pthread_cond_timedwait(&S.cv, &S.mu, deadline) != ETIMEDOUT;
}

static struct timespec in_ms(long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* The addresses tf_connect may take for `address`: itself for unix:..., else
 * each address getaddrinfo gives for HOST:PORT or [V6]:PORT. Returns how many. */
static int candidates(const char *address, char out[][80], int max) {
    if (strncmp(address, "unix:", 5) == 0) {
        snprintf(out[0], 80, "%s", address);
        return 1;
    }
    char copy[256], *host, *port;
    snprintf(copy, sizeof copy, "%s", address);
    if (copy[0] == '[') {
        char *end = strchr(copy, ']');
        if (end == NULL || end[1] != ':')
            return -1;
        *end = '\0';
        host = copy + 1;
        port = end + 2;
    } else {
        char *colon = strrchr(copy, ':');
        if (colon == NULL)
            return -1;
        *colon = '\0';
        host = copy;
        port = colon + 1;
    }
    if (!*host || !*port)
        return -1;
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "client: %s: %s\n", address, gai_strerror(gai));
        return 0;
    }
    int n = 0;
    for (struct addrinfo *ai = res; ai != NULL && n < max; ai = ai->ai_next) {
        char ip[INET6_ADDRSTRLEN];
        if (ai->ai_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)ai->ai_addr;
            inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
            snprintf(out[n++], 80, "%s:%u", ip, (unsigned)ntohs(a->sin_port));
        } else if (ai->ai_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)ai->ai_addr;
            inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
            snprintf(out[n++], 80, "[%s]:%u", ip, (unsigned)ntohs(a->sin6_port));
        }
    }
    freeaddrinfo(res);
    return n;
}

/* Connects to the first address that answers; its id, or 0 (reported). */
static tf_conn_id dial(tf_server *srv, const char *address) {
    char addrs[MAX_TRIES][80];
    int n = candidates(address, addrs, MAX_TRIES);
    if (n < 0) {
        fprintf(stderr, "client: bad address %s (want HOST:PORT, [V6]:PORT or unix:PATH)\n", address);
        return 0;
    }
    for (int i = 0; i < n; i++) {
        tf_conn_id id = 0;
        if (tf_connect(srv, addrs[i], &id) != TF_OK) {
            fprintf(stderr, "client: connect %s: %s\n", address, tf_last_error());
            return 0;
        }
        pthread_mutex_lock(&S.mu);
        while (!S.connected && !S.closed) /* the library's connect timeout bounds this */
            pthread_cond_wait(&S.cv, &S.mu);
        int ok = S.connected;
        S.closed = 0;
        pthread_mutex_unlock(&S.mu);
        if (ok)
            return id;
    }
    pthread_mutex_lock(&S.mu);
    if (n > 0)
        fprintf(stderr, "client: connect %s: %s\n", address, S.why[0] ? S.why : "failed");
    pthread_mutex_unlock(&S.mu);
    return 0;
}

/* tf_send, waiting for room when the output queue is full. 0, or 1 (reported). */
static int send_line(tf_server *srv, tf_conn_id id, const uint8_t *p, size_t len) {
    for (;;) {
        int32_t rc = tf_send(srv, id, p, len);
        if (rc == TF_OK)
            return 0;
        if (rc == TF_ERR_TOO_LARGE) {
            fprintf(stderr, "client: line of %zu bytes is over the %u-byte frame limit\n", len, MAX_FRAME);
            return 1;
        }
        if (rc != TF_ERR_FULL)
            return 1; /* closed: reported by the caller */
        pthread_mutex_lock(&S.mu);
        while (!S.writable && !S.closed)
            pthread_cond_wait(&S.cv, &S.mu);
        S.writable = 0;
        pthread_mutex_unlock(&S.mu);
    }
}

/* Sends each complete line (or the final unterminated one at EOF); returns 0 or 1. */
static int send_lines(tf_server *srv, tf_conn_id id, char *buf, size_t *len, int at_eof, long *sent) {
    size_t start = 0;
    for (size_t i = 0; i < *len; i++) {
        if (buf[i] == '\n') {
            if (send_line(srv, id, (const uint8_t *)buf + start, i - start) != 0)
                return 1;
            (*sent)++;
            start = i + 1;
        }
    }
    if (at_eof && start < *len) {
        if (send_line(srv, id, (const uint8_t *)buf + start, *len - start) != 0)
            return 1;
        (*sent)++;
        start = *len;
    }
    memmove(buf, buf + start, *len - start);
    *len -= start;
    return 0;
}

static void report_close(long received, long sent) {
    if (S.reason == TF_CLOSE_TOO_LARGE)
        fprintf(stderr, "client: server announced a frame over the %u-byte limit\n", MAX_FRAME);
    else
        fprintf(stderr, "client: server closed the connection (%ld of %ld replies)\n", received, sent);
}

int main(int argc, char **argv) {
    long wait_ms = 5000;
    int opt;
    while ((opt = getopt(argc, argv, "t:h")) != -1) {
        if (opt == 't') {
            char *end;
            wait_ms = strtol(optarg, &end, 10);
            if (*end != '\0' || wait_ms < 0) {
                fprintf(stderr, "client: bad -t value %s\n", optarg);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: client [-t WAIT_MS] [ADDRESS]   (default %s)\n", DEFAULT_ADDRESS);
            return opt == 'h' ? 0 : 2;
        }
    }
    if (argc - optind > 1) {
        fprintf(stderr, "usage: client [-t WAIT_MS] [ADDRESS]\n");
        return 2;
    }
    const char *address = optind < argc ? argv[optind] : DEFAULT_ADDRESS;
    if (pipe(wake) != 0) {
        perror("client: pipe");
        return 1;
    }

    tf_server *srv = NULL;
    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, on_connect, on_message, on_close};
    if (cfg == NULL || tf_config_set_address(cfg, "none") != TF_OK ||
        tf_config_set_on_writable(cfg, on_writable) != TF_OK ||
        tf_config_set_log(cfg, on_log, NULL) != TF_OK || tf_server_start(cfg, &cb, &srv) != TF_OK) {
        fprintf(stderr, "client: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 1;
    }
    tf_config_free(cfg);

    int status = 1;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    long sent = 0;
    tf_conn_id id = dial(srv, address);
    if (id == 0)
        goto out;

    for (int eof = 0; !eof;) {
        struct pollfd p[2] = {{STDIN_FILENO, POLLIN, 0}, {wake[0], POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("client: poll");
            goto out;
        }
        if (p[1].revents) { /* the connection closed while input was still coming */
            pthread_mutex_lock(&S.mu);
            report_close(S.received, sent);
            pthread_mutex_unlock(&S.mu);
            goto out;
        }
        if (cap - len < 4096) {
            char *nb = realloc(buf, cap ? cap * 2 : 65536);
            if (nb == NULL) {
                fprintf(stderr, "client: out of memory\n");
                goto out;
            }
            buf = nb;
            cap = cap ? cap * 2 : 65536;
        }
        ssize_t r = read(STDIN_FILENO, buf + len, cap - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            perror("client: read stdin");
            goto out;
        }
        eof = r == 0;
        len += (size_t)r;
        if (send_lines(srv, id, buf, &len, eof, &sent) != 0) {
            pthread_mutex_lock(&S.mu);
            if (S.closed)
                report_close(S.received, sent);
            pthread_mutex_unlock(&S.mu);
            goto out;
        }
    }

    /* End of input: wait for as many replies as frames sent. */
    struct timespec deadline = in_ms(wait_ms);
    pthread_mutex_lock(&S.mu);
    int in_time = 1;
    while (S.received < sent && !S.closed && in_time)
        in_time = wait_until(&deadline);
    if (S.write_error)
        fprintf(stderr, "client: cannot write to stdout\n");
    else if (S.received >= sent)
        status = 0;
    else if (S.closed)
        report_close(S.received, sent);
    else
        fprintf(stderr, "client: timed out: %ld of %ld replies\n", S.received, sent);
    pthread_mutex_unlock(&S.mu);

out:
    tf_server_stop(srv, 0);
    tf_server_free(srv);
    free(buf);
    close(wake[0]);
    close(wake[1]);
    return status;
}
