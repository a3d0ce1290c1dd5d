/* test_proxy: the C face of "Behind a load balancer" (API.md), over real sockets
 * on 127.0.0.1: the PROXY protocol (v1 and v2; IPv4, IPv6, LOCAL, UNKNOWN; the
 * client's address in on_connect; header and frames in one segment; a header
 * split at every byte; bad, oversized, truncated, missing and late headers
 * refused before on_connect and counted as rejected; TLVs skipped; each version
 * mode refusing the other), max connections per IP (with and without PROXY)
 * and tf_server_drain (bind again at once while old connections echo, a Unix
 * socket's file removed, idempotent, TF_ERR_STOPPED after stop, tf_connect
 * after it). The Rust side of the same contract: tests/proxy.rs.
 *
 *   TF_TEST_BACKEND=poll|epoll test_proxy [--list] [NAME...]
 *
 * One line per test ("ok"/"FAIL"), a summary, exit status 0 only if all passed. */
#include "robust.h"

#include <sys/stat.h>
#include <sys/un.h>

/* ---- a host that records the peer text ------------------------------------------- */

struct phost {
    tf_server *srv;
    int echo; /* on_message echoes */
    int drain_on_cue; /* a "drain" frame: tf_server_drain, then 300 ms more in the callback */
    int drained;      /* the drain call's code + 1 (0: not called yet) */
    int connects, messages, closes;
    tf_conn_id conn[LIST_MAX];
    char peer[LIST_MAX][128];
    tf_conn_id last_msg_conn;
    char last_msg[256];
};

static int p_connect(void *ud, tf_conn_id c, const char *peer) {
    struct phost *h = ud;
    LOCKED(if (h->connects < LIST_MAX) {
        h->conn[h->connects] = c;
        snprintf(h->peer[h->connects], sizeof h->peer[0], "%s", peer ? peer : "(null)");
    } h->connects++);
    return 0;
}

static void p_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    struct phost *h = ud;
    if (h->drain_on_cue && n == 5 && memcmp(d, "drain", 5) == 0) {
        int32_t rc = tf_server_drain(h->srv);
        LOCKED(h->drained = rc + 1);
        sleep_ms(300);
    }
    if (h->echo)
        (void)tf_send(h->srv, c, d, n);
    LOCKED(h->messages++; h->last_msg_conn = c;
           snprintf(h->last_msg, sizeof h->last_msg, "%.*s", (int)(n < 255 ? n : 255), (const char *)d));
}

static void p_close(void *ud, tf_conn_id c, int32_t reason) {
    struct phost *h = ud;
    (void)c, (void)reason;
    LOCKED(h->closes++);
}

/* An echo server for h at addr (NULL: 127.0.0.1:0) with this PROXY mode and
 * per-IP cap (0: none). */
static tf_server *pstart(struct phost *h, const char *addr, int32_t mode, uint32_t per_ip) {
    memset(h, 0, sizeof *h);
    h->echo = 1;
    tf_config *cfg = cfg_new();
    if (cfg == NULL)
        return NULL;
    if ((addr && tf_config_set_address(cfg, addr) != TF_OK) ||
        tf_config_set_proxy_protocol(cfg, mode) != TF_OK ||
        tf_config_set_max_connections_per_ip(cfg, per_ip) != TF_OK) {
        fprintf(stderr, "    config: %s\n", tf_last_error());
        tf_config_free(cfg);
        return NULL;
    }
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = h;
    cb.on_connect = p_connect;
    cb.on_message = p_message;
    cb.on_close = p_close;
    (void)start_cb(cfg, &cb, &h->srv); /* NULL on failure, said on stderr */
    tf_config_free(cfg);
    return h->srv;
}

static void pstop(struct phost *h) {
    if (h->srv) {
        tf_server_stop(h->srv, 0);
        tf_server_free(h->srv);
        h->srv = NULL;
    }
}

static int connects_of(struct phost *h) {
    pthread_mutex_lock(&g_mu);
    int n = h->connects;
    pthread_mutex_unlock(&g_mu);
    return n;
}

static tf_stats stats_of(tf_server *srv) {
    tf_stats st;
    memset(&st, 0, sizeof st);
    (void)tf_server_stats(srv, &st);
    return st;
}

/* Waits until connections_rejected reaches n (at most ms). */
static int wait_rejected(tf_server *srv, uint64_t n, int ms) {
    double end = now_ms() + ms;
    while (stats_of(srv).connections_rejected < n) {
        if (now_ms() >= end)
            return 0;
        sleep_ms(1);
    }
    return stats_of(srv).connections_rejected == n;
}

/* Waits until the server has read `n` bytes in all (bytes_received). */
static int wait_bytes(tf_server *srv, uint64_t n, int ms) {
    double end = now_ms() + ms;
    while (stats_of(srv).bytes_received < n) {
        if (now_ms() >= end)
            return 0;
        sleep_ms(0.1);
    }
    return 1;
}

