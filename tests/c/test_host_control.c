/* test_host_control: per-connection control and batched delivery, through the
 * C API, over real sockets on 127.0.0.1 (API.md, "Per-connection control" and
 * "Batched delivery and sends"): user data, pause/resume, on_writable and
 * TF_EVENT_WRITABLE, tf_sendv, tf_send_many, the slow-consumer policy,
 * tf_conn_get_info, on_messages, tf_send_batch, tf_events_pack, tf_send_packed.
 *
 *   TF_TEST_BACKEND=poll|epoll test_host_control [--list] [NAME...]
 *
 * One line per test ("ok"/"FAIL"), a summary, exit status 0 only if all passed.
 * Run by test_c_host_control.py on both backends, under valgrind and ASan. */
#include "robust.h"

/* ---- a configurable recording host ----------------------------------------------- */

#define MSG_MAX 8192
#define MSG_KEEP 48 /* payload bytes kept per recorded message */

static struct hc {
    tf_server *srv;
    /* behaviour */
    int set_ud_in_connect; /* on_connect: user data = tagp(conn) */
    int refuse;            /* on_connect: refuse (after the user data was set) */
    int pause_at_pause;    /* on_message: pause the sender at the payload "pause" */
    int echo;              /* on_message: tf_send back */
    int sleep_at_sleep;    /* on_message: sleep this many ms at the payload "sleep" */
    int sendv_echo;        /* on_message: tf_sendv("echo:", data) back */
    int broadcast;         /* on_message: tf_send_many to every connection seen */
    int batch_echo;        /* on_messages: echo every event with tf_send_batch */
    int batch_pause;       /* on_messages: pause at the payload "pause" */
    int resume_at_go;      /* on_message: at the payload "go", resume paused_conn */
    /* records (under g_mu) */
    int connects, closes, messages, writables, batches, busy;
    tf_conn_id conn[LIST_MAX];
    void *ud_in_connect[LIST_MAX];
    int32_t set_rc_in_connect[LIST_MAX];
    tf_conn_id closed[LIST_MAX];
    int32_t reason[LIST_MAX];
    void *ud_at_close[LIST_MAX];
    tf_conn_id wr_conn[LIST_MAX];
    uint64_t wr_queued[LIST_MAX];
    int batch_size[LIST_MAX];
    int bad_batch; /* an on_messages call with count 0, or an event not a MESSAGE */
    int cb_errors; /* a call inside a callback returned what it should not */
    tf_conn_id msg_conn[MSG_MAX];
    size_t msg_len[MSG_MAX];
    uint8_t msg[MSG_MAX][MSG_KEEP];
    void *ud_at_msg[MSG_MAX];
    int msg_while_paused; /* on_message for a connection this host had paused */
    tf_conn_id paused_conn;
} H;

static void *tagp(uint64_t n) { return (void *)(uintptr_t)(0x100000u + n * 16u); }

static void record_msg(tf_conn_id c, const uint8_t *d, size_t n) {
    void *ud = tf_conn_user_data(H.srv, c);
    LOCKED(if (H.messages < MSG_MAX) {
        H.msg_conn[H.messages] = c;
        H.msg_len[H.messages] = n;
        if (n)
            memcpy(H.msg[H.messages], d, n < MSG_KEEP ? n : MSG_KEEP);
        H.ud_at_msg[H.messages] = ud;
    } H.messages++);
}

static int hc_connect(void *u, tf_conn_id c, const char *peer) {
    (void)u, (void)peer;
    int32_t rc = TF_OK;
    void *back = NULL;
    if (H.set_ud_in_connect) {
        rc = tf_conn_set_user_data(H.srv, c, tagp(c));
        back = tf_conn_user_data(H.srv, c);
    }
    LOCKED(if (H.connects < LIST_MAX) {
        H.conn[H.connects] = c;
        H.ud_in_connect[H.connects] = back;
        H.set_rc_in_connect[H.connects] = rc;
    } H.connects++);
    return H.refuse ? 1 : 0;
}

static int is(const uint8_t *d, size_t n, const char *text) {
    return n == strlen(text) && memcmp(d, text, n) == 0;
}

static void hc_message(void *u, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)u;
    pthread_mutex_lock(&g_mu);
    int late = H.paused_conn == c;
    pthread_mutex_unlock(&g_mu);
    if (late)
        LOCKED(H.msg_while_paused++);
    record_msg(c, d, n);
    if (H.pause_at_pause && is(d, n, "pause")) {
        LOCKED(H.paused_conn = c);
        if (tf_conn_pause(H.srv, c) != TF_OK)
            LOCKED(H.cb_errors++);
    }
    if (H.resume_at_go && is(d, n, "go")) {
        pthread_mutex_lock(&g_mu);
        tf_conn_id target = H.paused_conn;
        H.paused_conn = 0;
        pthread_mutex_unlock(&g_mu);
        if (tf_conn_resume(H.srv, target) != TF_OK)
            LOCKED(H.cb_errors++);
    }
    if (H.sleep_at_sleep && is(d, n, "sleep")) {
        LOCKED(H.busy = 1);
        sleep_ms(H.sleep_at_sleep);
        LOCKED(H.busy = 0);
    }
    if (H.echo && tf_send(H.srv, c, d, n) != TF_OK)
        LOCKED(H.cb_errors++);
    if (H.sendv_echo) {
        tf_iovec iov[2] = {{(const uint8_t *)"echo:", 5}, {d, n}};
        if (tf_sendv(H.srv, c, iov, 2) != TF_OK)
            LOCKED(H.cb_errors++);
    }
    if (H.broadcast) {
        tf_conn_id ids[LIST_MAX];
        size_t k = 0, queued = 0;
        pthread_mutex_lock(&g_mu);
        for (int i = 0; i < H.connects && i < LIST_MAX; i++)
            ids[k++] = H.conn[i];
        pthread_mutex_unlock(&g_mu);
        if (tf_send_many(H.srv, ids, k, d, n, &queued) != TF_OK || queued != k)
            LOCKED(H.cb_errors++);
    }
}

static void hc_messages(void *u, const tf_event *ev, size_t count) {
    (void)u;
    int bad = count == 0;
    for (size_t i = 0; i < count; i++)
        bad |= ev[i].kind != TF_EVENT_MESSAGE || ev[i].reason != 0 || (ev[i].len && !ev[i].data);
    /* The batch is recorded before its frames: a test that saw the last
       frame counted sees every batch too. */
    LOCKED(if (H.batches < LIST_MAX) H.batch_size[H.batches] = (int)count;
           H.batches++; H.bad_batch |= bad);
    for (size_t i = 0; i < count; i++) {
        record_msg(ev[i].conn, ev[i].data, ev[i].len);
        if (H.batch_pause && is(ev[i].data, ev[i].len, "pause") &&
            tf_conn_pause(H.srv, ev[i].conn) != TF_OK)
            LOCKED(H.cb_errors++);
    }
    if (H.batch_echo && count) {
        tf_out *outs = calloc(count, sizeof *outs);
        if (outs == NULL)
            abort();
        for (size_t i = 0; i < count; i++) {
            outs[i].conn = ev[i].conn;
            outs[i].data = ev[i].data;
            outs[i].len = ev[i].len;
            outs[i].result = -7;
        }
        int32_t rc = tf_send_batch(H.srv, outs, count);
        for (size_t i = 0; i < count; i++)
            if (outs[i].result != TF_OK)
                rc = -1;
        free(outs);
        if (rc != TF_OK)
            LOCKED(H.cb_errors++);
    }
}

static void hc_close(void *u, tf_conn_id c, int32_t reason) {
    (void)u;
    void *ud = tf_conn_user_data(H.srv, c);
    LOCKED(if (H.closes < LIST_MAX) {
        H.closed[H.closes] = c;
        H.reason[H.closes] = reason;
        H.ud_at_close[H.closes] = ud;
    } H.closes++);
}

static void hc_writable(void *u, tf_conn_id c) {
    (void)u;
    tf_conn_info info;
    uint64_t q = tf_conn_get_info(H.srv, c, &info) == TF_OK ? info.queued_output : UINT64_MAX;
    LOCKED(if (H.writables < LIST_MAX) {
        H.wr_conn[H.writables] = c;
        H.wr_queued[H.writables] = q;
    } H.writables++);
}

enum { PLAIN = 0, WRITABLE = 1, BATCHED = 2 };

/* Starts H's server with cfg (NULL: cfg_new()), freed here. */
static tf_server *hc_start(tf_config *cfg, int mode) {
    if (cfg == NULL)
        cfg = cfg_new();
    if (cfg == NULL)
        return NULL;
    tf_callbacks cb = {NULL, hc_connect, (mode & BATCHED) ? NULL : hc_message, hc_close};
    if (mode & WRITABLE)
        CHECK_RC(tf_config_set_on_writable(cfg, hc_writable), TF_OK);
    if (mode & BATCHED)
        CHECK_RC(tf_config_set_on_messages(cfg, hc_messages), TF_OK);
    int32_t rc = tf_server_start(cfg, &cb, &H.srv);
    if (rc != TF_OK) {
        fprintf(stderr, "    tf_server_start: %d %s\n", (int)rc, tf_last_error());
        H.srv = NULL;
    }
    tf_config_free(cfg);
    return H.srv;
}

