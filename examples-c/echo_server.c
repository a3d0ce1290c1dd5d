/* echo_server: the smallest complete tcpframe host. Every frame a client sends
 * comes back to it unchanged; SIGINT/SIGTERM print the server's stats and stop.
 *
 *   echo_server [-q] [-b auto|poll|epoll] [-c MAX_CONNECTIONS] [ADDRESS]
 *                                                      (default 127.0.0.1:5882)
 *
 * Shows the three things every push-mode host needs: a tf_server handle the
 * callbacks can use, a signal handler that only sets a flag (the stop happens
 * on the main thread), and freeing user_data only after tf_server_stop.
 *
 * As a server meant to be loaded, it raises its descriptor limit to the hard
 * limit and allows 100000 connections unless -c says otherwise (the library's
 * own default is 4096). */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tcpframe.h"

#define DEFAULT_ADDRESS "127.0.0.1:5882"
#define DRAIN_MS 1000
#define DEFAULT_MAX_CONNECTIONS 100000u

/* Signal handling: the handler only records the signal and writes one byte to a
 * pipe that the main thread waits on (the self-pipe trick). */
static volatile sig_atomic_t g_signal;
static int g_wake[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    g_signal = sig;
    ssize_t n = write(g_wake[1], "x", 1); /* non-blocking; a full pipe already wakes */
    (void)n;
    errno = saved;
}

/* tf_server_start writes the handle into app.srv before any callback runs,
 * so callbacks read it without locking. */
struct app {
    tf_server *srv;
    int quiet;
};

static int on_connect(void *user_data, tf_conn_id conn, const char *peer) {
    struct app *a = user_data;
    if (!a->quiet) {
        printf("connect %" PRIu64 " %s\n", conn, peer);
        fflush(stdout);
    }
    return 0;
}

static void on_message(void *user_data, tf_conn_id conn, const uint8_t *data, size_t len) {
    struct app *a = user_data;
    tf_server *srv = a->srv;
    int32_t rc = tf_send(srv, conn, data, len);
    if (rc == TF_ERR_FULL) {
        /* The client does not read its echoes: drop it rather than buffer forever. */
        fprintf(stderr, "echo_server: connection %" PRIu64 " is not reading; closing it\n", conn);
        (void)tf_conn_close(srv, conn);
    } else if (rc != TF_OK && rc != TF_ERR_NO_CONN && rc != TF_ERR_STOPPED) {
        fprintf(stderr, "echo_server: tf_send: %d: %s\n", (int)rc, tf_last_error());
    }
}

static void on_close(void *user_data, tf_conn_id conn, int32_t reason) {
    struct app *a = user_data;
    if (!a->quiet) {
        printf("close %" PRIu64 " reason=%d\n", conn, (int)reason);
        fflush(stdout);
    }
}

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
    fprintf(stderr,
            "usage: echo_server [-q] [-b auto|poll|epoll] [-c MAX_CONNECTIONS] [ADDRESS]"
            "   (default %s, %u connections)\n",
            DEFAULT_ADDRESS, DEFAULT_MAX_CONNECTIONS);
}