/* "127.0.0.1:PORT" of fd's own end: the peer the server sees without PROXY. */
static void own_addr(int fd, char *out, size_t cap) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "?";
    getsockname(fd, (struct sockaddr *)&ss, &len);
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        snprintf(out, cap, "[%s]:%u", ip, (unsigned)ntohs(a->sin6_port));
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        snprintf(out, cap, "%s:%u", ip, (unsigned)ntohs(a->sin_port));
    }
}

/* ---- headers ------------------------------------------------------------------------- */

static const uint8_t SIG[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};

enum { CMD_LOCAL = 0x20, CMD_PROXY = 0x21, FAM_UNSPEC = 0x00, FAM_TCP4 = 0x11, FAM_TCP6 = 0x21 };

/* A v2 header with `len` in its length field and `body_len` bytes of body. */
static size_t v2_raw(uint8_t *out, uint8_t cmd, uint8_t fam, uint16_t len, const uint8_t *body,
                     size_t body_len) {
    memcpy(out, SIG, 12);
    out[12] = cmd;
    out[13] = fam;
    out[14] = (uint8_t)(len >> 8);
    out[15] = (uint8_t)len;
    if (body_len)
        memcpy(out + 16, body, body_len);
    return 16 + body_len;
}

/* A v2 PROXY header for TCP over IPv4 or IPv6 (by the text of src), with
 * `tlv_len` TLV bytes after the addresses. */
static size_t v2_addr(uint8_t *out, const char *src, uint16_t sport, const uint8_t *tlvs, size_t tlv_len) {
    uint8_t body[36 + 512];
    size_t n;
    uint8_t fam;
    if (strchr(src, ':')) {
        fam = FAM_TCP6;
        inet_pton(AF_INET6, src, body);
        inet_pton(AF_INET6, "2001:db8::2", body + 16);
        n = 32;
    } else {
        fam = FAM_TCP4;
        inet_pton(AF_INET, src, body);
        inet_pton(AF_INET, "192.0.2.1", body + 4);
        n = 8;
    }
    body[n++] = (uint8_t)(sport >> 8);
    body[n++] = (uint8_t)sport;
    body[n++] = 5882 >> 8;
    body[n++] = 5882 & 0xff;
    if (tlv_len > 512)
        tlv_len = 512;
    if (tlv_len)
        memcpy(body + n, tlvs, tlv_len);
    n += tlv_len;
    return v2_raw(out, CMD_PROXY, fam, (uint16_t)n, body, n);
}

static size_t put_frame(uint8_t *out, const char *text) {
    size_t n = strlen(text);
    put_le32(out, (uint32_t)n);
    memcpy(out + 4, text, n);
    return 4 + n;
}

/* Connects, sends `len` bytes in one write and waits for the connection's
 * on_connect; returns the fd (-1 on failure) and copies its peer text. */
static int announce(struct phost *h, uint16_t port, const void *bytes, size_t len, char *peer,
                    size_t cap) {
    int before = connects_of(h), ok;
    int fd = cli_connect(port);
    if (fd < 0)
        return -1;
    if (send_all(fd, bytes, len) != 0) {
        close(fd);
        return -1;
    }
    WAIT_FOR(h->connects > before, SC(5000), ok);
    if (!ok) {
        close(fd);
        return -1;
    }
    pthread_mutex_lock(&g_mu);
    snprintf(peer, cap, "%s", before < LIST_MAX ? h->peer[before] : "");
    pthread_mutex_unlock(&g_mu);
    return fd;
}

/* A new connection sending `len` bytes is refused before on_connect: closed
 * within ms, connections_rejected one more, no on_connect. */
static void check_refused(struct phost *h, uint16_t port, const void *bytes, size_t len, int ms,
                          const char *what) {
    int connects = connects_of(h);
    uint64_t rejected = stats_of(h->srv).connections_rejected;
    int fd = cli_connect(port);
    if (fd < 0) {
        CHECKF(fd >= 0, "%s: connect failed", what);
        return;
    }
    (void)send_all(fd, bytes, len); /* the server may close before the last byte */
    int end = peer_end(fd, ms);
    CHECKF(end != 0, "%s: still open after %d ms", what, ms);
    CHECKF(wait_rejected(h->srv, rejected + 1, SC(2000)), "%s: rejected %" PRIu64 " -> %" PRIu64, what,
           rejected, stats_of(h->srv).connections_rejected);
    CHECKF(connects_of(h) == connects, "%s: on_connect ran", what);
    close(fd);
}

#define PROMPT_MS SC(2000) /* a refusal the bytes prove: well under the 5 s allowed */

/* ---- v1 and v2: the peer text ------------------------------------------------------- */