static tf_config *cfg_queued(uint64_t max_queued) {
    tf_config *cfg = cfg_new();
    if (cfg && tf_config_set_max_queued_output(cfg, max_queued) != TF_OK) {
        tf_config_free(cfg);
        return NULL;
    }
    return cfg;
}

static void hc_reset(void) {
    memset(&H, 0, sizeof H);
}

/* Connects (rcvbuf > 0: a small receive buffer) and waits for on_connect;
 * returns the fd and sets *id. */
static int hc_connect_peer(int rcvbuf, tf_conn_id *id) {
    int ok, before;
    pthread_mutex_lock(&g_mu);
    before = H.connects;
    pthread_mutex_unlock(&g_mu);
    int fd = cli_connect_rcvbuf(tf_server_port(H.srv), rcvbuf);
    if (fd < 0)
        return -1;
    WAIT_FOR(H.connects > before, SC(5000), ok);
    if (!ok) {
        close(fd);
        return -1;
    }
    pthread_mutex_lock(&g_mu);
    *id = H.conn[before];
    pthread_mutex_unlock(&g_mu);
    return fd;
}

static int32_t close_reason_of(tf_conn_id c) {
    int32_t r = -1;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < H.closes && i < LIST_MAX; i++)
        if (H.closed[i] == c)
            r = H.reason[i];
    pthread_mutex_unlock(&g_mu);
    return r;
}

static int wait_close_of(tf_conn_id c, int ms) {
    double end = now_ms() + ms;
    while (close_reason_of(c) < 0 && now_ms() < end)
        sleep_ms(2);
    return close_reason_of(c);
}

static int messages_now(void) {
    pthread_mutex_lock(&g_mu);
    int n = H.messages;
    pthread_mutex_unlock(&g_mu);
    return n;
}

static int writables_now(void) {
    pthread_mutex_lock(&g_mu);
    int n = H.writables;
    pthread_mutex_unlock(&g_mu);
    return n;
}

/* 1 when messages_now() stays n for ms. */
static int messages_stay(int n, int ms) {
    double end = now_ms() + ms;
    while (now_ms() < end) {
        if (messages_now() != n)
            return 0;
        sleep_ms(5);
    }
    return messages_now() == n;
}

/* 1 when message i is exactly text from conn c. */
static int msg_is(int i, tf_conn_id c, const char *text) {
    pthread_mutex_lock(&g_mu);
    int ok = i < H.messages && H.msg_conn[i] == c && H.msg_len[i] == strlen(text) &&
             memcmp(H.msg[i], text, strlen(text)) == 0;
    pthread_mutex_unlock(&g_mu);
    return ok;
}

static tf_conn_info info_of(tf_server *srv, tf_conn_id c, int32_t *rc) {
    tf_conn_info i;
    memset(&i, 0x55, sizeof i);
    *rc = tf_conn_get_info(srv, c, &i);
    return i;
}

static uint64_t queued_of(tf_server *srv, tf_conn_id c) {
    int32_t rc;
    tf_conn_info i = info_of(srv, c, &rc);
    return rc == TF_OK ? i.queued_output : UINT64_MAX;
}

static int paused_of(tf_server *srv, tf_conn_id c) {
    int32_t rc;
    tf_conn_info i = info_of(srv, c, &rc);
    return rc == TF_OK ? i.paused : -1;
}

static int wait_paused(tf_server *srv, tf_conn_id c, int want, int ms) {
    double end = now_ms() + ms;
    while (paused_of(srv, c) != want && now_ms() < end)
        sleep_ms(2);
    return paused_of(srv, c) == want;
}

/* Reads one frame into buf (at most cap bytes); its length, or -1. */
static long read_frame_fd(int fd, uint8_t *buf, size_t cap) {
    uint8_t p[4];
    if (recv_all(fd, p, 4) != 0)
        return -1;
    uint32_t n = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    if (n > cap || (n && recv_all(fd, buf, n) != 0))
        return -1;
    return (long)n;
}

/* 1 when the next frame is exactly data/len. */
static int expect_bytes(int fd, const void *data, size_t len) {
    static uint8_t buf[1 << 20];
    long n = read_frame_fd(fd, buf, sizeof buf);
    return n == (long)len && (len == 0 || memcmp(buf, data, len) == 0);
}

/* Reads and discards exactly n bytes. */
static int drain_n(int fd, size_t n) {
    static uint8_t buf[1 << 16];
    while (n > 0) {
        size_t k = n < sizeof buf ? n : sizeof buf;
        if (recv_all(fd, buf, k) != 0)
            return -1;
        n -= k;
    }
    return 0;
}

static uint8_t CHUNK[16 * 1024];

/* 16 KiB frames for a peer that does not read, never past half of limit (no
 * TF_ERR_FULL), until the kernel's buffers stay full; the bytes queued. */
static size_t saturate(tf_server *srv, tf_conn_id c, uint64_t limit) {
    size_t total = 0;
    int stable = 0;
    uint64_t last = UINT64_MAX;
    double end = now_ms() + SC(10000);
    while (stable < 25 && now_ms() < end) {
        uint64_t q = queued_of(srv, c);
        if (q + 4 + sizeof CHUNK <= limit / 2) {
            if (tf_send(srv, c, CHUNK, sizeof CHUNK) != TF_OK)
                break;
            total += 4 + sizeof CHUNK;
            stable = 0;
            last = UINT64_MAX;
            continue;
        }
        if (q == last)
            stable++;
        else
            stable = 0, last = q;
        sleep_ms(10 * g_scale);
    }
    return total;
}

/* tf_send of CHUNK until TF_ERR_FULL; the bytes queued. */
static size_t fill_full(tf_server *srv, tf_conn_id c) {
    size_t total = 0;
    int32_t rc;
    while ((rc = tf_send(srv, c, CHUNK, sizeof CHUNK)) == TF_OK && total < (1u << 30))
        total += 4 + sizeof CHUNK;
    CHECK_RC(rc, TF_ERR_FULL);
    return total;
}

static void stop_free(void) {
    if (H.srv) {
        tf_server_stop(H.srv, 0);
        tf_server_free(H.srv);
    }
    H.srv = NULL;
}

/* ---- user data ------------------------------------------------------------------- */

static void test_user_data_set_get_clear_and_codes(void) {
    int fd = -1;
    tf_conn_id id = 0;
    hc_reset();
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK(tf_conn_user_data(H.srv, id) == NULL);
    CHECK_RC(tf_conn_set_user_data(H.srv, id, tagp(1)), TF_OK);
    CHECK(tf_conn_user_data(H.srv, id) == tagp(1));
    CHECK_RC(tf_conn_set_user_data(H.srv, id, tagp(2)), TF_OK);
    CHECK(tf_conn_user_data(H.srv, id) == tagp(2));
    CHECK_RC(tf_conn_set_user_data(H.srv, id, NULL), TF_OK);
    CHECK(tf_conn_user_data(H.srv, id) == NULL);
    CHECK_RC(tf_conn_set_user_data(H.srv, id + 1000, tagp(1)), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_set_user_data(H.srv, 0, tagp(1)), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_set_user_data(NULL, id, tagp(1)), TF_ERR_INVALID);
    CHECK(tf_conn_user_data(H.srv, id + 1000) == NULL);
    CHECK(tf_conn_user_data(NULL, id) == NULL);
done:
    close_fd(&fd);
    stop_free();
}

static void test_user_data_seen_by_callbacks_and_on_close_then_null(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    hc_reset();
    H.set_ud_in_connect = 1;
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK(H.ud_in_connect[0] == tagp(id) && H.set_rc_in_connect[0] == TF_OK);
    CHECK(tf_conn_user_data(H.srv, id) == tagp(id)); /* from this (another) thread */
    REQUIRE(send_frame(fd, "x", 1) == 0);
    WAIT_FOR(H.messages == 1, SC(5000), ok);
    REQUIRE(ok);
    CHECK(H.ud_at_msg[0] == tagp(id));
    CHECK_RC(tf_conn_set_user_data(H.srv, id, tagp(99)), TF_OK); /* host thread sets */
    REQUIRE(send_frame(fd, "y", 1) == 0);
    WAIT_FOR(H.messages == 2, SC(5000), ok);
    CHECK(ok && H.ud_at_msg[1] == tagp(99)); /* the loop sees it */
    close_fd(&fd);
    CHECK(wait_close_of(id, SC(5000)) == TF_CLOSE_PEER);
    CHECK(H.ud_at_close[0] == tagp(99)); /* on_close may free it */
    double end = now_ms() + SC(2000);
    while (tf_conn_user_data(H.srv, id) != NULL && now_ms() < end)
        sleep_ms(2);
    CHECK(tf_conn_user_data(H.srv, id) == NULL);
    CHECK_RC(tf_conn_set_user_data(H.srv, id, tagp(5)), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_resume(H.srv, id), TF_ERR_NO_CONN);
    int32_t rc;
    (void)info_of(H.srv, id, &rc);
    CHECK_RC(rc, TF_ERR_NO_CONN);
done:
    close_fd(&fd);
    stop_free();
}

