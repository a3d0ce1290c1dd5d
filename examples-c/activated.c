/* activated: an echo server started by socket activation. It opens no socket:
 * the starter (systemd, systemd-socket-activate, or examples-c/launcher.c)
 * binds and listens, and passes the listening socket as descriptor 3 with
 * LISTEN_FDS=1 and LISTEN_PID set to this process; the library serves it with
 * the address "fd:3" and closes it at stop. TCP or Unix, whatever was passed.
 *
 *   systemd-socket-activate -l 127.0.0.1:7000 build/c/activated
 *   systemd-socket-activate -l /tmp/act.sock build/c/activated
 *   build/c/launcher 127.0.0.1:0 build/c/activated      (the same, without systemd)
 *
 * As a systemd unit pair: act.socket has ListenStream=7000, act.service has
 * ExecStart=/usr/local/bin/activated.
 *
 * Prints "listening on fd 3 (port N)" (port 0 for a Unix socket) and, per
 * connection, "connect ID PEER" and "close ID reason=N". SIGTERM (systemd's
 * stop) or SIGINT stop it. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tcpframe.h"

#define SD_LISTEN_FDS_START 3 /* sd_listen_fds(3): the first passed descriptor */

static tf_server *g_srv;

static int on_connect(void *ud, tf_conn_id conn, const char *peer) {
    (void)ud;
    printf("connect %" PRIu64 " %s\n", conn, peer);
    fflush(stdout);
    return 0;
}

static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    (void)ud;
    (void)tf_send(g_srv, conn, data, len);
}

static void on_close(void *ud, tf_conn_id conn, int32_t reason) {
    (void)ud;
    printf("close %" PRIu64 " reason=%d\n", conn, (int)reason);
    fflush(stdout);
}

/* What sd_listen_fds(1) does: the number of passed descriptors, if they are
 * meant for this process; the variables are removed so that no child of ours
 * takes them for its own. */
static int listen_fds(void) {
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    int n = fds ? atoi(fds) : 0;
    if (pid != NULL && strtol(pid, NULL, 10) != (long)getpid())
        n = 0;
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return n;
}

int main(void) {
    if (listen_fds() < 1) {
        fprintf(stderr, "activated: no socket was passed (LISTEN_FDS, LISTEN_PID): start me with "
                        "systemd-socket-activate, a .socket unit, or examples-c/launcher\n");
        return 2;
    }
    char address[32];
    snprintf(address, sizeof address, "fd:%d", SD_LISTEN_FDS_START);

    sigset_t sigs; /* taken by sigwait below; blocked before the loop thread starts */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, on_connect, on_message, on_close};
    if (cfg == NULL || tf_config_set_address(cfg, address) != TF_OK) {
        fprintf(stderr, "activated: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 2;
    }
    int32_t rc = tf_server_start(cfg, &cb, &g_srv); /* TF_ERR_INVALID: fd 3 is not a listener */
    tf_config_free(cfg);
    if (rc != TF_OK) {
        fprintf(stderr, "activated: start on %s: %s\n", address, tf_last_error());
        return 1;
    }
    printf("listening on fd %d (port %u)\n", SD_LISTEN_FDS_START, (unsigned)tf_server_port(g_srv));
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    printf("signal %d: stopping\n", sig);
    fflush(stdout);
    tf_server_stop(g_srv, 1000); /* also closes descriptor 3 */
    tf_server_free(g_srv);
    return 0;
}