static void expect_peer(struct phost *h, uint16_t port, const void *hdr, size_t len, const char *want,
                        const char *what) {
    char peer[128] = "", own[128] = "";
    int fd = announce(h, port, hdr, len, peer, sizeof peer);
    CHECKF(fd >= 0, "%s: not announced", what);
    if (fd < 0)
        return;
    own_addr(fd, own, sizeof own);
    if (want == NULL)
        want = own; /* LOCAL / UNKNOWN: the socket's own peer */
    CHECKF(strcmp(peer, want) == 0, "%s: peer '%s', want '%s'", what, peer, want);
    CHECKF(echo_ok(fd, what), "%s: no echo", what);
    close(fd);
}

static void test_v1_tcp4_tcp6_unknown(void) {
    struct phost h;
    REQUIRE(pstart(&h, NULL, TF_PROXY_V1, 0));
    uint16_t port = tf_server_port(h.srv);
    const char *l4 = "PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n";
    const char *l6 = "PROXY TCP6 2001:db8::1 2001:db8::2 41000 5882\r\n";
    const char *lu = "PROXY UNKNOWN\r\n";
    const char *lu2 = "PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
    expect_peer(&h, port, l4, strlen(l4), "203.0.113.7:41000", "v1 TCP4");
    expect_peer(&h, port, l6, strlen(l6), "[2001:db8::1]:41000", "v1 TCP6");
    expect_peer(&h, port, lu, strlen(lu), NULL, "v1 UNKNOWN");
    expect_peer(&h, port, lu2, strlen(lu2), NULL, "v1 UNKNOWN with addresses");
    CHECK(stats_of(h.srv).connections_rejected == 0);
done:
    pstop(&h);
}

static void test_v2_tcp4_tcp6_local_unspec(void) {
    struct phost h;
    uint8_t b[128];
    REQUIRE(pstart(&h, NULL, TF_PROXY_V2, 0));
    uint16_t port = tf_server_port(h.srv);
    expect_peer(&h, port, b, v2_addr(b, "203.0.113.7", 41000, NULL, 0), "203.0.113.7:41000", "v2 TCP4");
    expect_peer(&h, port, b, v2_addr(b, "2001:db8::1", 41000, NULL, 0), "[2001:db8::1]:41000", "v2 TCP6");
    expect_peer(&h, port, b, v2_raw(b, CMD_LOCAL, FAM_UNSPEC, 0, NULL, 0), NULL, "v2 LOCAL");
    /* LOCAL with an address block: the block is ignored. */
    size_t n = v2_addr(b, "203.0.113.7", 41000, NULL, 0);
    b[12] = CMD_LOCAL;
    expect_peer(&h, port, b, n, NULL, "v2 LOCAL with addresses");
    expect_peer(&h, port, b, v2_raw(b, CMD_PROXY, FAM_UNSPEC, 0, NULL, 0), NULL, "v2 PROXY UNSPEC");
    CHECK(stats_of(h.srv).connections_rejected == 0);
done:
    pstop(&h);
}

/* ---- framing after the header -------------------------------------------------------- */

static void test_header_and_frames_in_one_segment(void) {
    struct phost h;
    uint8_t b[256];
    char peer[128];
    REQUIRE(pstart(&h, NULL, TF_PROXY_ANY, 0));
    uint16_t port = tf_server_port(h.srv);
    for (int v = 0; v < 2; v++) {
        size_t n = v == 0 ? (size_t)sprintf((char *)b, "PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n")
                          : v2_addr(b, "203.0.113.7", 41000, NULL, 0);
        n += put_frame(b + n, "first");
        n += put_frame(b + n, "PROXY TCP4 second"); /* header-looking payload */
        int fd = announce(&h, port, b, n, peer, sizeof peer);
        REQUIRE(fd >= 0);
        CHECKF(strcmp(peer, "203.0.113.7:41000") == 0, "v%d: peer '%s'", v + 1, peer);
        CHECK(expect_frame(fd, "first"));
        CHECK(expect_frame(fd, "PROXY TCP4 second"));
        CHECK(echo_ok(fd, "third"));
        close(fd);
    }
    tf_stats st = stats_of(h.srv);
    CHECKF(st.frames_received == 6 && st.connections_rejected == 0, "frames %" PRIu64 " rejected %" PRIu64,
           st.frames_received, st.connections_rejected);
done:
    pstop(&h);
}

/* Sends bytes in pieces ending at cuts[], each read by the server before the next. */
static int send_pieces(struct phost *h, int fd, const uint8_t *b, size_t n, const size_t *cuts,
                       size_t ncuts) {
    size_t from = 0;
    for (size_t i = 0; i <= ncuts; i++) {
        size_t to = i < ncuts ? cuts[i] : n;
        if (to <= from)
            continue;
        uint64_t base = stats_of(h->srv).bytes_received;
        if (send_all(fd, b + from, to - from) != 0 || !wait_bytes(h->srv, base + (to - from), SC(5000)))
            return 0;
        from = to;
    }
    return 1;
}