static void test_user_data_set_in_refusing_on_connect_is_forgotten(void) {
    int fd = -1, ok;
    hc_reset();
    H.set_ud_in_connect = 1;
    H.refuse = 1;
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = cli_connect(tf_server_port(H.srv))) >= 0);
    WAIT_FOR(H.connects == 1, SC(5000), ok);
    REQUIRE(ok);
    tf_conn_id id = H.conn[0];
    CHECK(H.set_rc_in_connect[0] == TF_OK && H.ud_in_connect[0] == tagp(id));
    CHECK(peer_end(fd, SC(5000)) != 0);
    CHECK(tf_conn_user_data(H.srv, id) == NULL);
    CHECK_RC(tf_conn_set_user_data(H.srv, id, tagp(4)), TF_ERR_NO_CONN);
    sleep_ms(100);
    pthread_mutex_lock(&g_mu);
    CHECK(H.closes == 0); /* no on_close: the host freed its pointer in on_connect */
    pthread_mutex_unlock(&g_mu);
done:
    close_fd(&fd);
    stop_free();
}

/* Threads setting and reading their own connection's pointer while the loop
 * reads it on every frame: always a value set for that connection. */
struct ud_worker {
    tf_conn_id id;
    int fd, bad;
};

static void *ud_worker_main(void *arg) {
    struct ud_worker *w = arg;
    for (uintptr_t k = 1; k <= 20000; k++) {
        void *p = (void *)((uintptr_t)w->id << 32 | k);
        if (tf_conn_set_user_data(H.srv, w->id, p) != TF_OK)
            w->bad++;
        if ((uintptr_t)tf_conn_user_data(H.srv, w->id) >> 32 != w->id)
            w->bad++;
        if (k % 100 == 0 && send_frame(w->fd, "tick", 4) != 0)
            w->bad++;
    }
    return NULL;
}

static void test_user_data_under_concurrent_threads(void) {
    struct ud_worker w[4];
    pthread_t t[4];
    int ok;
    hc_reset();
    memset(w, 0, sizeof w);
    for (int i = 0; i < 4; i++)
        w[i].fd = -1;
    REQUIRE(sizeof(void *) == 8);
    REQUIRE(hc_start(NULL, PLAIN));
    for (int i = 0; i < 4; i++)
        REQUIRE((w[i].fd = hc_connect_peer(0, &w[i].id)) >= 0);
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, ud_worker_main, &w[i]);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    WAIT_FOR(H.messages >= 800, SC(10000), ok);
    CHECK(ok);
    pthread_mutex_lock(&g_mu);
    int wrong = 0;
    for (int i = 0; i < H.messages && i < MSG_MAX; i++)
        if (H.ud_at_msg[i] && (uintptr_t)H.ud_at_msg[i] >> 32 != H.msg_conn[i])
            wrong++;
    pthread_mutex_unlock(&g_mu);
    CHECKF(wrong == 0, "%d frames saw another connection's pointer", wrong);
    for (int i = 0; i < 4; i++)
        CHECKF(w[i].bad == 0, "worker %d: %d bad results", i, w[i].bad);
done:
    for (int i = 0; i < 4; i++)
        close_fd(&w[i].fd);
    stop_free();
}

/* A stop closes both connections in one pass: during on_close(B), A's on_close
 * has returned, so A's user data must be gone (NULL, setter TF_ERR_NO_CONN). */
static struct {
    tf_server *srv;
    tf_conn_id first;
    int closes;
    void *seen;
    int32_t set_rc;
} UC;

static void uc_close(void *u, tf_conn_id c, int32_t reason) {
    (void)u, (void)reason;
    if (UC.closes == 1) {
        UC.seen = tf_conn_user_data(UC.srv, UC.first);
        UC.set_rc = tf_conn_set_user_data(UC.srv, UC.first, tagp(77));
    } else {
        UC.first = c;
    }
    UC.closes++;
}

static void test_user_data_is_gone_once_its_on_close_returned(void) {
    int a = -1, b = -1;
    memset(&UC, 0, sizeof UC);
    tf_callbacks cb = {NULL, NULL, host_on_message, uc_close};
    struct host dummy;
    memset(&dummy, 0, sizeof dummy);
    cb.user_data = &dummy;
    REQUIRE(start_cb(NULL, &cb, &UC.srv));
    REQUIRE((a = cli_connect(tf_server_port(UC.srv))) >= 0);
    REQUIRE((b = cli_connect(tf_server_port(UC.srv))) >= 0);
    REQUIRE(wait_active(UC.srv, 2, SC(5000)));
    /* ids are 1 and 2 in a fresh server */
    CHECK_RC(tf_conn_set_user_data(UC.srv, 1, tagp(1)), TF_OK);
    CHECK_RC(tf_conn_set_user_data(UC.srv, 2, tagp(2)), TF_OK);
    CHECK_RC(tf_server_stop(UC.srv, 0), TF_OK);
    CHECK(UC.closes == 2);
    CHECKF(UC.seen == NULL && UC.set_rc == TF_ERR_NO_CONN,
           "during the second on_close, the first connection (%" PRIu64 ", on_close returned) "
           "still had user data %p and the setter returned %d",
           UC.first, UC.seen, (int)UC.set_rc);
done:
    close_fd(&a);
    close_fd(&b);
    tf_server_free(UC.srv);
}

/* ---- pause / resume ----------------------------------------------------------------- */

static void test_pause_in_on_message_holds_frames_already_read(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    uint8_t wire[256];
    size_t n = 0;
    hc_reset();
    H.pause_at_pause = 1;
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    /* ten frames in one segment: "pause", "f1".."f9" */
    put_le32(wire, 5);
    memcpy(wire + 4, "pause", 5);
    n = 9;
    for (int i = 1; i < 10; i++) {
        put_le32(wire + n, 2);
        wire[n + 4] = 'f';
        wire[n + 5] = (uint8_t)('0' + i);
        n += 6;
    }
    REQUIRE(send_all(fd, wire, n) == 0);
    WAIT_FOR(H.messages >= 1, SC(5000), ok);
    REQUIRE(ok);
    CHECKF(messages_stay(1, 300), "%d frames delivered after the pause", messages_now());
    CHECK(paused_of(H.srv, id) == 1);
    LOCKED(H.paused_conn = 0);
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK);
    WAIT_FOR(H.messages == 10, SC(5000), ok);
    CHECK(ok);
    CHECK(msg_is(0, id, "pause"));
    for (int i = 1; i < 10; i++) {
        char want[3] = {'f', (char)('0' + i), 0};
        CHECKF(msg_is(i, id, want), "message %d is not %s", i, want);
    }
    CHECK(H.msg_while_paused == 0);
done:
    close_fd(&fd);
    stop_free();
}

static void *resume_later(void *arg) {
    tf_conn_id id = *(tf_conn_id *)arg;
    sleep_ms(200);
    LOCKED(H.paused_conn = 0);
    (void)tf_conn_resume(H.srv, id);
    return NULL;
}

static void test_pause_and_resume_from_another_thread(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    pthread_t t;
    hc_reset();
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_OK);
    REQUIRE(wait_paused(H.srv, id, 1, SC(2000)));
    for (int i = 0; i < 5; i++) {
        char m[3] = {'h', (char)('0' + i), 0};
        REQUIRE(send_frame(fd, m, 2) == 0);
    }
    CHECK(messages_stay(0, 300));
    pthread_create(&t, NULL, resume_later, &id);
    pthread_join(t, NULL);
    WAIT_FOR(H.messages == 5, SC(5000), ok);
    CHECK(ok);
    for (int i = 0; i < 5; i++) {
        char m[3] = {'h', (char)('0' + i), 0};
        CHECK(msg_is(i, id, m));
    }
done:
    close_fd(&fd);
    stop_free();
}

