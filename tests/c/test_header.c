/* test_header: the generated header stands alone and is warning-free C.
 * Built, linked and run by test_c_examples.py as C99 and C11 with
 * -Wall -Wextra -Wpedantic -Werror; test_header.cpp does the same for C++11.
 * The header is included FIRST, so it cannot lean on an earlier include. */
#include "tcpframe.h"

#include <stddef.h>

/* Every type and function the contract names, used with the types it gives. */
static int on_connect(void *ud, tf_conn_id conn, const char *peer) {
    (void)ud;
    (void)conn;
    (void)peer;
    return 0;
}
static void on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    (void)ud;
    (void)conn;
    (void)data;
    (void)len;
}
static void on_close(void *ud, tf_conn_id conn, int32_t reason) {
    (void)ud;
    (void)conn;
    (void)reason;
}
static void on_log(void *ud, int32_t level, const char *msg) {
    (void)ud;
    (void)level;
    (void)msg;
}

/* The numeric values are part of the contract. */
typedef char check_ok[(TF_OK == 0) ? 1 : -1];
typedef char check_invalid[(TF_ERR_INVALID == 1) ? 1 : -1];
typedef char check_no_conn[(TF_ERR_NO_CONN == 2) ? 1 : -1];
typedef char check_full[(TF_ERR_FULL == 3) ? 1 : -1];
typedef char check_too_large[(TF_ERR_TOO_LARGE == 4) ? 1 : -1];
typedef char check_stopped[(TF_ERR_STOPPED == 5) ? 1 : -1];
typedef char check_io[(TF_ERR_IO == 6) ? 1 : -1];
typedef char check_internal[(TF_ERR_INTERNAL == 7) ? 1 : -1];
typedef char check_close[(TF_CLOSE_PEER == 0 && TF_CLOSE_LOCAL == 1 && TF_CLOSE_SHUTDOWN == 2 &&
                          TF_CLOSE_IO == 3 && TF_CLOSE_TOO_LARGE == 4 && TF_CLOSE_IDLE == 5)
                             ? 1
                             : -1];
typedef char check_backend[(TF_BACKEND_AUTO == 0 && TF_BACKEND_POLL == 1 && TF_BACKEND_EPOLL == 2)
                               ? 1
                               : -1];
typedef char check_event[(TF_EVENT_CONNECT == 1 && TF_EVENT_MESSAGE == 2 && TF_EVENT_CLOSE == 3)
                             ? 1
                             : -1];
typedef char check_log[(TF_LOG_ERROR == 1 && TF_LOG_WARN == 2 && TF_LOG_INFO == 3 &&
                        TF_LOG_DEBUG == 4)
                           ? 1
                           : -1];
typedef char check_conn_id[(sizeof(tf_conn_id) == 8) ? 1 : -1];
typedef char check_stats[(sizeof(tf_stats) == 9 * 8) ? 1 : -1];

int header_uses_everything(void);
int header_uses_everything(void) {
    tf_callbacks cb = {NULL, on_connect, on_message, on_close};
    tf_stats st;
    tf_event ev;
    size_t count = 0;
    tf_server *srv = NULL;
    tf_config *cfg = tf_config_new();
    int32_t rc = tf_config_set_address(cfg, "127.0.0.1:0");
    rc |= tf_config_set_max_connections(cfg, 1u);
    rc |= tf_config_set_max_frame(cfg, 1u);
    rc |= tf_config_set_idle_timeout_ms(cfg, 0u);
    rc |= tf_config_set_max_queued_output(cfg, (uint64_t)1);
    rc |= tf_config_set_backend(cfg, TF_BACKEND_POLL);
    rc |= tf_config_set_log(cfg, on_log, NULL);
    rc |= tf_server_start(cfg, &cb, &srv);
    rc |= tf_server_start_pull(cfg, &srv);
    int fd = tf_server_fd(srv);
    rc |= tf_server_poll(srv, &ev, 1, &count, 0);
    uint16_t port = tf_server_port(srv);
    rc |= tf_send(srv, (tf_conn_id)1, (const uint8_t *)"x", 1);
    rc |= tf_conn_close(srv, (tf_conn_id)1);
    rc |= tf_server_stats(srv, &st);
    rc |= tf_server_stop(srv, 0u);
    tf_server_free(srv);
    tf_config_free(cfg);
    const char *e = tf_last_error();
    const char *v = tf_version();
    return (int)rc + fd + (int)port + (e != NULL) + (v != NULL) + ev.kind + ev.reason +
           (int)ev.len + (ev.data != NULL) + (int)ev.conn + (int)st.closed_idle;
}

/* Linked and run too: every declaration resolves against the real library. */
int main(void) {
    int (*keep)(void) = header_uses_everything; /* linked, not called */
    const char *v = tf_version();
    return keep != NULL && v != NULL && v[0] != '\0' ? 0 : 1;
}
