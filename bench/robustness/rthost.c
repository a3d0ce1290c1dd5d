/* rthost: a configurable tcpframe echo/sink host (adapted from the adversarial
 * review's repro/rthost.c).
 *
 *   rthost [-f max_frame] [-i idle_ms] [-c max_conn] [-Q max_queued]
 *          [-B max_buffered] [-b backend] [-s] [-n nofile] [-a address]
 *
 * Prints the port on its first line, then serves until stdin closes; every line
 * read from stdin prints one stats line (active=.. accepted=.. ... rss_kib=..).
 * At the end it prints the closes counted by reason, all reasons 0..15, so
 * TF_CLOSE_OVERLOAD (9) is counted too (the original counted only 0..7):
 *
 *   closes peer=.. local=.. shutdown=.. io=.. toolarge=.. idle=.. overload=.. other=..
 *
 * Compiles against the current header and against older ones that have no
 * TF_CLOSE_OVERLOAD / tf_config_set_max_buffered (then -B is refused). */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "tcpframe.h"

#define REASON_OVERLOAD 9 /* TF_CLOSE_OVERLOAD; a number so old headers compile */

static tf_server *srv;
static int sink;
static unsigned long long closes[16], closes_other;

static void on_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)ud;
    if (!sink) tf_send(srv, c, d, n);
}

static void on_close(void *ud, tf_conn_id c, int32_t r) {
    (void)ud;
    (void)c;
    if (r >= 0 && r < 16)
        closes[r]++;
    else
        closes_other++;
}

static long status_kib(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char l[256];
    long v = -1;
    size_t k = strlen(key);
    if (!f) return -1;
    while (fgets(l, sizeof l, f))
        if (!strncmp(l, key, k)) v = atol(l + k);
    fclose(f);
    return v;
}

int main(int argc, char **argv) {
    tf_config *cfg = tf_config_new();
    tf_config_set_address(cfg, "127.0.0.1:0");
    int opt;
    while ((opt = getopt(argc, argv, "f:i:c:Q:B:b:sn:a:")) != -1) {
        switch (opt) {
        case 'f': tf_config_set_max_frame(cfg, (uint32_t)strtoul(optarg, 0, 0)); break;
        case 'i': tf_config_set_idle_timeout_ms(cfg, (uint32_t)strtoul(optarg, 0, 0)); break;
        case 'c': tf_config_set_max_connections(cfg, (uint32_t)strtoul(optarg, 0, 0)); break;
        case 'Q': tf_config_set_max_queued_output(cfg, strtoull(optarg, 0, 0)); break;
        case 'B':
#ifdef TF_CLOSE_OVERLOAD
            tf_config_set_max_buffered(cfg, strtoull(optarg, 0, 0));
            break;
#else
            fprintf(stderr, "rthost: -B: this library has no tf_config_set_max_buffered\n");
            return 2;
#endif
        case 'b': tf_config_set_backend(cfg, atoi(optarg)); break;
        case 's': sink = 1; break;
        case 'a': tf_config_set_address(cfg, optarg); break;
        case 'n': {
            struct rlimit rl = {strtoul(optarg, 0, 0), strtoul(optarg, 0, 0)};
            setrlimit(RLIMIT_NOFILE, &rl);
            break;
        }
        default: return 2;
        }
    }
    tf_callbacks cb = {NULL, NULL, on_message, on_close};
    if (tf_server_start(cfg, &cb, &srv) != TF_OK) {
        fprintf(stderr, "rthost: start: %s\n", tf_last_error());
        return 1;
    }
    tf_config_free(cfg);
    printf("%u\n", tf_server_port(srv));
    fflush(stdout);
    char buf[64];
    while (fgets(buf, sizeof buf, stdin)) {
        tf_stats s;
        tf_server_stats(srv, &s);
        printf("active=%" PRIu64 " accepted=%" PRIu64 " rejected=%" PRIu64 " frames_in=%" PRIu64
               " frames_out=%" PRIu64 " bytes_in=%" PRIu64 " rss_kib=%ld hwm_kib=%ld\n",
               s.connections_active, s.connections_accepted, s.connections_rejected, s.frames_received,
               s.frames_sent, s.bytes_received, status_kib("VmRSS:"), status_kib("VmHWM:"));
        fflush(stdout);
    }
    tf_server_stop(srv, 0);
    tf_server_free(srv);
    printf("closes peer=%llu local=%llu shutdown=%llu io=%llu toolarge=%llu idle=%llu overload=%llu other=%llu\n",
           closes[0], closes[1], closes[2], closes[3], closes[4], closes[5], closes[REASON_OVERLOAD],
           closes_other + closes[6] + closes[7] + closes[8] + closes[10] + closes[11] + closes[12] + closes[13] +
               closes[14] + closes[15]);
    return 0;
}