/* Many connections need many descriptors: use all the hard limit allows. */
static void raise_descriptor_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int install_signals(void) {
    if (pipe(g_wake) != 0) {
        perror("echo_server: pipe");
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        int fl = fcntl(g_wake[i], F_GETFL);
        if (fl < 0 || fcntl(g_wake[i], F_SETFL, fl | O_NONBLOCK) != 0 ||
            fcntl(g_wake[i], F_SETFD, FD_CLOEXEC) != 0) {
            perror("echo_server: fcntl");
            return -1;
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0) {
        perror("echo_server: sigaction");
        return -1;
    }
    return 0;
}

static void close_wake_pipe(void) {
    for (int i = 0; i < 2; i++) {
        if (g_wake[i] >= 0) {
            close(g_wake[i]);
            g_wake[i] = -1;
        }
    }
}

/* Blocks until SIGINT or SIGTERM arrives. */
static void wait_for_signal(void) {
    while (!g_signal) {
        struct pollfd p = {.fd = g_wake[0], .events = POLLIN, .revents = 0};
        int n = poll(&p, 1, -1);
        if (n < 0 && errno != EINTR) {
            perror("echo_server: poll");
            return;
        }
        if (n > 0) {
            char buf[16];
            while (read(g_wake[0], buf, sizeof buf) > 0) {
            }
        }
    }
}

int main(int argc, char **argv) {
    int quiet = 0;
    int32_t backend = TF_BACKEND_AUTO;
    unsigned long max_conn = DEFAULT_MAX_CONNECTIONS;
    int opt;
    while ((opt = getopt(argc, argv, "qb:c:h")) != -1) {
        switch (opt) {
        case 'q':
            quiet = 1;
            break;
        case 'b':
            if (parse_backend(optarg, &backend) != 0) {
                usage();
                return 2;
            }
            break;
        case 'c': {
            char *end = NULL;
            max_conn = strtoul(optarg, &end, 10);
            if (end == optarg || *end != '\0' || max_conn == 0 || max_conn > UINT32_MAX) {
                usage();
                return 2;
            }
            break;
        }
        default:
            usage();
            return opt == 'h' ? 0 : 2;
        }
    }
    if (argc - optind > 1) {
        usage();
        return 2;
    }
    const char *address = optind < argc ? argv[optind] : DEFAULT_ADDRESS;

    if (install_signals() != 0) {
        close_wake_pipe();
        return 1;
    }

    tf_config *cfg = tf_config_new();
    if (cfg == NULL) {
        fprintf(stderr, "echo_server: out of memory\n");
        close_wake_pipe();
        return 1;
    }
    if (tf_config_set_address(cfg, address) != TF_OK) {
        fprintf(stderr, "echo_server: bad address %s: %s\n", address, tf_last_error());
        tf_config_free(cfg);
        close_wake_pipe();
        return 2;
    }
    if (tf_config_set_max_connections(cfg, (uint32_t)max_conn) != TF_OK) {
        fprintf(stderr, "echo_server: max connections: %s\n", tf_last_error());
        tf_config_free(cfg);
        close_wake_pipe();
        return 2;
    }
    raise_descriptor_limit();
    if (tf_config_set_backend(cfg, backend) != TF_OK) {
        fprintf(stderr, "echo_server: backend: %s\n", tf_last_error());
        tf_config_free(cfg);
        close_wake_pipe();
        return 2;
    }

    struct app app;
    memset(&app, 0, sizeof app);
    app.quiet = quiet;
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = &app;
    cb.on_connect = on_connect;
    cb.on_message = on_message;
    cb.on_close = on_close;

    int32_t rc = tf_server_start(cfg, &cb, &app.srv);
    tf_config_free(cfg); /* the server keeps its own copy */
    if (rc != TF_OK) {
        fprintf(stderr, "echo_server: start on %s: %s\n", address, tf_last_error());
        close_wake_pipe();
        return 1;
    }
    tf_server *srv = app.srv;
    printf("listening on port %u\n", (unsigned)tf_server_port(srv));
    fflush(stdout);

    wait_for_signal();
    printf("signal %d: stopping\n", (int)g_signal);
    fflush(stdout);

    int exit_code = 0;
    if (tf_server_stop(srv, DRAIN_MS) != TF_OK) {
        fprintf(stderr, "echo_server: stop: %s\n", tf_last_error());
        exit_code = 1;
    }
    /* After stop the counters are final: every connection has been closed. */
    tf_stats st;
    if (tf_server_stats(srv, &st) == TF_OK) {
        print_stats(&st);
    } else {
        fprintf(stderr, "echo_server: stats: %s\n", tf_last_error());
        exit_code = 1;
    }
    fflush(stdout);
    tf_server_free(srv); /* no callback runs after stop, so app may go now */

    close_wake_pipe();
    return exit_code;
}
