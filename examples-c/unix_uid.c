/* unix_uid: an echo service on a Unix socket that serves only some users. The
 * library gives on_connect the caller's credentials as the kernel reports them
 * (SO_PEERCRED): "unix:pid=PID,uid=UID,gid=GID"; refusing is returning non-zero.
 *
 *   unix_uid [-m MODE] [-u UID[,UID...]] unix:/path/name.sock | unix:@name
 *
 *   -m  permission bits of the socket file, octal (tf_config_set_unix_mode), e.g.
 *       0666 to let other users reach on_connect at all (the kernel checks the
 *       file's write permission first); default: what the umask gives
 *   -u  the uids served (default: this process's uid)
 *
 * Prints "listening on ADDRESS", then "accept ID uid=U pid=P" or "refuse uid=U
 * pid=P" per caller. SIGINT/SIGTERM stop it; the socket file is removed then.
 * A socket file left by a dead process is replaced; any other file there is
 * left alone and the start fails. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tcpframe.h"

#define MAX_UIDS 32

static tf_server *g_srv;
static unsigned long g_uids[MAX_UIDS];
static int g_nuids;

static int on_connect(void *ud, tf_conn_id conn, const char *peer) {
    int pid = 0;
    unsigned long uid = 0, gid = 0;
    (void)ud;
    if (sscanf(peer, "unix:pid=%d,uid=%lu,gid=%lu", &pid, &uid, &gid) != 3) {
        printf("refuse %s\n", peer); /* not a Unix caller: cannot tell who it is */
        fflush(stdout);
        return 1;
    }
    for (int i = 0; i < g_nuids; i++) {
        if (g_uids[i] == uid) {
            printf("accept %" PRIu64 " uid=%lu pid=%d\n", conn, uid, pid);
            fflush(stdout);
            return 0;
        }
    }
    printf("refuse uid=%lu pid=%d\n", uid, pid);
    fflush(stdout);
    return 1; /* closed at once, counted in connections_rejected */
}

static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    (void)ud;
    (void)tf_send(g_srv, conn, data, len);
}

static int parse_uids(char *list) {
    for (char *tok = strtok(list, ","); tok != NULL; tok = strtok(NULL, ",")) {
        char *end;
        unsigned long v = strtoul(tok, &end, 10);
        if (*end != '\0' || end == tok || g_nuids == MAX_UIDS)
            return -1;
        g_uids[g_nuids++] = v;
    }
    return g_nuids > 0 ? 0 : -1;
}

static void usage(void) { fprintf(stderr, "usage: unix_uid [-m MODE] [-u UID[,UID...]] unix:/path | unix:@name\n"); }

int main(int argc, char **argv) {
    long mode = -1;
    int opt;
    while ((opt = getopt(argc, argv, "m:u:h")) != -1) {
        char *end;
        if (opt == 'm') {
            mode = strtol(optarg, &end, 8);
            if (*end != '\0' || mode < 0) {
                usage();
                return 2;
            }
        } else if (opt == 'u') {
            if (parse_uids(optarg) != 0) {
                usage();
                return 2;
            }
        } else {
            usage();
            return opt == 'h' ? 0 : 2;
        }
    }
    if (argc - optind != 1 || strncmp(argv[optind], "unix:", 5) != 0) {
        usage();
        return 2;
    }
    const char *address = argv[optind];
    if (g_nuids == 0)
        g_uids[g_nuids++] = (unsigned long)getuid();

    sigset_t sigs; /* taken by sigwait below; blocked before the loop thread starts */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, on_connect, on_message, NULL};
    if (cfg == NULL || tf_config_set_address(cfg, address) != TF_OK ||
        (mode >= 0 && tf_config_set_unix_mode(cfg, (uint32_t)mode) != TF_OK)) {
        fprintf(stderr, "unix_uid: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 2;
    }
    int32_t rc = tf_server_start(cfg, &cb, &g_srv);
    tf_config_free(cfg);
    if (rc != TF_OK) {
        fprintf(stderr, "unix_uid: start on %s: %s\n", address, tf_last_error());
        return 1;
    }
    printf("listening on %s\n", address);
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    tf_stats st;
    tf_server_stop(g_srv, 1000); /* removes the socket file */
    tf_server_stats(g_srv, &st);
    printf("signal %d: stopping\nconnections_accepted=%" PRIu64 "\nconnections_rejected=%" PRIu64 "\n", sig,
           st.connections_accepted, st.connections_rejected);
    tf_server_free(g_srv);
    return 0;
}