static void test_pause_applies_tcp_backpressure(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    uint8_t *wire = NULL;
    const size_t frames = 16384, fsz = 4096; /* 64 MiB */
    size_t written = 0, len = frames * fsz;
    hc_reset();
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_OK);
    REQUIRE(wait_paused(H.srv, id, 1, SC(2000)));
    REQUIRE((wire = malloc(len)) != NULL);
    for (size_t i = 0; i < frames; i++) {
        put_le32(wire + i * fsz, (uint32_t)(fsz - 4));
        memset(wire + i * fsz + 4, (int)(i & 0xff), fsz - 4);
    }
    for (int tries = 0;;) {
        ssize_t n = send(fd, wire + written, len - written, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            written += (size_t)n;
            tries = 0;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (++tries == 3)
                break; /* blocked, and still blocked 100 ms later */
            sleep_ms(50);
        } else {
            REQUIRE(0);
        }
        REQUIRE(written < len); /* 64 MiB through a paused connection: no backpressure */
    }
    int32_t rc;
    uint64_t before = info_of(H.srv, id, &rc).bytes_received;
    tf_stats st1, st2;
    tf_server_stats(H.srv, &st1);
    sleep_ms(300);
    tf_server_stats(H.srv, &st2);
    CHECKF(info_of(H.srv, id, &rc).bytes_received == before, "the server went on reading");
    CHECK(st1.bytes_received == st2.bytes_received);
    CHECKF(before < written, "read %" PRIu64 " of %zu bytes while paused", before, written);
    CHECK(messages_now() == 0);
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK);
    REQUIRE(send_all(fd, wire + written, len - written) == 0);
    WAIT_FOR(H.messages == (int)frames, SC(20000), ok);
    CHECKF(ok, "%d of %zu frames after resume", messages_now(), frames);
    pthread_mutex_lock(&g_mu);
    int order = 1;
    for (int i = 0; i < H.messages && i < MSG_MAX; i++)
        order &= H.msg[i][0] == (uint8_t)(i & 0xff);
    pthread_mutex_unlock(&g_mu);
    CHECK(order);
done:
    free(wire);
    close_fd(&fd);
    stop_free();
}

static void test_pause_suspends_the_idle_timeout(void) {
    int fd = -1;
    tf_conn_id id = 0;
    tf_config *cfg = cfg_new();
    hc_reset();
    REQUIRE(cfg && tf_config_set_idle_timeout_ms(cfg, 300) == TF_OK);
    REQUIRE(hc_start(cfg, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_OK);
    sleep_ms(1200);
    CHECKF(close_reason_of(id) < 0, "closed while paused (reason %d)", (int)close_reason_of(id));
    double t0 = now_ms();
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK);
    CHECK(wait_close_of(id, SC(5000)) == TF_CLOSE_IDLE);
    CHECKF(now_ms() - t0 >= 250, "closed %.0f ms after resume", now_ms() - t0);
done:
    close_fd(&fd);
    stop_free();
}

static void test_pause_resume_idempotent_and_codes(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    hc_reset();
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK); /* never paused */
    CHECK_RC(tf_conn_pause(H.srv, id), TF_OK);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_OK);
    REQUIRE(wait_paused(H.srv, id, 1, SC(2000)));
    REQUIRE(send_frame(fd, "held", 4) == 0);
    CHECK(messages_stay(0, 200));
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK); /* one resume ends both pauses */
    WAIT_FOR(H.messages == 1, SC(5000), ok);
    CHECK(ok);
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK);
    CHECK_RC(tf_conn_pause(H.srv, id + 100), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_resume(H.srv, 0), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_pause(NULL, id), TF_ERR_INVALID);
    CHECK_RC(tf_conn_resume(NULL, id), TF_ERR_INVALID);
    CHECK_RC(tf_server_stop(H.srv, 0), TF_OK);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_ERR_STOPPED);
    CHECK_RC(tf_conn_resume(H.srv, id), TF_ERR_STOPPED);
done:
    close_fd(&fd);
    stop_free();
}

static void test_pause_then_resume_from_another_connections_callback(void) {
    /* A: "pause" then a0..a2 (held). B: "go": B's on_message resumes A (a
     * resume on the loop thread, from another connection's callback). */
    int a = -1, b = -1, ok;
    tf_conn_id ia = 0, ib = 0;
    hc_reset();
    H.pause_at_pause = 1;
    H.resume_at_go = 1;
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((a = hc_connect_peer(0, &ia)) >= 0);
    REQUIRE((b = hc_connect_peer(0, &ib)) >= 0);
    REQUIRE(send_frame(a, "pause", 5) == 0 && send_frame(a, "a0", 2) == 0 &&
            send_frame(a, "a1", 2) == 0 && send_frame(a, "a2", 2) == 0);
    WAIT_FOR(H.messages >= 1, SC(5000), ok);
    REQUIRE(ok);
    CHECK(messages_stay(1, 200));
    REQUIRE(send_frame(b, "go", 2) == 0);
    WAIT_FOR(H.messages == 5, SC(5000), ok);
    CHECK(ok);
    CHECK(msg_is(0, ia, "pause") && msg_is(1, ib, "go"));
    CHECK(msg_is(2, ia, "a0") && msg_is(3, ia, "a1") && msg_is(4, ia, "a2"));
    CHECK(H.cb_errors == 0 && H.msg_while_paused == 0);
done:
    close_fd(&a);
    close_fd(&b);
    stop_free();
}

static void test_conn_info_paused_is_set_when_pause_returns(void) {
    /* "paused: 1 between tf_conn_pause and tf_conn_resume": with the loop busy
     * in another connection's callback, a host thread's pause cannot have been
     * applied yet when tf_conn_get_info looks. */
    int a = -1, b = -1, ok;
    tf_conn_id ia = 0, ib = 0;
    hc_reset();
    H.sleep_at_sleep = 400;
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((a = hc_connect_peer(0, &ia)) >= 0);
    REQUIRE((b = hc_connect_peer(0, &ib)) >= 0);
    REQUIRE(send_frame(b, "sleep", 5) == 0);
    WAIT_FOR(H.busy, SC(5000), ok);
    REQUIRE(ok);
    CHECK_RC(tf_conn_pause(H.srv, ia), TF_OK);
    int after_pause = paused_of(H.srv, ia);
    WAIT_FOR(!H.busy, SC(5000), ok);
    REQUIRE(wait_paused(H.srv, ia, 1, SC(2000)));
    REQUIRE(send_frame(b, "sleep", 5) == 0);
    WAIT_FOR(H.busy, SC(5000), ok);
    REQUIRE(ok);
    CHECK_RC(tf_conn_resume(H.srv, ia), TF_OK);
    int after_resume = paused_of(H.srv, ia);
    CHECKF(after_pause == 1 && after_resume == 0,
           "paused right after tf_conn_pause returned: %d; right after tf_conn_resume: %d",
           after_pause, after_resume);
done:
    close_fd(&a);
    close_fd(&b);
    stop_free();
}

/* ---- on_writable --------------------------------------------------------------------- */

#define QMAX (4u << 20)

static void test_on_writable_once_when_queue_falls_to_half(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    hc_reset();
    REQUIRE(hc_start(cfg_queued(QMAX), WRITABLE));
    REQUIRE((fd = hc_connect_peer(4096, &id)) >= 0);
    size_t owed = saturate(H.srv, id, QMAX);
    owed += fill_full(H.srv, id);
    CHECK_RC(tf_send(H.srv, id, CHUNK, sizeof CHUNK), TF_ERR_FULL); /* same episode */
    sleep_ms(300);
    CHECKF(writables_now() == 0, "on_writable while still full");
    REQUIRE(drain_n(fd, owed) == 0);
    WAIT_FOR(H.writables >= 1, SC(5000), ok);
    CHECK(ok);
    sleep_ms(300);
    CHECKF(writables_now() == 1, "on_writable called %d times", writables_now());
    CHECK(H.wr_conn[0] == id);
    CHECKF(H.wr_queued[0] <= QMAX / 2, "%" PRIu64 " bytes queued at on_writable", H.wr_queued[0]);
    /* a second episode: a second call */
    owed = fill_full(H.srv, id);
    REQUIRE(drain_n(fd, owed) == 0);
    WAIT_FOR(H.writables >= 2, SC(5000), ok);
    CHECK(ok);
done:
    close_fd(&fd);
    stop_free();
}

static void test_on_writable_not_called_when_closed_first(void) {
    int fd = -1;
    tf_conn_id id = 0;
    hc_reset();
    REQUIRE(hc_start(cfg_queued(QMAX), WRITABLE));
    REQUIRE((fd = hc_connect_peer(4096, &id)) >= 0);
    size_t owed = saturate(H.srv, id, QMAX);
    owed += fill_full(H.srv, id);
    CHECK_RC(tf_conn_close(H.srv, id), TF_OK);
    REQUIRE(drain_n(fd, owed) == 0); /* the queue drains past half while closing */
    CHECK(peer_end(fd, SC(5000)) == 1);
    CHECK(wait_close_of(id, SC(5000)) == TF_CLOSE_LOCAL);
    sleep_ms(300);
    CHECKF(writables_now() == 0, "on_writable for a connection closed first");
done:
    close_fd(&fd);
    stop_free();
}