static void test_header_split_at_every_byte(void) {
    struct phost h;
    uint8_t hdr[4][256], tlvs[] = {0x01, 0, 2, 'h', '2', 0x04, 0, 3, 0, 0, 0};
    size_t len[4];
    const char *want[4] = {"203.0.113.7:41000", "[2001:db8::1]:41000", "[2001:db8::1]:41000", NULL};
    size_t cuts[512];
    REQUIRE(pstart(&h, NULL, TF_PROXY_ANY, 0));
    uint16_t port = tf_server_port(h.srv);
    len[0] = (size_t)sprintf((char *)hdr[0], "PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n");
    len[1] = (size_t)sprintf((char *)hdr[1], "PROXY TCP6 2001:db8::1 2001:db8::2 41000 5882\r\n");
    len[2] = v2_addr(hdr[2], "2001:db8::1", 41000, tlvs, sizeof tlvs);
    len[3] = v2_raw(hdr[3], CMD_LOCAL, FAM_UNSPEC, 0, NULL, 0);
    int conns = 0;
    for (int c = 0; c < 4; c++) {
        uint8_t b[300];
        size_t n = len[c];
        memcpy(b, hdr[c], n);
        n += put_frame(b + n, "split");
        /* k < 0: one byte per write; else two pieces cut at k. */
        for (int k = -1; k < (int)n; k++) {
            if (k == 0)
                continue;
            size_t ncuts = 0;
            if (k < 0)
                for (size_t i = 1; i < n; i++)
                    cuts[ncuts++] = i;
            else
                cuts[ncuts++] = (size_t)k;
            int before = connects_of(&h), ok;
            int fd = cli_connect(port);
            REQUIRE(fd >= 0);
            CHECKF(send_pieces(&h, fd, b, n, cuts, ncuts), "case %d cut %d: not read", c, k);
            WAIT_FOR(h.connects > before, SC(5000), ok);
            CHECKF(ok, "case %d cut %d: not announced", c, k);
            char own[128], peer[128] = "";
            own_addr(fd, own, sizeof own);
            pthread_mutex_lock(&g_mu);
            snprintf(peer, sizeof peer, "%s", before < LIST_MAX ? h.peer[before] : own);
            pthread_mutex_unlock(&g_mu);
            if (before < LIST_MAX)
                CHECKF(strcmp(peer, want[c] ? want[c] : own) == 0, "case %d cut %d: peer '%s'", c, k, peer);
            CHECKF(expect_frame(fd, "split"), "case %d cut %d: no echo", c, k);
            close(fd);
            conns++;
            if (g_failures)
                goto done;
            if (connects_of(&h) >= LIST_MAX - 1) { /* the peer list is full: a new server */
                pstop(&h);
                REQUIRE(pstart(&h, NULL, TF_PROXY_ANY, 0));
                port = tf_server_port(h.srv);
            }
        }
    }
    printf("    %d connections, every cut\n", conns);
done:
    pstop(&h);
}

/* ---- bad headers --------------------------------------------------------------------- */

static void test_bad_signatures(void) {
    struct phost h;
    uint8_t b[128];
    REQUIRE(pstart(&h, NULL, TF_PROXY_ANY, 0));
    uint16_t port = tf_server_port(h.srv);
    const char *lines[] = {
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "proxy TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n",
        "PROXY TCP5 203.0.113.7 192.0.2.1 41000 5882\r\n",
        "PROXY TCP4 203.0.113.777 192.0.2.1 41000 5882\r\n",
        "PROXY TCP4 203.0.113.7 192.0.2.1 65536 5882\r\n",
        "PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882\n",
        "G",
        "PROXY X",
    };
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++)
        check_refused(&h, port, lines[i], strlen(lines[i]), PROMPT_MS, lines[i]);
    size_t n = put_frame(b, "a frame and no header");
    check_refused(&h, port, b, n, PROMPT_MS, "a plain frame");
    n = v2_addr(b, "203.0.113.7", 41000, NULL, 0);
    b[9] = 'X';
    check_refused(&h, port, b, n, PROMPT_MS, "v2 signature QUXT");
    n = v2_addr(b, "203.0.113.7", 41000, NULL, 0);
    b[12] = 0x11;
    check_refused(&h, port, b, n, PROMPT_MS, "v2 version 1");
    b[12] = 0x22;
    check_refused(&h, port, b, n, PROMPT_MS, "v2 unknown command");
    b[12] = CMD_PROXY;
    b[13] = 0x12;
    check_refused(&h, port, b, n, PROMPT_MS, "v2 over UDP");
    b[13] = 0x41;
    check_refused(&h, port, b, n, PROMPT_MS, "v2 unassigned family");
    CHECK(stats_of(h.srv).connections_accepted == 0);
    CHECK(h.closes == 0);
