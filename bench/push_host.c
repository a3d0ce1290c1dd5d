/* push_host.c — tcpframe benchmark host for scenario 7 (tf_send from a host thread).
 *
 *   push_host [-b auto|poll|epoll] [-n MAX_FRAMES] [-s SIZE] [ADDRESS]   (default 127.0.0.1:0)
 *
 * When a client connects, a separate host thread (not the loop thread) pushes
 * frames to it with tf_send as fast as the library takes them, retrying after a
 * short sleep on TF_ERR_FULL. Frame k (k = 0, 1, ...) has SIZE bytes (default 64,
 * at least 8): bytes 0..7 hold k little-endian, byte i >= 8 is (k*7 + i*13) & 0xff,
 * so the load generator can verify every byte. The pusher stops after MAX_FRAMES
 * (default 100,000,000), when the connection closes (TF_ERR_NO_CONN), when the
 * server stops, or after 120 s, whichever comes first. Messages from clients are
 * ignored. Prints "listening on port N"; SIGINT/SIGTERM stop it. */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static tf_server *g_srv;     /* guarded by g_mu */
static int g_published;      /* guarded by g_mu */
static uint64_t g_max_frames = 100000000ull;
static size_t g_size = 64;
static int g_pushers;        /* running pusher threads, guarded by g_mu */

static tf_server *server(void) {
    pthread_mutex_lock(&g_mu);
    while (!g_published)
        pthread_cond_wait(&g_cv, &g_mu);
    tf_server *s = g_srv;
    pthread_mutex_unlock(&g_mu);
    return s;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *pusher(void *arg) {
    tf_conn_id conn = (tf_conn_id)(uintptr_t)arg;
    tf_server *srv = server();
    uint8_t *buf = srv ? malloc(g_size) : NULL;
    if (!buf) {
        pthread_mutex_lock(&g_mu);
        g_pushers--;
        pthread_mutex_unlock(&g_mu);
        return NULL;
    }
    uint64_t full_retries = 0, k = 0;
    double deadline = now_s() + 120.0;
    struct timespec nap = {0, 20000}; /* 20 us */
    for (; k < g_max_frames; k++) {
        for (int i = 0; i < 8; i++)
            buf[i] = (uint8_t)(k >> (8 * i));
        for (size_t i = 8; i < g_size; i++)
            buf[i] = (uint8_t)(k * 7 + i * 13);
        int32_t rc;
        for (;;) {
            rc = tf_send(srv, conn, buf, g_size);
            if (rc != TF_ERR_FULL)
                break;
            full_retries++;
            if ((full_retries & 1023) == 0 && now_s() > deadline)
                break;
            nanosleep(&nap, NULL);
        }
        if (rc != TF_OK)
            break;
        if ((k & 65535) == 0 && now_s() > deadline)
            break;
    }
    free(buf);
    pthread_mutex_lock(&g_mu);
    g_pushers--;
    pthread_mutex_unlock(&g_mu);
    fprintf(stderr, "push_host: conn %" PRIu64 ": pushed %" PRIu64 " frames, %" PRIu64 " TF_ERR_FULL retries\n",
            conn, k, full_retries);
    return NULL;
}

static int on_connect(void *ud, tf_conn_id conn, const char *peer) {
    (void)ud;
    (void)peer;
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_mutex_lock(&g_mu);
    g_pushers++;
    pthread_mutex_unlock(&g_mu);
    int rc = pthread_create(&t, &at, pusher, (void *)(uintptr_t)conn);
    pthread_attr_destroy(&at);
    if (rc != 0) {
        pthread_mutex_lock(&g_mu);
        g_pushers--;
        pthread_mutex_unlock(&g_mu);
    }
    return rc == 0 ? 0 : 1;
}

static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    (void)ud; (void)conn; (void)data; (void)len;
}

int main(int argc, char **argv) {
    int32_t backend = TF_BACKEND_AUTO;
    int opt;
    while ((opt = getopt(argc, argv, "b:n:s:")) != -1) {
        switch (opt) {
        case 'b':
            backend = !strcmp(optarg, "poll") ? TF_BACKEND_POLL : !strcmp(optarg, "epoll") ? TF_BACKEND_EPOLL : TF_BACKEND_AUTO;
            break;
        case 'n': g_max_frames = strtoull(optarg, NULL, 10); break;
        case 's': g_size = (size_t)strtoul(optarg, NULL, 10); break;
        default:
            fprintf(stderr, "usage: push_host [-b auto|poll|epoll] [-n MAX_FRAMES] [-s SIZE] [ADDRESS]\n");
            return 2;
        }
    }
    if (g_size < 8) g_size = 8;
    const char *addr = optind < argc ? argv[optind] : "127.0.0.1:0";

    /* Block the stop signals in every thread (the loop thread inherits the mask);
       main collects them with sigwait. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    tf_config *cfg = tf_config_new();
    if (!cfg || tf_config_set_address(cfg, addr) != TF_OK || tf_config_set_backend(cfg, backend) != TF_OK) {
        fprintf(stderr, "push_host: config: %s\n", tf_last_error());
        return 2;
    }
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.on_connect = on_connect;
    cb.on_message = on_message;
    tf_server *srv = NULL;
    int32_t rc = tf_server_start(cfg, &cb, &srv);
    tf_config_free(cfg);
    pthread_mutex_lock(&g_mu);
    g_srv = rc == TF_OK ? srv : NULL;
    g_published = 1;
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
    if (rc != TF_OK) {
        fprintf(stderr, "push_host: start: %s\n", tf_last_error());
        return 1;
    }
    printf("listening on port %u\n", (unsigned)tf_server_port(srv));
    fflush(stdout);
    int sig = 0;
    sigwait(&set, &sig);
    tf_server_stop(srv, 0);
    /* Pushers see TF_ERR_STOPPED and end; wait (bounded) for them before freeing. */
    for (int i = 0; i < 200; i++) {
        pthread_mutex_lock(&g_mu);
        int n = g_pushers;
        pthread_mutex_unlock(&g_mu);
        if (n == 0)
            break;
        usleep(10000);
    }
    tf_server_free(srv);
    return 0;
}