static void test_send_many_full_entry_counts_for_on_writable(void) {
    int slow = -1, fast = -1, ok;
    tf_conn_id a = 0, b = 0;
    size_t q = 0, owed;
    hc_reset();
    REQUIRE(hc_start(cfg_queued(QMAX), WRITABLE));
    REQUIRE((slow = hc_connect_peer(4096, &a)) >= 0);
    REQUIRE((fast = hc_connect_peer(0, &b)) >= 0);
    owed = saturate(H.srv, a, QMAX);
    for (;;) { /* fill A with tf_send_many only */
        CHECK_RC(tf_send_many(H.srv, &a, 1, CHUNK, sizeof CHUNK, &q), TF_OK);
        if (q == 0)
            break;
        owed += 4 + sizeof CHUNK;
        REQUIRE(owed < (1u << 30));
    }
    tf_conn_id both[2] = {a, b};
    CHECK_RC(tf_send_many(H.srv, both, 2, CHUNK, sizeof CHUNK, &q), TF_OK);
    CHECK(q == 1);
    CHECK(expect_bytes(fast, CHUNK, sizeof CHUNK));
    REQUIRE(drain_n(slow, owed) == 0);
    WAIT_FOR(H.writables >= 1, SC(5000), ok);
    CHECK(ok);
    sleep_ms(200);
    CHECK(writables_now() == 1 && H.wr_conn[0] == a);
done:
    close_fd(&slow);
    close_fd(&fast);
    stop_free();
}

static int g_pull_writable_calls;

static void pull_writable(void *u, tf_conn_id c) {
    (void)u, (void)c;
    LOCKED(g_pull_writable_calls++);
}

/* Polls until an event of kind; fills *ev (0 on timeout). */
static int poll_kind(tf_server *srv, int32_t kind, tf_event *ev, int ms) {
    tf_event evs[64];
    double end = now_ms() + ms;
    while (now_ms() < end) {
        size_t n = 0;
        if (tf_server_poll(srv, evs, 64, &n, 20) != TF_OK)
            return 0;
        for (size_t i = 0; i < n; i++)
            if (evs[i].kind == kind) {
                *ev = evs[i];
                return 1;
            }
    }
    return 0;
}

static void pull_writable_case(int with) {
    int fd = -1;
    tf_server *srv = NULL;
    tf_event ev;
    tf_config *cfg = cfg_queued(QMAX);
    g_pull_writable_calls = 0;
    REQUIRE(cfg);
    if (with)
        CHECK_RC(tf_config_set_on_writable(cfg, pull_writable), TF_OK);
    CHECK_RC(tf_server_start_pull(cfg, &srv), TF_OK);
    tf_config_free(cfg);
    REQUIRE(srv);
    REQUIRE((fd = cli_connect_rcvbuf(tf_server_port(srv), 4096)) >= 0);
    REQUIRE(poll_kind(srv, TF_EVENT_CONNECT, &ev, SC(5000)));
    tf_conn_id id = ev.conn;
    size_t owed = fill_full(srv, id);
    REQUIRE(drain_n(fd, owed) == 0);
    if (with) {
        CHECK(poll_kind(srv, TF_EVENT_WRITABLE, &ev, SC(5000)));
        CHECK(ev.conn == id && ev.reason == 0 && ev.data == NULL && ev.len == 0);
        CHECK(!poll_kind(srv, TF_EVENT_WRITABLE, &ev, 300)); /* once */
        CHECK(g_pull_writable_calls == 0);                    /* the function is not called */
    } else {
        tf_event evs[64];
        double end = now_ms() + 500;
        while (now_ms() < end) {
            size_t n = 0;
            CHECK_RC(tf_server_poll(srv, evs, 64, &n, 20), TF_OK);
            for (size_t i = 0; i < n; i++)
                CHECKF(evs[i].kind >= TF_EVENT_CONNECT && evs[i].kind <= TF_EVENT_CLOSE,
                       "event of kind %d", (int)evs[i].kind);
        }
    }
done:
    close_fd(&fd);
    tf_server_free(srv);
}

static void test_pull_writable_event_only_when_set(void) {
    pull_writable_case(1);
    pull_writable_case(0);
}

/* ---- tf_sendv --------------------------------------------------------------------------- */

static void test_sendv_zero_one_many_pieces(void) {
    int fd = -1;
    tf_conn_id id = 0;
    static uint8_t big[100000], want[100000 + 32];
    hc_reset();
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    tf_iovec one = {(const uint8_t *)"hello", 5};
    CHECK_RC(tf_sendv(H.srv, id, NULL, 0), TF_OK); /* an empty frame */
    CHECK_RC(tf_sendv(H.srv, id, &one, 0), TF_OK);
    CHECK_RC(tf_sendv(H.srv, id, &one, 1), TF_OK);
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (uint8_t)(i * 31);
    tf_iovec many[5] = {{(const uint8_t *)"head:", 5}, {NULL, 0}, {big, sizeof big},
                        {(const uint8_t *)"", 0}, {(const uint8_t *)":tail", 5}};
    CHECK_RC(tf_sendv(H.srv, id, many, 5), TF_OK);
    memcpy(want, "head:", 5);
    memcpy(want + 5, big, sizeof big);
    memcpy(want + 5 + sizeof big, ":tail", 5);
    CHECK(expect_bytes(fd, "", 0));
    CHECK(expect_bytes(fd, "", 0));
    CHECK(expect_bytes(fd, "hello", 5));
    CHECK(expect_bytes(fd, want, sizeof big + 10));
done:
    close_fd(&fd);
    stop_free();
}