done:
    pstop(&h);
}

static void test_oversized_v1_line(void) {
    struct phost h;
    char line[5000], peer[128];
    REQUIRE(pstart(&h, NULL, TF_PROXY_V1, 0));
    uint16_t port = tf_server_port(h.srv);
    /* 107 bytes, CRLF included: the longest allowed. */
    memset(line, 'x', sizeof line);
    memcpy(line, "PROXY UNKNOWN ", 14);
    memcpy(line + 105, "\r\n", 2);
    int fd = announce(&h, port, line, 107, peer, sizeof peer);
    CHECK(fd >= 0);
    if (fd >= 0) {
        CHECK(echo_ok(fd, "107 is fine"));
        close(fd);
    }
    memcpy(line + 105, "x\r\n", 3);
    check_refused(&h, port, line, 108, PROMPT_MS, "a 108-byte line");
    memset(line + 14, 'y', sizeof line - 14);
    check_refused(&h, port, line, sizeof line, PROMPT_MS, "no CRLF in 5000 bytes");
done:
    pstop(&h);
}

static void test_truncated_v2_lengths(void) {
    struct phost h;
    uint8_t b[128], body[64];
    memset(body, 7, sizeof body);
    REQUIRE(pstart(&h, NULL, TF_PROXY_V2, 0));
    uint16_t port = tf_server_port(h.srv);
    size_t n = v2_raw(b, CMD_PROXY, FAM_TCP4, 11, body, 11);
    check_refused(&h, port, b, n, PROMPT_MS, "TCP4, length 11");
    n = v2_raw(b, CMD_PROXY, FAM_TCP4, 0, NULL, 0);
    check_refused(&h, port, b, n, PROMPT_MS, "TCP4, length 0");
    n = v2_raw(b, CMD_PROXY, FAM_TCP6, 35, body, 35);
    check_refused(&h, port, b, n, PROMPT_MS, "TCP6, length 35");
    /* Shorter than announced, then the peer is done: refused at its FIN. */
    n = v2_raw(b, CMD_PROXY, FAM_TCP4, 12 + 50, body, 12);
    uint64_t rejected = stats_of(h.srv).connections_rejected;
    int fd = cli_connect(port);
    REQUIRE(fd >= 0);
    CHECK(send_all(fd, b, n) == 0);
    shutdown(fd, SHUT_WR);
    CHECK(peer_end(fd, PROMPT_MS) != 0);
    CHECK(wait_rejected(h.srv, rejected + 1, SC(2000)));
    close(fd);
    CHECK(connects_of(&h) == 0);
done:
    pstop(&h);
}

static void test_tlvs_skipped(void) {
    struct phost h;
    uint8_t tlvs[400], b[600];
    char peer[128];
    size_t t = 0;
    const uint8_t alpn[] = {0x01, 0, 2, 'h', '2'};
    const uint8_t authority[] = {0x02, 0, 11, 'e', 'x', 'a', 'm', 'p', 'l', 'e', '.', 'c', 'o', 'm'};
    const uint8_t crc[] = {0x03, 0, 4, 0xde, 0xad, 0xbe, 0xef};
    memcpy(tlvs + t, alpn, sizeof alpn), t += sizeof alpn;
    memcpy(tlvs + t, authority, sizeof authority), t += sizeof authority;
    memcpy(tlvs + t, crc, sizeof crc), t += sizeof crc;
    /* A custom TLV whose value looks like a frame and a v2 signature. */
    tlvs[t++] = 0xE0, tlvs[t++] = 1, tlvs[t++] = 0; /* 256 bytes */
    memset(tlvs + t, 0, 256);
    put_frame(tlvs + t, "not a frame");
    memcpy(tlvs + t + 20, SIG, 12);
    t += 256;
    REQUIRE(pstart(&h, NULL, TF_PROXY_V2, 0));
    size_t n = v2_addr(b, "203.0.113.7", 41000, tlvs, t);
    n += put_frame(b + n, "after tlvs");
    int fd = announce(&h, tf_server_port(h.srv), b, n, peer, sizeof peer);
    REQUIRE(fd >= 0);
    CHECKF(strcmp(peer, "203.0.113.7:41000") == 0, "peer '%s'", peer);
    CHECK(expect_frame(fd, "after tlvs"));
    CHECK(echo_ok(fd, "and on"));
    close(fd);
    CHECK(stats_of(h.srv).frames_received == 2);
done:
    pstop(&h);
}

static void test_modes_refuse_the_other(void) {
    struct phost a, b;
    uint8_t v2[64];
    char peer[128];
    const char *l = "PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n";
    size_t n2 = v2_addr(v2, "203.0.113.7", 41000, NULL, 0);
    memset(&b, 0, sizeof b);
    REQUIRE(pstart(&a, NULL, TF_PROXY_V1, 0));
    REQUIRE(pstart(&b, NULL, TF_PROXY_V2, 0));
    check_refused(&a, tf_server_port(a.srv), v2, n2, PROMPT_MS, "v2 to a V1 server");
    check_refused(&b, tf_server_port(b.srv), l, strlen(l), PROMPT_MS, "v1 to a V2 server");
    int fd = announce(&a, tf_server_port(a.srv), l, strlen(l), peer, sizeof peer);
    CHECK(fd >= 0 && echo_ok(fd, "v1 ok"));
    close_fd(&fd);
    fd = announce(&b, tf_server_port(b.srv), v2, n2, peer, sizeof peer);
    CHECK(fd >= 0 && echo_ok(fd, "v2 ok"));
    close_fd(&fd);
    /* And the setter's own checks. */
    tf_config *cfg = tf_config_new();
    CHECK_RC(tf_config_set_proxy_protocol(cfg, 4), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_proxy_protocol(cfg, -1), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_proxy_protocol(NULL, TF_PROXY_V2), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_max_connections_per_ip(NULL, 1), TF_ERR_INVALID);
    tf_config_free(cfg);
done:
    pstop(&a);
    pstop(&b);
}

/* ---- a client that sends nothing ---------------------------------------------------- */

static void test_missing_header_closed_after_5s(void) {
    struct phost h;
    uint8_t b[64];
    char peer[128];
    REQUIRE(pstart(&h, NULL, TF_PROXY_ANY, 0));
    uint16_t port = tf_server_port(h.srv);
    double t0 = now_ms();
    int silent = cli_connect(port);
    int half = cli_connect(port);
    REQUIRE(silent >= 0 && half >= 0);
    size_t n = v2_addr(b, "203.0.113.7", 41000, NULL, 0);
    CHECK(send_all(half, b, n - 3) == 0);
    /* The loop serves others meanwhile. */
    n = v2_addr(b, "198.51.100.4", 4000, NULL, 0);
    int good = announce(&h, port, b, n, peer, sizeof peer);
    CHECK(good >= 0 && echo_ok(good, "not blocked"));
    int e1 = peer_end(silent, SC(7000));
    double t1 = now_ms() - t0;
    int e2 = peer_end(half, SC(7000) - (int)(now_ms() - t0));
    double t2 = now_ms() - t0;
    CHECKF(e1 != 0 && e2 != 0, "still open: silent %d, half a header %d", e1, e2);
    CHECKF(t1 >= 4900 && t2 >= 4900, "closed early: %.0f ms, %.0f ms", t1, t2);
    CHECKF(t1 <= SC(7000) && t2 <= SC(7000), "closed late: %.0f ms, %.0f ms", t1, t2);
    printf("    closed after %.0f ms and %.0f ms\n", t1, t2);
    CHECK(wait_rejected(h.srv, 2, SC(2000)));
    CHECK(connects_of(&h) == 1);
    CHECK(good >= 0 && echo_ok(good, "still served"));
    close_fd(&good);
    close_fd(&silent);
    close_fd(&half);
done:
    pstop(&h);
}

/* ---- max connections per IP --------------------------------------------------------- */

static void test_per_ip_cap_without_proxy(void) {
    struct phost h;
    int a = -1, b = -1, d = -1, ok;
    REQUIRE(pstart(&h, NULL, TF_PROXY_OFF, 2));
    uint16_t port = tf_server_port(h.srv);
    a = cli_connect(port);
    b = cli_connect(port);
    REQUIRE(a >= 0 && b >= 0);
    WAIT_FOR(h.connects == 2, SC(5000), ok);
    REQUIRE(ok);
    check_refused(&h, port, "", 0, PROMPT_MS, "a third from 127.0.0.1");
    CHECK(echo_ok(a, "a") && echo_ok(b, "b"));
    close_fd(&a);
    WAIT_FOR(h.closes == 1, SC(5000), ok);
    CHECK(ok);
    d = cli_connect(port);
    WAIT_FOR(h.connects == 3, SC(5000), ok);
    CHECK(ok && echo_ok(d, "room again"));
    tf_stats st = stats_of(h.srv);
    CHECK(st.connections_rejected == 1 && st.connections_active == 2);
done:
    close_fd(&a);
    close_fd(&b);
    close_fd(&d);
    pstop(&h);
}