static void test_sendv_null_cases_too_large_and_codes(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    static uint8_t a[600], b[401];
    tf_config *cfg = cfg_queued(64 * 1024);
    hc_reset();
    H.sendv_echo = 1;
    REQUIRE(cfg && tf_config_set_max_frame(cfg, 1000) == TF_OK);
    REQUIRE(hc_start(cfg, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    tf_iovec bad[2] = {{(const uint8_t *)"ok", 2}, {NULL, 3}};
    CHECK_RC(tf_sendv(H.srv, id, NULL, 1), TF_ERR_INVALID);
    CHECK_RC(tf_sendv(H.srv, id, bad, 2), TF_ERR_INVALID);
    CHECK_RC(tf_sendv(NULL, id, bad, 1), TF_ERR_INVALID);
    tf_iovec big[2] = {{a, sizeof a}, {b, sizeof b}};
    CHECK_RC(tf_sendv(H.srv, id, big, 2), TF_ERR_TOO_LARGE);
    big[1].len = 400;
    CHECK_RC(tf_sendv(H.srv, id, big, 2), TF_OK);
    CHECK_RC(tf_sendv(H.srv, id + 100, big, 2), TF_ERR_NO_CONN);
    static uint8_t buf[2048];
    CHECK(read_frame_fd(fd, buf, sizeof buf) == 1000); /* the refused calls queued nothing */
    /* inside a callback: on_message answers "echo:" + data with tf_sendv */
    REQUIRE(send_frame(fd, "ping", 4) == 0);
    CHECK(expect_bytes(fd, "echo:ping", 9));
    WAIT_FOR(H.messages == 1, SC(5000), ok);
    CHECK(ok && H.cb_errors == 0);
    CHECK_RC(tf_conn_close(H.srv, id), TF_OK);
    CHECK_RC(tf_sendv(H.srv, id, big, 2), TF_ERR_NO_CONN);
    CHECK_RC(tf_server_stop(H.srv, 0), TF_OK);
    CHECK_RC(tf_sendv(H.srv, id, big, 2), TF_ERR_STOPPED);
done:
    close_fd(&fd);
    stop_free();
}

/* ---- tf_send_many --------------------------------------------------------------------- */

static void test_send_many_fanout_duplicates_unknown_closed(void) {
    int fd[5] = {-1, -1, -1, -1, -1};
    tf_conn_id id[5];
    static uint8_t big[4096], small[64];
    size_t q = 99;
    hc_reset();
    REQUIRE(hc_start(NULL, PLAIN));
    for (int i = 0; i < 5; i++)
        REQUIRE((fd[i] = hc_connect_peer(0, &id[i])) >= 0);
    memset(big, 'B', sizeof big);
    memset(small, 's', sizeof small);
    CHECK_RC(tf_send_many(H.srv, id, 5, small, sizeof small, &q), TF_OK);
    CHECK(q == 5);
    CHECK_RC(tf_send_many(H.srv, id, 5, big, sizeof big, &q), TF_OK); /* held once, shared */
    CHECK(q == 5);
    for (int i = 0; i < 5; i++) {
        CHECK(expect_bytes(fd[i], small, sizeof small));
        CHECK(expect_bytes(fd[i], big, sizeof big));
    }
    /* 3 leaves (on_close), 4 is closing (tf_conn_close): both skipped, as are
     * ids that never existed; 0 listed twice gets it twice. */
    close_fd(&fd[3]);
    CHECK(wait_close_of(id[3], SC(5000)) == TF_CLOSE_PEER);
    CHECK_RC(tf_conn_close(H.srv, id[4]), TF_OK);
    for (int k = 0; k < 2; k++) {
        const uint8_t *p = k ? big : small;
        size_t n = k ? sizeof big : sizeof small;
        tf_conn_id list[7] = {id[0], 0, id[3], id[4] + 1000, id[4], id[1], id[0]};
        CHECK_RC(tf_send_many(H.srv, list, 7, p, n, &q), TF_OK);
        CHECKF(q == 3, "queued %zu", q);
        CHECK(expect_bytes(fd[0], p, n) && expect_bytes(fd[0], p, n));
        CHECK(expect_bytes(fd[1], p, n));
    }
    CHECK_RC(tf_send(H.srv, id[1], (const uint8_t *)"marker", 6), TF_OK);
    CHECK(expect_bytes(fd[1], "marker", 6)); /* id[1] got exactly one of each */
done:
    for (int i = 0; i < 5; i++)
        close_fd(&fd[i]);
    stop_free();
}

static void test_send_many_null_cases_empty_and_limits(void) {
    int fd = -1;
    tf_conn_id id = 0;
    size_t q = 99;
    static uint8_t over[1001];
    tf_config *cfg = cfg_new();
    hc_reset();
    REQUIRE(cfg && tf_config_set_max_frame(cfg, 1000) == TF_OK);
    REQUIRE(hc_start(cfg, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    CHECK_RC(tf_send_many(H.srv, NULL, 0, (const uint8_t *)"x", 1, &q), TF_OK);
    CHECK(q == 0);
    CHECK_RC(tf_send_many(H.srv, NULL, 0, (const uint8_t *)"x", 1, NULL), TF_OK);
    CHECK_RC(tf_send_many(H.srv, NULL, 2, (const uint8_t *)"x", 1, &q), TF_ERR_INVALID);
    CHECK_RC(tf_send_many(H.srv, &id, 1, NULL, 5, &q), TF_ERR_INVALID);
    CHECK_RC(tf_send_many(NULL, &id, 1, (const uint8_t *)"x", 1, &q), TF_ERR_INVALID);
    CHECK_RC(tf_send_many(H.srv, &id, 1, over, sizeof over, &q), TF_ERR_TOO_LARGE);
    CHECK_RC(tf_send_many(H.srv, &id, 1, NULL, 0, &q), TF_OK); /* an empty frame */
    CHECK(q == 1);
    CHECK_RC(tf_send_many(H.srv, &id, 1, (const uint8_t *)"y", 1, NULL), TF_OK);
    CHECK(expect_bytes(fd, "", 0)); /* the refused calls queued nothing */
    CHECK(expect_bytes(fd, "y", 1));
    CHECK_RC(tf_server_stop(H.srv, 0), TF_OK);
    CHECK_RC(tf_send_many(H.srv, &id, 1, (const uint8_t *)"z", 1, &q), TF_ERR_STOPPED);
done:
    close_fd(&fd);
    stop_free();
}

static void test_send_many_inside_callback_broadcasts(void) {
    int fd[4] = {-1, -1, -1, -1}, ok;
    tf_conn_id id[4];
    static uint8_t msg[3000];
    hc_reset();
    H.broadcast = 1;
    REQUIRE(hc_start(NULL, PLAIN));
    for (int i = 0; i < 4; i++)
        REQUIRE((fd[i] = hc_connect_peer(0, &id[i])) >= 0);
    memset(msg, 'm', sizeof msg);
    REQUIRE(send_frame(fd[2], msg, sizeof msg) == 0);
    for (int i = 0; i < 4; i++)
        CHECK(expect_bytes(fd[i], msg, sizeof msg));
    WAIT_FOR(H.messages == 1, SC(5000), ok);
    CHECK(ok && H.cb_errors == 0);
done:
    for (int i = 0; i < 4; i++)
        close_fd(&fd[i]);
    stop_free();
}

/* ---- slow consumer ------------------------------------------------------------------- */

static tf_config *cfg_slow(uint64_t soft, uint32_t secs) {
    tf_config *cfg = cfg_queued(64u << 20);
    if (cfg && tf_config_set_slow_consumer(cfg, soft, secs) != TF_OK) {
        tf_config_free(cfg);
        return NULL;
    }
    return cfg;
}

static size_t queue_mib(tf_server *srv, tf_conn_id c, int mib) {
    size_t n = 0;
    for (int i = 0; i < mib * 64; i++)
        if (tf_send(srv, c, CHUNK, sizeof CHUNK) == TF_OK)
            n += 4 + sizeof CHUNK;
    return n;
}

static void test_slow_consumer_closed_after_seconds_not_before(void) {
    int fd = -1;
    tf_conn_id id = 0;
    tf_config *cfg = tf_config_new();
    CHECK_RC(tf_config_set_slow_consumer(cfg, 1024, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_slow_consumer(cfg, 0, 0), TF_OK);
    CHECK_RC(tf_config_set_slow_consumer(NULL, 1024, 1), TF_ERR_INVALID);
    tf_config_free(cfg);
    hc_reset();
    REQUIRE(hc_start(cfg_slow(64 * 1024, 1), PLAIN));
    REQUIRE((fd = hc_connect_peer(4096, &id)) >= 0);
    double t0 = now_ms();
    size_t owed = queue_mib(H.srv, id, 8);
    if (now_ms() - t0 < 800)
        sleep_ms(800 - (now_ms() - t0));
    CHECKF(close_reason_of(id) < 0, "closed %.0f ms after going above the soft limit",
           now_ms() - t0);
    CHECK(wait_close_of(id, SC(5000)) == TF_CLOSE_SLOW);
    double at = now_ms() - t0;
    CHECKF(at >= 950 && at < SC(3000), "closed after %.0f ms (limit 1 s)", at);
    /* its queued output was discarded */
    size_t got = 0;
    static uint8_t buf[65536];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    CHECKF(got < owed, "the peer got all %zu bytes", owed);
done:
    close_fd(&fd);
    stop_free();
}

static void test_slow_consumer_that_catches_up_is_kept(void) {
    int fd = -1;
    tf_conn_id id = 0;
    hc_reset();
    REQUIRE(hc_start(cfg_slow(64 * 1024, 2), PLAIN));
    REQUIRE((fd = hc_connect_peer(4096, &id)) >= 0);
    for (int round = 0; round < 2; round++) { /* 1.2 s above, twice, with a break */
        size_t owed = queue_mib(H.srv, id, 4);
        sleep_ms(1200);
        REQUIRE(drain_n(fd, owed) == 0);
    }
    sleep_ms(1000);
    CHECKF(close_reason_of(id) < 0, "closed (reason %d)", (int)close_reason_of(id));
    CHECK_RC(tf_send(H.srv, id, (const uint8_t *)"alive", 5), TF_OK);
    CHECK(expect_bytes(fd, "alive", 5));
done:
    close_fd(&fd);
    stop_free();
}

/* ---- tf_conn_get_info ----------------------------------------------------------------- */

static void test_conn_info_matches_the_peer(void) {
    int fd = -1;
    tf_conn_id id = 0;
    int32_t rc;
    static uint8_t big[70000];
    hc_reset();
    H.echo = 1;
    REQUIRE(hc_start(NULL, PLAIN));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    tf_conn_info i0 = info_of(H.srv, id, &rc);
    CHECK_RC(rc, TF_OK);
    memset(big, 7, sizeof big);
    REQUIRE(send_frame(fd, "", 0) == 0 && send_frame(fd, "a", 1) == 0 &&
            send_frame(fd, big, sizeof big) == 0);
    CHECK(expect_bytes(fd, "", 0) && expect_bytes(fd, "a", 1) && expect_bytes(fd, big, sizeof big));
    uint64_t bytes = 3 * 4 + 1 + sizeof big;
    double end = now_ms() + SC(2000);
    while (info_of(H.srv, id, &rc).frames_sent < 3 && now_ms() < end)
        sleep_ms(2);
    tf_conn_info i = info_of(H.srv, id, &rc);
    CHECK_RC(rc, TF_OK);
    CHECKF(i.bytes_received == bytes && i.frames_received == 3, "received %" PRIu64 " B, %" PRIu64,
           i.bytes_received, i.frames_received);
    CHECKF(i.bytes_sent == bytes && i.frames_sent == 3, "sent %" PRIu64 " B, %" PRIu64, i.bytes_sent,
           i.frames_sent);
    CHECK(i.queued_output == 0 && i.outbound == 0 && i.paused == 0 && i.thread == 0 &&
          i.reserved == 0);
    CHECK(i.age_ms >= i0.age_ms);
    struct sockaddr_in me;
    socklen_t sl = sizeof me;
    char want[64];
    getsockname(fd, (struct sockaddr *)&me, &sl);
    snprintf(want, sizeof want, "127.0.0.1:%u", (unsigned)ntohs(me.sin_port));
    CHECKF(strcmp(i.peer, want) == 0, "peer '%s', want '%s'", i.peer, want);
    /* age */
    sleep_ms(300);
    uint64_t age = info_of(H.srv, id, &rc).age_ms;
    CHECKF(age >= 300 && age < (uint64_t)SC(10000), "age %" PRIu64 " ms", age);
done:
    close_fd(&fd);
    stop_free();
}

static void test_conn_info_queued_output_and_codes(void) {
    int fd = -1;
    tf_conn_id id = 0;
    int32_t rc;
    hc_reset();
    REQUIRE(hc_start(cfg_queued(64u << 20), PLAIN));
    REQUIRE((fd = hc_connect_peer(4096, &id)) >= 0);
    size_t total = queue_mib(H.srv, id, 16);
    sleep_ms(200);
    tf_conn_info i = info_of(H.srv, id, &rc);
    CHECK(i.queued_output > 0);
    CHECKF(i.queued_output + i.bytes_sent == total, "queued %" PRIu64 " + sent %" PRIu64 " != %zu",
           i.queued_output, i.bytes_sent, total);
    REQUIRE(drain_n(fd, total) == 0);
    double end = now_ms() + SC(2000);
    while (queued_of(H.srv, id) != 0 && now_ms() < end)
        sleep_ms(2);
    CHECK(queued_of(H.srv, id) == 0);
    /* codes; nothing written on failure */
    i = info_of(H.srv, id + 100, &rc);
    CHECK_RC(rc, TF_ERR_NO_CONN);
    CHECK(i.bytes_received == 0x5555555555555555ull);
    CHECK_RC(tf_conn_get_info(H.srv, id, NULL), TF_ERR_INVALID);
    CHECK_RC(tf_conn_get_info(NULL, id, &i), TF_ERR_INVALID);
    CHECK_RC(tf_conn_pause(H.srv, id), TF_OK);
    CHECK(wait_paused(H.srv, id, 1, SC(2000)));
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK);
    CHECK(wait_paused(H.srv, id, 0, SC(2000)));
done:
    close_fd(&fd);
    stop_free();
}

/* ---- batched delivery and sends -------------------------------------------------------- */

static void test_on_messages_every_frame_in_order(void) {
    int fd[3] = {-1, -1, -1}, ok;
    tf_conn_id id[3];
    uint8_t *wire = NULL;
    const int per = 1000;
    hc_reset();
    REQUIRE(hc_start(NULL, BATCHED));
    for (int k = 0; k < 3; k++)
        REQUIRE((fd[k] = hc_connect_peer(0, &id[k])) >= 0);
    REQUIRE((wire = malloc((size_t)per * 64)) != NULL);
    for (int k = 0; k < 3; k++) {
        size_t n = 0;
        for (int i = 0; i < per; i++) {
            uint32_t len = (uint32_t)(i % 3 == 0 ? 0 : 8 + i % 40);
            put_le32(wire + n, len);
            memset(wire + n + 4, 0, len);
            if (len) {
                put_le32(wire + n + 4, (uint32_t)i);
                wire[n + 8] = (uint8_t)k;
            }
            n += 4 + len;
        }
        REQUIRE(send_all(fd[k], wire, n) == 0);
    }
    WAIT_FOR(H.messages == 3 * per, SC(10000), ok);
    CHECKF(ok, "%d of %d frames", messages_now(), 3 * per);
    pthread_mutex_lock(&g_mu);
    int next[3] = {0, 0, 0}, order = 1, total = 0;
    for (int m = 0; m < H.messages && m < MSG_MAX; m++) {
        int k = H.msg_conn[m] == id[0] ? 0 : H.msg_conn[m] == id[1] ? 1 : 2;
        int i = next[k]++;
        size_t want = (size_t)(i % 3 == 0 ? 0 : 8 + i % 40);
        order &= H.msg_len[m] == want;
        if (want)
            order &= H.msg[m][0] == (uint8_t)i && H.msg[m][1] == (uint8_t)(i >> 8) && H.msg[m][4] == k;
    }
    for (int b = 0; b < H.batches && b < LIST_MAX; b++)
        total += H.batch_size[b];
    CHECK(order);
    CHECK(!H.bad_batch);
    CHECKF(H.batches > LIST_MAX || total == 3 * per, "batches hold %d frames", total);
    pthread_mutex_unlock(&g_mu);
done:
    free(wire);
    for (int k = 0; k < 3; k++)
        close_fd(&fd[k]);
    stop_free();
}

static void test_on_messages_pause_then_start_rules(void) {
    int fd = -1, ok;
    tf_conn_id id = 0;
    tf_server *srv = NULL;
    /* neither on_message nor on_messages: invalid */
    tf_callbacks none = {NULL, NULL, NULL, NULL};
    tf_config *cfg = cfg_new();
    CHECK_RC(tf_server_start(cfg, &none, &srv), TF_ERR_INVALID);
    tf_config_free(cfg);
    CHECK(srv == NULL);
    /* a pause made during on_messages applies to the batches after it */
    hc_reset();
    H.batch_pause = 1;
    REQUIRE(hc_start(NULL, BATCHED));
    REQUIRE((fd = hc_connect_peer(0, &id)) >= 0);
    REQUIRE(send_frame(fd, "pause", 5) == 0);
    WAIT_FOR(H.messages == 1, SC(5000), ok);
    REQUIRE(ok);
    REQUIRE(send_frame(fd, "a", 1) == 0 && send_frame(fd, "b", 1) == 0);
    CHECK(messages_stay(1, 300));
    CHECK_RC(tf_conn_resume(H.srv, id), TF_OK);
    WAIT_FOR(H.messages == 3, SC(5000), ok);
    CHECK(ok && msg_is(1, id, "a") && msg_is(2, id, "b"));
    CHECK(H.cb_errors == 0);
done:
    close_fd(&fd);
    stop_free();
}

static void test_send_batch_results_and_echo(void) {
    int a = -1, b = -1;
    tf_conn_id ia = 0, ib = 0;
    static uint8_t big[70000], huge[100001];
    tf_config *cfg = cfg_queued(64 * 1024);
    hc_reset();
    H.batch_echo = 1;
    REQUIRE(cfg && tf_config_set_max_frame(cfg, 100000) == TF_OK);
    REQUIRE(hc_start(cfg, BATCHED));
    REQUIRE((a = hc_connect_peer(0, &ia)) >= 0);
    REQUIRE((b = hc_connect_peer(0, &ib)) >= 0);
    tf_out outs[8] = {
        {ia, (const uint8_t *)"one", 3, -7}, {ia + 1000, (const uint8_t *)"x", 1, -7},
        {ia, big, sizeof big, -7},           {ia, huge, sizeof huge, -7},
        {ia, NULL, 3, -7},                   {ia, NULL, 0, -7},
        {ib, (const uint8_t *)"two", 3, -7}, {ia, (const uint8_t *)"three", 5, -7},
    };
    int32_t want[8] = {TF_OK, TF_ERR_NO_CONN, TF_ERR_FULL, TF_ERR_TOO_LARGE,
                       TF_ERR_INVALID, TF_OK, TF_OK, TF_OK};
    CHECK_RC(tf_send_batch(H.srv, outs, 8), TF_OK);
    for (int i = 0; i < 8; i++)
        CHECKF(outs[i].result == want[i], "entry %d: %d, want %d", i, (int)outs[i].result, (int)want[i]);
    CHECK(expect_bytes(a, "one", 3) && expect_bytes(a, "", 0) && expect_bytes(a, "three", 5));
    CHECK(expect_bytes(b, "two", 3));
    CHECK_RC(tf_send_batch(H.srv, NULL, 1), TF_ERR_INVALID);
    CHECK_RC(tf_send_batch(H.srv, NULL, 0), TF_OK);
    /* on_messages echoes its batches with tf_send_batch */
    for (int i = 0; i < 50; i++) {
        char m[16];
        snprintf(m, sizeof m, "e%d", i);
        REQUIRE(send_frame(a, m, strlen(m)) == 0);
    }
    for (int i = 0; i < 50; i++) {
        char m[16];
        snprintf(m, sizeof m, "e%d", i);
        CHECK(expect_bytes(a, m, strlen(m)));
    }
    CHECK(H.cb_errors == 0);
    CHECK_RC(tf_server_stop(H.srv, 0), TF_OK);
    outs[0].result = -7;
    CHECK_RC(tf_send_batch(H.srv, outs, 1), TF_ERR_STOPPED);
    CHECK(outs[0].result == -7);
done:
    close_fd(&a);
    close_fd(&b);
    stop_free();
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void test_events_pack_layout_full_and_null(void) {
    const char *peer = "127.0.0.1:4242";
    tf_event ev[4] = {
        {TF_EVENT_CONNECT, 0, 7, (const uint8_t *)peer, 14},
        {TF_EVENT_MESSAGE, 0, 7, (const uint8_t *)"hello", 5},
        {TF_EVENT_MESSAGE, 0, 8, NULL, 0},
        {TF_EVENT_CLOSE, TF_CLOSE_TOO_LARGE, UINT64_MAX - 1, NULL, 0},
    };
    uint8_t buf[256];
    size_t needed = 0, want = 4 * 24 + 14 + 5;
    memset(buf, 0xEE, sizeof buf);
    CHECK_RC(tf_events_pack(ev, 4, buf, sizeof buf, &needed), TF_OK);
    CHECK(needed == want);
    CHECK(buf[want] == 0xEE);
    const uint8_t *p = buf;
    CHECK(le32(p) == TF_EVENT_CONNECT && le32(p + 4) == 0 && le64(p + 8) == 7 && le64(p + 16) == 14);
    CHECK(memcmp(p + 24, peer, 14) == 0);
    p += 24 + 14;
    CHECK(le32(p) == TF_EVENT_MESSAGE && le64(p + 8) == 7 && le64(p + 16) == 5 &&
          memcmp(p + 24, "hello", 5) == 0);
    p += 24 + 5;
    CHECK(le32(p) == TF_EVENT_MESSAGE && le64(p + 8) == 8 && le64(p + 16) == 0);
    p += 24;
    CHECK(le32(p) == TF_EVENT_CLOSE && (int32_t)le32(p + 4) == TF_CLOSE_TOO_LARGE &&
          le64(p + 8) == UINT64_MAX - 1 && le64(p + 16) == 0);
    /* too small: FULL, *needed, nothing written */
    memset(buf, 0xEE, sizeof buf);
    needed = 0;
    CHECK_RC(tf_events_pack(ev, 4, buf, want - 1, &needed), TF_ERR_FULL);
    CHECK(needed == want && buf[0] == 0xEE && buf[want - 2] == 0xEE);
    needed = 0;
    CHECK_RC(tf_events_pack(ev, 4, NULL, 0, &needed), TF_ERR_FULL);
    CHECK(needed == want);
    CHECK_RC(tf_events_pack(ev, 4, buf, want, &needed), TF_OK); /* exactly enough */
    /* NULL cases */
    CHECK_RC(tf_events_pack(ev, 4, buf, sizeof buf, NULL), TF_ERR_INVALID);
    CHECK_RC(tf_events_pack(NULL, 2, buf, sizeof buf, &needed), TF_ERR_INVALID);
    CHECK_RC(tf_events_pack(ev, 4, NULL, 10, &needed), TF_ERR_INVALID);
    CHECK_RC(tf_events_pack(NULL, 0, NULL, 0, &needed), TF_OK);
    CHECK(needed == 0);
}

static size_t pack_send(uint8_t *p, tf_conn_id c, const void *d, size_t n) {
    put_le64(p, c);
    put_le64(p + 8, n);
    if (n)
        memcpy(p + 16, d, n);
    return 16 + n;
}

static void test_send_packed_parse_results_malformed(void) {
    int a = -1, b = -1;
    tf_conn_id ia = 0, ib = 0;
    static uint8_t buf[300000], big[70000], huge[100001];
    int32_t res[8];
    size_t count, n = 0;
    tf_config *cfg = cfg_queued(64 * 1024);
    hc_reset();
    REQUIRE(cfg && tf_config_set_max_frame(cfg, 100000) == TF_OK);
    REQUIRE(hc_start(cfg, PLAIN));
    REQUIRE((a = hc_connect_peer(0, &ia)) >= 0);
    REQUIRE((b = hc_connect_peer(0, &ib)) >= 0);
    n += pack_send(buf + n, ia, "first", 5);
    n += pack_send(buf + n, ib, "", 0);
    n += pack_send(buf + n, ia + 100, "who", 3);
    n += pack_send(buf + n, ia, big, sizeof big);
    n += pack_send(buf + n, ia, huge, sizeof huge);
    n += pack_send(buf + n, ib, "last", 4);
    for (int i = 0; i < 8; i++)
        res[i] = -7;
    CHECK_RC(tf_send_packed(H.srv, buf, n, res, 8, &count), TF_OK);
    CHECK(count == 6);
    int32_t want[8] = {TF_OK, TF_OK, TF_ERR_NO_CONN, TF_ERR_FULL, TF_ERR_TOO_LARGE, TF_OK, -7, -7};
    for (int i = 0; i < 8; i++)
        CHECKF(res[i] == want[i], "frame %d: %d, want %d", i, (int)res[i], (int)want[i]);
    CHECK(expect_bytes(a, "first", 5));
    CHECK(expect_bytes(b, "", 0) && expect_bytes(b, "last", 4));
    /* malformed: nothing queued, INVALID */
    n = pack_send(buf, ia, "one", 3);
    n += pack_send(buf + n, ia, "two", 3);
    CHECK_RC(tf_send_packed(H.srv, buf, n + 5, res, 8, &count), TF_ERR_INVALID); /* cut header */
    put_le64(buf + n, ia);
    put_le64(buf + n + 8, 10);
    memcpy(buf + n + 16, "short", 5);
    CHECK_RC(tf_send_packed(H.srv, buf, n + 21, res, 8, &count), TF_ERR_INVALID); /* past the end */
    put_le64(buf + n + 8, UINT64_MAX);
    CHECK_RC(tf_send_packed(H.srv, buf, n + 21, res, 8, &count), TF_ERR_INVALID);
    CHECK_RC(tf_send_packed(H.srv, buf, n, res, 1, &count), TF_ERR_INVALID); /* > max_results */
    CHECK_RC(tf_send_packed(H.srv, buf, n, res, 8, NULL), TF_ERR_INVALID);
    CHECK_RC(tf_send_packed(H.srv, buf, n, NULL, 8, &count), TF_ERR_INVALID);
    CHECK_RC(tf_send_packed(H.srv, NULL, n, res, 8, &count), TF_ERR_INVALID);
    CHECK_RC(tf_send_packed(NULL, buf, n, res, 8, &count), TF_ERR_INVALID);
    CHECK_RC(tf_send_packed(H.srv, NULL, 0, NULL, 0, &count), TF_OK);
    CHECK(count == 0);
    CHECK_RC(tf_send(H.srv, ia, (const uint8_t *)"marker", 6), TF_OK);
    CHECK(expect_bytes(a, "marker", 6)); /* the refused calls queued nothing */
    CHECK_RC(tf_server_stop(H.srv, 0), TF_OK);
    CHECK_RC(tf_send_packed(H.srv, buf, n, res, 8, &count), TF_ERR_STOPPED);
done:
    close_fd(&a);
    close_fd(&b);
    stop_free();
}

static const struct test tests[] = {
    TEST(test_user_data_set_get_clear_and_codes, 10, "va"),
    TEST(test_user_data_seen_by_callbacks_and_on_close_then_null, 10, "va"),
    TEST(test_user_data_set_in_refusing_on_connect_is_forgotten, 10, "va"),
    TEST(test_user_data_under_concurrent_threads, 20, "va"),
    TEST(test_user_data_is_gone_once_its_on_close_returned, 10, "va"),
    TEST(test_pause_in_on_message_holds_frames_already_read, 10, "va"),
    TEST(test_pause_and_resume_from_another_thread, 10, "va"),
    TEST(test_pause_applies_tcp_backpressure, 30, "a"),
    TEST(test_pause_suspends_the_idle_timeout, 10, "va"),
    TEST(test_pause_resume_idempotent_and_codes, 10, "va"),
    TEST(test_pause_then_resume_from_another_connections_callback, 10, "va"),
    TEST(test_conn_info_paused_is_set_when_pause_returns, 10, "va"),
    TEST(test_on_writable_once_when_queue_falls_to_half, 30, "va"),
    TEST(test_on_writable_not_called_when_closed_first, 20, "va"),
    TEST(test_send_many_full_entry_counts_for_on_writable, 30, "va"),
    TEST(test_pull_writable_event_only_when_set, 30, "va"),
    TEST(test_sendv_zero_one_many_pieces, 10, "va"),
    TEST(test_sendv_null_cases_too_large_and_codes, 10, "va"),
    TEST(test_send_many_fanout_duplicates_unknown_closed, 10, "va"),
    TEST(test_send_many_null_cases_empty_and_limits, 10, "va"),
    TEST(test_send_many_inside_callback_broadcasts, 10, "va"),
    TEST(test_slow_consumer_closed_after_seconds_not_before, 15, "va"),
    TEST(test_slow_consumer_that_catches_up_is_kept, 20, "va"),
    TEST(test_conn_info_matches_the_peer, 10, "va"),
    TEST(test_conn_info_queued_output_and_codes, 20, "va"),
    TEST(test_on_messages_every_frame_in_order, 15, "va"),
    TEST(test_on_messages_pause_then_start_rules, 10, "va"),
    TEST(test_send_batch_results_and_echo, 10, "va"),
    TEST(test_events_pack_layout_full_and_null, 5, "va"),
    TEST(test_send_packed_parse_results_malformed, 10, "va"),
};

int main(int argc, char **argv) {
    memset(CHUNK, 0x42, sizeof CHUNK);
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