static void test_per_ip_cap_with_proxy(void) {
    struct phost h;
    uint8_t b[64];
    char pa[128], pb[128];
    int a = -1, c = -1, d = -1, ok;
    REQUIRE(pstart(&h, NULL, TF_PROXY_V2, 1));
    uint16_t port = tf_server_port(h.srv);
    /* Two clients from the same socket IP, different PROXY source IPs: both in. */
    a = announce(&h, port, b, v2_addr(b, "198.51.100.1", 1001, NULL, 0), pa, sizeof pa);
    c = announce(&h, port, b, v2_addr(b, "198.51.100.2", 1002, NULL, 0), pb, sizeof pb);
    REQUIRE(a >= 0 && c >= 0);
    CHECKF(strcmp(pa, "198.51.100.1:1001") == 0 && strcmp(pb, "198.51.100.2:1002") == 0, "%s %s", pa, pb);
    /* The same PROXY IP again: over the cap, no on_connect. */
    size_t n = v2_addr(b, "198.51.100.1", 2001, NULL, 0);
    n += put_frame(b + n, "x");
    check_refused(&h, port, b, n, PROMPT_MS, "198.51.100.1 again");
    CHECK(echo_ok(a, "a") && echo_ok(c, "c"));
    close_fd(&a);
    WAIT_FOR(h.closes == 1, SC(5000), ok);
    CHECK(ok);
    d = announce(&h, port, b, v2_addr(b, "198.51.100.1", 3001, NULL, 0), pa, sizeof pa);
    CHECK(d >= 0 && echo_ok(d, "room again"));
    tf_stats st = stats_of(h.srv);
    CHECK(st.connections_accepted == 3 && st.connections_rejected == 1);
done:
    close_fd(&a);
    close_fd(&c);
    close_fd(&d);
    pstop(&h);
}

/* ---- drain ---------------------------------------------------------------------------- */

static void test_drain_then_bind_again(void) {
    struct phost old, neu;
    char addr[64], peer[128];
    uint8_t b[64];
    int a = -1, c = -1, ok;
    memset(&neu, 0, sizeof neu);
    REQUIRE(pstart(&old, NULL, TF_PROXY_V2, 0));
    uint16_t port = tf_server_port(old.srv);
    a = announce(&old, port, b, v2_addr(b, "198.51.100.1", 1001, NULL, 0), peer, sizeof peer);
    REQUIRE(a >= 0 && echo_ok(a, "before"));
    CHECK_RC(tf_server_drain(old.srv), TF_OK);
    CHECK(port_refuses(port, SC(1000)));
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)port);
    REQUIRE(pstart(&neu, addr, TF_PROXY_V2, 0));
    CHECK(tf_server_port(neu.srv) == port);
    c = announce(&neu, port, b, v2_addr(b, "198.51.100.2", 1002, NULL, 0), peer, sizeof peer);
    CHECK(c >= 0 && echo_ok(c, "new"));
    for (int i = 0; i < 20; i++)
        CHECK(echo_ok(a, "old, after the drain"));
    CHECK(connects_of(&old) == 1);
    CHECK(stats_of(old.srv).connections_active == 1);
    close_fd(&a);
    WAIT_FOR(old.closes == 1, SC(5000), ok);
    CHECK(ok && wait_active(old.srv, 0, SC(2000)));
    CHECK_RC(tf_server_stop(old.srv, 1000), TF_OK);
    CHECK(c >= 0 && echo_ok(c, "new, after the old one stopped"));
done:
    close_fd(&a);
    close_fd(&c);
    pstop(&old);
    pstop(&neu);
}

static int unix_connect(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    if (fd >= 0)
        set_timeouts(fd, SC(10000));
    return fd;
}

static void test_drain_unix_removes_file(void) {
    struct phost old, neu;
    char dir[] = "/tmp/tf-proxy-XXXXXX", path[128], addr[160];
    struct stat sb;
    int a = -1, c = -1, ok;
    memset(&old, 0, sizeof old);
    memset(&neu, 0, sizeof neu);
    REQUIRE(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/s.sock", dir);
    snprintf(addr, sizeof addr, "unix:%s", path);
    REQUIRE(pstart(&old, addr, TF_PROXY_OFF, 0));
    CHECK(stat(path, &sb) == 0);
    a = unix_connect(path);
    REQUIRE(a >= 0);
    WAIT_FOR(old.connects == 1, SC(5000), ok);
    CHECK(ok && echo_ok(a, "before"));
    CHECK_RC(tf_server_drain(old.srv), TF_OK);
    CHECKF(stat(path, &sb) != 0 && errno == ENOENT, "%s still there after the drain returned", path);
    CHECK(unix_connect(path) < 0);
    CHECK(echo_ok(a, "old, after the drain"));
    REQUIRE(pstart(&neu, addr, TF_PROXY_OFF, 0));
    c = unix_connect(path);
    CHECK(c >= 0 && echo_ok(c, "new"));
    CHECK(echo_ok(a, "old, next to the new"));
    CHECK_RC(tf_server_drain(old.srv), TF_OK);
    pstop(&old);
    CHECKF(stat(path, &sb) == 0, "stopping the drained server removed the new server's file");
    CHECK(c >= 0 && echo_ok(c, "new, after the old one stopped"));
done:
    close_fd(&a);
    close_fd(&c);
    pstop(&old);
    pstop(&neu);
    unlink(path);
    rmdir(dir);
}

static void test_drain_idempotent_and_stopped_after_stop(void) {
    struct phost h;
    int a = -1, ok;
    REQUIRE(pstart(&h, NULL, TF_PROXY_OFF, 0));
    a = cli_connect(tf_server_port(h.srv));
    WAIT_FOR(h.connects == 1, SC(5000), ok);
    REQUIRE(ok);
    for (int i = 0; i < 3; i++)
        CHECK_RC(tf_server_drain(h.srv), TF_OK);
    CHECK(echo_ok(a, "after three drains"));
    CHECK_RC(tf_server_drain(NULL), TF_ERR_INVALID);
    CHECK_RC(tf_server_stop(h.srv, 0), TF_OK);
    CHECK_RC(tf_server_drain(h.srv), TF_ERR_STOPPED);
done:
    close_fd(&a);
    pstop(&h);
}

static void test_connect_after_drain(void) {
    struct phost s, t;
    char addr[64];
    tf_conn_id out = 0;
    int ok;
    memset(&t, 0, sizeof t);
    REQUIRE(pstart(&s, NULL, TF_PROXY_V2, 0));
    REQUIRE(pstart(&t, NULL, TF_PROXY_OFF, 0));
    s.echo = 0; /* t echoes; s records */
    CHECK_RC(tf_server_drain(s.srv), TF_OK);
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)tf_server_port(t.srv));
    CHECK_RC(tf_connect(s.srv, addr, &out), TF_OK);
    WAIT_FOR(s.connects == 1, SC(5000), ok);
    CHECKF(ok && strcmp(s.peer[0], addr) == 0, "outbound peer '%s'", s.peer[0]);
    CHECK_RC(tf_send(s.srv, out, (const uint8_t *)"ping", 4), TF_OK);
    WAIT_FOR(s.messages == 1, SC(5000), ok);
    CHECKF(ok && s.last_msg_conn == out && strcmp(s.last_msg, "ping") == 0, "got '%s'", s.last_msg);
    CHECK(port_refuses(tf_server_port(s.srv), SC(1000)));
done:
    pstop(&s);
    pstop(&t);
}

/* A drain from on_message stops the listener listening during the call: an
 * attempt made after it returned, while the callback still runs, is refused. */
static void test_drain_from_a_callback_refuses_at_once(void) {
    struct phost h;
    int a = -1, ok;
    REQUIRE(pstart(&h, NULL, TF_PROXY_OFF, 0));
    h.drain_on_cue = 1;
    uint16_t port = tf_server_port(h.srv);
    REQUIRE((a = cli_connect(port)) >= 0);
    REQUIRE(send_frame(a, "drain", 5) == 0);
    WAIT_FOR(h.drained != 0, SC(5000), ok);
    CHECKF(ok && h.drained == TF_OK + 1, "tf_server_drain in on_message: %d", h.drained - 1);
    CHECKF(port_refuses(port, 0), "an attempt after the drain call returned was not refused");
    CHECK(expect_frame(a, "drain"));
    CHECK(echo_ok(a, "served on"));
    CHECK(connects_of(&h) == 1);
done:
    close_fd(&a);
    pstop(&h);
}

static const struct test tests[] = {
    TEST(test_v1_tcp4_tcp6_unknown, 10, "v"),
    TEST(test_v2_tcp4_tcp6_local_unspec, 10, "v"),
    TEST(test_header_and_frames_in_one_segment, 10, "v"),
    TEST(test_header_split_at_every_byte, 60, ""),
    TEST(test_bad_signatures, 20, "v"),
    TEST(test_oversized_v1_line, 10, "v"),
    TEST(test_truncated_v2_lengths, 10, "v"),
    TEST(test_tlvs_skipped, 10, "v"),
    TEST(test_modes_refuse_the_other, 10, "v"),
    TEST(test_missing_header_closed_after_5s, 15, ""),
    TEST(test_per_ip_cap_without_proxy, 10, "v"),
    TEST(test_per_ip_cap_with_proxy, 10, "v"),
    TEST(test_drain_then_bind_again, 10, "v"),
    TEST(test_drain_unix_removes_file, 10, "v"),
    TEST(test_drain_idempotent_and_stopped_after_stop, 10, "v"),
    TEST(test_connect_after_drain, 10, "v"),
    TEST(test_drain_from_a_callback_refuses_at_once, 10, "v"),
};

int main(int argc, char **argv) {
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
