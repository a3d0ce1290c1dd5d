/* test_reach: the reach additions through the C API, over real sockets: every
 * prefix format at its size limits and split at every byte, impossible
 * lengths, the setters; Unix sockets (path, abstract, credentials, the file's
 * mode, another uid, the socket-file rules); fd:N from a parent process;
 * outbound connections (tf_connect: our own listener, refused, missing,
 * timed out, queued before the connect, closed before it, pull mode, a pure
 * client, max connections, stop, argument checks).
 *
 *   TF_TEST_BACKEND=poll|epoll test_reach [--list] [NAME...]
 *   test_reach --dns-server             a DNS-over-TCP responder for interop tests
 *
 * (--fd-child and --uid-client are this program run as a child by two tests.)
 * One line per test ("ok"/"FAIL"), a summary, exit status 0 only if all passed. */
#include "robust.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/un.h>

static char g_self[PATH_MAX]; /* this program, for the tests that run it as a child */

/* ---- a host that records peers, messages and closes --------------------------- */

#define MAXC 64
#define MAXM 512

struct rhost {
    tf_server *srv;
    int echo;             /* echo every frame to its sender ... */
    tf_conn_id no_echo;   /* ... except on this connection (an outbound one to ourselves) */
    int refuse_uid;       /* >= 0: on_connect refuses peers whose text says this uid */
    int connects, closes, messages, refused;
    tf_conn_id conn[MAXC];
    char peer[MAXC][128];
    tf_conn_id closed[MAXC];
    int32_t reason[MAXC];
    char refused_peer[128];
    tf_conn_id msg_conn[MAXM];
    size_t msg_len[MAXM];
    uint8_t msg_head[MAXM][24];
};

static int rh_connect(void *ud, tf_conn_id c, const char *peer) {
    struct rhost *h = ud;
    if (h->refuse_uid >= 0) {
        char needle[32];
        snprintf(needle, sizeof needle, ",uid=%d,", h->refuse_uid);
        if (strstr(peer, needle) != NULL) {
            LOCKED(h->refused++; snprintf(h->refused_peer, sizeof h->refused_peer, "%s", peer));
            return 1;
        }
    }
    LOCKED(if (h->connects < MAXC) {
        h->conn[h->connects] = c;
        snprintf(h->peer[h->connects], sizeof h->peer[0], "%s", peer);
    } h->connects++);
    return 0;
}

static void rh_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    struct rhost *h = ud;
    if (h->echo && c != h->no_echo)
        (void)tf_send(h->srv, c, d, n);
    LOCKED(if (h->messages < MAXM) {
        h->msg_conn[h->messages] = c;
        h->msg_len[h->messages] = n;
        memcpy(h->msg_head[h->messages], d, n < 24 ? n : 24);
    } h->messages++);
}

static void rh_close(void *ud, tf_conn_id c, int32_t reason) {
    struct rhost *h = ud;
    LOCKED(if (h->closes < MAXC) {
        h->closed[h->closes] = c;
        h->reason[h->closes] = reason;
    } h->closes++);
}

static void rh_init(struct rhost *h) {
    memset(h, 0, sizeof *h);
    h->echo = 1;
    h->refuse_uid = -1;
}

/* A config on addr with the backend under test. */
static tf_config *cfg_at(const char *addr) {
    tf_config *cfg = tf_config_new();
    if (cfg == NULL)
        return NULL;
    if (tf_config_set_address(cfg, addr) != TF_OK || tf_config_set_backend(cfg, g_backend) != TF_OK) {
        fprintf(stderr, "    config %s: %s\n", addr, tf_last_error());
        tf_config_free(cfg);
        return NULL;
    }
    return cfg;
}

/* Starts h with cfg (freed here); NULL on failure (reported). */
static tf_server *rh_start(struct rhost *h, tf_config *cfg) {
    tf_callbacks cb = {h, rh_connect, rh_message, rh_close};
    if (cfg == NULL)
        return NULL;
    int32_t rc = tf_server_start(cfg, &cb, &h->srv);
    if (rc != TF_OK) {
        fprintf(stderr, "    tf_server_start: %d %s\n", (int)rc, tf_last_error());
        h->srv = NULL;
    }
    tf_config_free(cfg);
    return h->srv;
}

static void rh_free(struct rhost *h) {
    if (h->srv != NULL) {
        tf_server_stop(h->srv, 0);
        tf_server_free(h->srv);
        h->srv = NULL;
    }
}

/* 1 once at least n connections were accepted (or established), waiting up to ms. */
static int rh_wait_connects(struct rhost *h, int n, int ms) {
    int ok;
    WAIT_FOR(h->connects >= n, ms, ok);
    return ok;
}

/* reason_of for rhost (called with g_mu held inside WAIT_FOR conditions). */
static int32_t reason_of_r(const struct rhost *h, tf_conn_id c) {
    int32_t r = -1;
    for (int i = 0; i < h->closes && i < MAXC; i++)
        if (h->closed[i] == c)
            r = h->reason[i];
    return r;
}

/* The close reason of c, waiting up to ms; -1 if none came. */
static int32_t rh_wait_close(struct rhost *h, tf_conn_id c, int ms) {
    int ok;
    WAIT_FOR(reason_of_r(h, c) >= 0, ms, ok);
    (void)ok;
    pthread_mutex_lock(&g_mu);
    int32_t r = reason_of_r(h, c);
    pthread_mutex_unlock(&g_mu);
    return r;
}

/* The peer text on_connect got for c ("" if none); copied into out. */
static const char *rh_peer(struct rhost *h, tf_conn_id c, char out[128]) {
    out[0] = '\0';
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < h->connects && i < MAXC; i++)
        if (h->conn[i] == c)
            snprintf(out, 128, "%s", h->peer[i]);
    pthread_mutex_unlock(&g_mu);
    return out;
}

static int rh_connected(struct rhost *h, tf_conn_id c) {
    char p[128];
    return rh_peer(h, c, p)[0] != '\0';
}

/* Messages received on c so far. */
static int rh_count_msgs(struct rhost *h, tf_conn_id c) {
    int n = 0;
    for (int i = 0; i < h->messages && i < MAXM; i++)
        n += h->msg_conn[i] == c;
    return n;
}

static int rh_has_msg(struct rhost *h, tf_conn_id c, const char *text) {
    size_t n = strlen(text);
    for (int i = 0; i < h->messages && i < MAXM; i++)
        if (h->msg_conn[i] == c && h->msg_len[i] == n && memcmp(h->msg_head[i], text, n < 24 ? n : 24) == 0)
            return 1;
    return 0;
}

static tf_conn_id rh_conn(struct rhost *h, int i) {
    pthread_mutex_lock(&g_mu);
    tf_conn_id c = i < MAXC ? h->conn[i] : 0;
    pthread_mutex_unlock(&g_mu);
    return c;
}

static void my_creds(char out[128]) {
    snprintf(out, 128, "unix:pid=%d,uid=%u,gid=%u", (int)getpid(), (unsigned)getuid(), (unsigned)getgid());
}

/* ---- prefix formats ---------------------------------------------------------------- */

struct fmt {
    unsigned width, flags;
};

static const struct fmt FORMATS[16] = {
    {1, 0}, {1, 1}, {1, 2}, {1, 3}, {2, 0}, {2, 1}, {2, 2}, {2, 3},
    {4, 0}, {4, 1}, {4, 2}, {4, 3}, {8, 0}, {8, 1}, {8, 2}, {8, 3},
};

static int f_be(struct fmt f) { return (f.flags & TF_PREFIX_BIG_ENDIAN) != 0; }
static int f_inc(struct fmt f) { return (f.flags & TF_PREFIX_INCLUDES_ITSELF) != 0; }

/* The largest payload the prefix can say: 2^(8w) - 1, minus w with INCLUDES_ITSELF. */
static uint64_t f_cap(struct fmt f) {
    uint64_t all = f.width == 8 ? UINT64_MAX : (((uint64_t)1 << (8 * f.width)) - 1);
    return all - (f_inc(f) ? f.width : 0);
}

/* Writes the raw value in f's width and byte order; returns the width. */
static size_t f_raw(struct fmt f, uint64_t v, uint8_t *out) {
    for (unsigned i = 0; i < f.width; i++) {
        uint8_t b = (uint8_t)(v >> (8 * i));
        out[f_be(f) ? f.width - 1 - i : i] = b;
    }
    return f.width;
}

static size_t f_prefix(struct fmt f, uint64_t len, uint8_t *out) {
    return f_raw(f, len + (f_inc(f) ? f.width : 0), out);
}

/* Frame `len` bytes of p into out (room for width + len); returns the size. */
static size_t f_encode(struct fmt f, const void *p, size_t len, uint8_t *out) {
    size_t w = f_prefix(f, len, out);
    if (len)
        memcpy(out + w, p, len);
    return w + len;
}

static int f_send(int fd, struct fmt f, const void *p, size_t len) {
    uint8_t *buf = malloc(len + 8);
    if (buf == NULL)
        return -1;
    size_t n = f_encode(f, p, len, buf);
    int rc = send_all(fd, buf, n);
    free(buf);
    return rc;
}

/* Reads one frame in format f: its payload (malloc'd, *len set) or NULL on EOF/error. */
static uint8_t *f_recv(int fd, struct fmt f, size_t *len) {
    uint8_t pre[8];
    if (recv_all(fd, pre, f.width) != 0)
        return NULL;
    uint64_t v = 0;
    for (unsigned i = 0; i < f.width; i++)
        v |= (uint64_t)pre[f_be(f) ? f.width - 1 - i : i] << (8 * i);
    if (f_inc(f))
        v -= f.width;
    if (v > (64u << 20))
        return NULL;
    uint8_t *p = malloc((size_t)v + 1);
    if (p == NULL || (v && recv_all(fd, p, (size_t)v) != 0)) {
        free(p);
        return NULL;
    }
    *len = (size_t)v;
    return p;
}

/* 1 when the next frame on fd (format f) is exactly p[0..len]. */
static int f_expect(int fd, struct fmt f, const void *p, size_t len) {
    size_t n = 0;
    uint8_t *got = f_recv(fd, f, &n);
    int ok = got != NULL && n == len && (len == 0 || memcmp(got, p, len) == 0);
    free(got);
    return ok;
}

static void fill_pattern(uint8_t *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(i * 31 + seed);
}

/* An echo server on addr speaking f (max_frame 0: the default). */
static tf_server *start_fmt(struct rhost *h, const char *addr, struct fmt f, uint32_t max_frame) {
    rh_init(h);
    tf_config *cfg = cfg_at(addr);
    if (cfg == NULL)
        return NULL;
    if (tf_config_set_prefix(cfg, f.width, f.flags) != TF_OK ||
        (max_frame && tf_config_set_max_frame(cfg, max_frame) != TF_OK)) {
        fprintf(stderr, "    setters: %s\n", tf_last_error());
        tf_config_free(cfg);
        return NULL;
    }
    return rh_start(h, cfg);
}

/* ---- Unix sockets, temp dirs, descriptors --------------------------------------------- */

static void set_un(struct sockaddr_un *a, socklen_t *len, const char *name) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (name[0] == '@') { /* abstract: sun_path[0] stays NUL */
        memcpy(a->sun_path + 1, name + 1, n - 1);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    } else {
        memcpy(a->sun_path, name, n);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    }
}

/* Connects to a Unix socket ("/path" or "@abstract"); -1 with errno on failure. */
static int unix_connect(const char *name) {
    struct sockaddr_un a;
    socklen_t len;
    set_un(&a, &len, name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_timeouts(fd, SC(10000));
    if (connect(fd, (struct sockaddr *)&a, len) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* A listening Unix socket of our own (not the library's); -1 on failure. */
static int unix_listen(const char *name) {
    struct sockaddr_un a;
    socklen_t len;
    set_un(&a, &len, name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, len) != 0 || listen(fd, 16) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* A fresh directory under /tmp (mkdtemp), path in dir. */
static int make_dir(char dir[64], const char *tag) {
    snprintf(dir, 64, "/tmp/tf-reach-%s-XXXXXX", tag);
    return mkdtemp(dir) != NULL ? 0 : -1;
}

/* Removes the directory and what the tests left in it (one level). */
static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (d != NULL) {
        struct dirent *e;
        char p[PATH_MAX];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            if (unlink(p) != 0)
                (void)rmdir(p);
        }
        closedir(d);
    }
    (void)rmdir(dir);
}

static int path_mode(const char *p) { /* st_mode via lstat, or -1 */
    struct stat st;
    return lstat(p, &st) == 0 ? (int)st.st_mode : -1;
}

static int is_socket_path(const char *p) {
    int m = path_mode(p);
    return m >= 0 && S_ISSOCK((mode_t)m);
}

/* A free 127.0.0.1 port nobody listens on. */
static uint16_t refused_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    (void)bind(fd, (struct sockaddr *)&a, sizeof a);
    (void)getsockname(fd, (struct sockaddr *)&a, &len);
    close(fd);
    return ntohs(a.sin_port);
}

/* A TCP listener of our own on 127.0.0.1:0 with this backlog; its port in *port. */
static int tcp_listen(int backlog, uint16_t *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, backlog) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    (void)getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

/* accept() with a bounded wait; -1 when nothing came. */
static int accept_within(int lfd, int ms) {
    struct pollfd p = {lfd, POLLIN, 0};
    if (poll(&p, 1, ms) != 1)
        return -1;
    int fd = accept(lfd, NULL, NULL);
    if (fd >= 0)
        set_timeouts(fd, SC(10000));
    return fd;
}

/* A loopback listener with a full accept queue (backlog 0, filled by
 * connections nobody accepts): a new connect is not answered (its SYN is
 * dropped) until full_release() accepts the fillers. */
struct full {
    int lfd;
    uint16_t port;
    int fillers[64];
    int n;
    char addr[32];
};

static int full_open(struct full *b) {
    memset(b, 0, sizeof *b);
    b->lfd = tcp_listen(0, &b->port);
    if (b->lfd < 0)
        return -1;
    snprintf(b->addr, sizeof b->addr, "127.0.0.1:%u", (unsigned)b->port);
    while (b->n < 64) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons(b->port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
        struct pollfd p = {fd, POLLOUT, 0};
        if (rc != 0 && errno == EINPROGRESS && poll(&p, 1, 300) != 1) {
            close(fd); /* no answer: the queue is full */
            return 0;
        }
        b->fillers[b->n++] = fd;
    }
    return -1;
}

/* Accepts the fillers: the next SYN retransmission is answered. */
static void full_release(struct full *b) {
    for (int i = 0; i < b->n; i++) {
        int fd = accept_within(b->lfd, SC(5000));
        if (fd >= 0)
            close(fd);
    }
}

static void full_close(struct full *b) {
    for (int i = 0; i < b->n; i++)
        close(b->fillers[i]);
    b->n = 0;
    close_fd(&b->lfd);
}

/* tf_connect, checked; 0 on failure (reported). */
static tf_conn_id connect_out(tf_server *srv, const char *addr) {
    tf_conn_id id = 0;
    int32_t rc = tf_connect(srv, addr, &id);
    if (rc != TF_OK || id == 0) {
        fprintf(stderr, "    tf_connect(%s): %d %s\n", addr, (int)rc, tf_last_error());
        return 0;
    }
    return id;
}

/* ============================================================ framing */

static const uint32_t SMALL_MAX[9] = {0, 100, 1000, 0, 70000, 0, 0, 0, 70000};

/* Every format echoes up to its limit, tf_send of one more is TF_ERR_TOO_LARGE,
 * a peer announcing more is closed with TF_CLOSE_TOO_LARGE. */
static void test_prefix_every_format_at_its_limits(void) {
    struct rhost h;
    uint8_t *buf = malloc(70001 + 16);
    REQUIRE(buf != NULL);
    for (int i = 0; i < 16; i++) {
        struct fmt f = FORMATS[i];
        for (int round = 0; round < 2; round++) {
            uint32_t max = round == 0 ? 0 : SMALL_MAX[f.width];
            if (round == 0 && f.width >= 4)
                continue; /* the limit is max frame (8 MiB): round 1 covers max frame */
            uint64_t limit = f_cap(f) < (max ? max : 8388608u) ? f_cap(f) : (max ? max : 8388608u);
            int fd = -1, bad = -1;
            if (start_fmt(&h, "127.0.0.1:0", f, max) == NULL) {
                CHECK(0);
                continue;
            }
            fd = cli_connect(tf_server_port(h.srv));
            CHECK(fd >= 0 && rh_wait_connects(&h, 1, SC(5000)));
            tf_conn_id c = rh_conn(&h, 0);
            size_t sizes[4] = {0, 1, (size_t)limit - 1, (size_t)limit};
            for (int s = 0; s < 4 && fd >= 0; s++) {
                fill_pattern(buf, sizes[s], (unsigned)s);
                CHECKF(f_send(fd, f, buf, sizes[s]) == 0 && f_expect(fd, f, buf, sizes[s]),
                       "width %u flags %u max %u: echo of %zu", f.width, f.flags, max, sizes[s]);
            }
            fill_pattern(buf, (size_t)limit + 1, 7);
            CHECK_RC(tf_send(h.srv, c, buf, (size_t)limit + 1), TF_ERR_TOO_LARGE);
            CHECK_RC(tf_send(h.srv, c, buf, (size_t)limit), TF_OK);
            CHECKF(fd >= 0 && f_expect(fd, f, buf, (size_t)limit), "width %u flags %u: tf_send of the limit",
                   f.width, f.flags);
            if (limit < f_cap(f)) {
                uint8_t pre[8];
                bad = cli_connect(tf_server_port(h.srv));
                CHECK(bad >= 0 && rh_wait_connects(&h, 2, SC(5000)));
                tf_conn_id b = rh_conn(&h, 1);
                CHECK(bad >= 0 && send_all(bad, pre, f_prefix(f, limit + 1, pre)) == 0);
                CHECKF(rh_wait_close(&h, b, SC(5000)) == TF_CLOSE_TOO_LARGE, "width %u flags %u: announcing %" PRIu64,
                       f.width, f.flags, limit + 1);
                CHECK(bad >= 0 && peer_end(bad, SC(5000)) > 0);
                close_fd(&bad);
            }
            CHECK(fd >= 0 && f_send(fd, f, "still", 5) == 0 && f_expect(fd, f, "still", 5));
            close_fd(&fd);
            rh_free(&h);
        }
    }
done:
    free(buf);
}

/* 255/254 and 65535/65533: API.md's formula at the byte widths. */
static void test_prefix_largest_payload_formula(void) {
    struct { unsigned w, flags; uint64_t want; } cases[] = {
        {1, 0, 255}, {1, 2, 254}, {1, 3, 254}, {2, 1, 65535}, {2, 2, 65533}, {2, 3, 65533},
    };
    static uint8_t buf[65536];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct fmt f = {cases[i].w, cases[i].flags};
        struct rhost h;
        CHECK(f_cap(f) == cases[i].want);
        if (start_fmt(&h, "127.0.0.1:0", f, 0) == NULL) {
            CHECK(0);
            continue;
        }
        int fd = cli_connect(tf_server_port(h.srv));
        CHECK(fd >= 0 && rh_wait_connects(&h, 1, SC(5000)));
        tf_conn_id c = rh_conn(&h, 0);
        CHECK_RC(tf_send(h.srv, c, buf, (size_t)cases[i].want + 1), TF_ERR_TOO_LARGE);
        CHECK_RC(tf_send(h.srv, c, buf, (size_t)cases[i].want), TF_OK);
        CHECKF(fd >= 0 && f_expect(fd, f, buf, (size_t)cases[i].want), "width %u flags %u", f.width, f.flags);
        close_fd(&fd);
        rh_free(&h);
    }
}

/* A stream of frames written one byte at a time, then cut in two at every byte. */
static void test_prefix_split_at_every_byte(void) {
    static const size_t lens[4] = {0, 1, 3, 9};
    for (int i = 0; i < 16; i++) {
        struct fmt f = FORMATS[i];
        struct rhost h;
        uint8_t stream[128], pay[4][16];
        size_t n = 0;
        for (int k = 0; k < 4; k++) {
            fill_pattern(pay[k], lens[k], (unsigned)k);
            n += f_encode(f, pay[k], lens[k], stream + n);
        }
        if (start_fmt(&h, "127.0.0.1:0", f, 0) == NULL) {
            CHECK(0);
            continue;
        }
        int fd = cli_connect(tf_server_port(h.srv));
        int ok = fd >= 0;
        for (size_t b = 0; ok && b < n; b++) {
            ok = send_all(fd, stream + b, 1) == 0;
            sleep_ms(0.5);
        }
        for (int k = 0; ok && k < 4; k++)
            ok = f_expect(fd, f, pay[k], lens[k]);
        CHECKF(ok, "width %u flags %u: byte at a time", f.width, f.flags);
        for (size_t cut = 1; ok && cut < n; cut++) {
            ok = send_all(fd, stream, cut) == 0;
            sleep_ms(0.3);
            ok = ok && send_all(fd, stream + cut, n - cut) == 0;
            for (int k = 0; ok && k < 4; k++)
                ok = f_expect(fd, f, pay[k], lens[k]);
            CHECKF(ok, "width %u flags %u: cut at %zu", f.width, f.flags, cut);
        }
        pthread_mutex_lock(&g_mu);
        int msgs = h.messages;
        pthread_mutex_unlock(&g_mu);
        CHECKF(msgs == 4 * (int)n, "width %u flags %u: %d frames delivered, want %d", f.width, f.flags, msgs,
               4 * (int)n);
        close_fd(&fd);
        rh_free(&h);
    }
}

/* INCLUDES_ITSELF with a value below the width: TF_CLOSE_PROTOCOL after the
 * frames before it; the width itself is an empty frame. */
static void test_prefix_impossible_lengths(void) {
    for (int i = 0; i < 16; i++) {
        struct fmt f = FORMATS[i];
        struct rhost h;
        if (!f_inc(f))
            continue;
        if (start_fmt(&h, "127.0.0.1:0", f, 0) == NULL) {
            CHECK(0);
            continue;
        }
        for (unsigned v = 0; v < f.width; v++) {
            uint8_t wire[64];
            size_t n = f_encode(f, "before", 6, wire);
            n += f_raw(f, v, wire + n);
            n += f_encode(f, "after", 5, wire + n);
            int fd = cli_connect(tf_server_port(h.srv));
            CHECK(fd >= 0 && rh_wait_connects(&h, (int)v + 1, SC(5000)));
            tf_conn_id c = rh_conn(&h, (int)v);
            CHECK(fd >= 0 && send_all(fd, wire, n) == 0);
            CHECKF(rh_wait_close(&h, c, SC(5000)) == TF_CLOSE_PROTOCOL, "width %u flags %u value %u", f.width,
                   f.flags, v);
            CHECK(fd >= 0 && peer_end(fd, SC(5000)) > 0);
            pthread_mutex_lock(&g_mu);
            CHECKF(rh_count_msgs(&h, c) == 1 && rh_has_msg(&h, c, "before"), "width %u value %u", f.width, v);
            pthread_mutex_unlock(&g_mu);
            close_fd(&fd);
        }
        uint8_t pre[8];
        int fd = cli_connect(tf_server_port(h.srv));
        CHECKF(fd >= 0 && send_all(fd, pre, f_raw(f, f.width, pre)) == 0 && f_expect(fd, f, "", 0),
               "width %u: the width alone is an empty frame", f.width);
        close_fd(&fd);
        rh_free(&h);
    }
}

static void test_setters_validate(void) {
    tf_config *cfg = tf_config_new();
    char longp[128], longa[128];
    REQUIRE(cfg != NULL);
    for (unsigned w = 0; w <= 16; w++)
        for (unsigned fl = 0; fl < 8; fl++) {
            int good = (w == 1 || w == 2 || w == 4 || w == 8) && fl < 4;
            CHECKF(tf_config_set_prefix(cfg, w, fl) == (good ? TF_OK : TF_ERR_INVALID), "width %u flags %u", w, fl);
        }
    CHECK_RC(tf_config_set_prefix(cfg, 4, 0x80000000u), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_prefix(cfg, UINT32_MAX, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_prefix(NULL, 2, 1), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_unix_mode(cfg, 0), TF_OK);
    CHECK_RC(tf_config_set_unix_mode(cfg, 0777), TF_OK);
    CHECK_RC(tf_config_set_unix_mode(cfg, 01000), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_unix_mode(cfg, 04755), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_unix_mode(NULL, 0600), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_connect_timeout_ms(cfg, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_connect_timeout_ms(cfg, 1), TF_OK);
    CHECK_RC(tf_config_set_connect_timeout_ms(cfg, UINT32_MAX), TF_OK);
    CHECK_RC(tf_config_set_connect_timeout_ms(NULL, 10), TF_ERR_INVALID);
    snprintf(longp, sizeof longp, "unix:/%0106d", 0); /* 107 bytes of path */
    snprintf(longa, sizeof longa, "unix:@%0107d", 0); /* 107 bytes of name */
    const char *good[] = {"unix:/tmp/x.sock", "unix:@x", "fd:0", "fd:3", "none", longp, longa};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        CHECKF(tf_config_set_address(cfg, good[i]) == TF_OK, "%s: %s", good[i], tf_last_error());
    snprintf(longp, sizeof longp, "unix:/%0107d", 0);
    snprintf(longa, sizeof longa, "unix:@%0108d", 0);
    const char *bad[] = {"unix:", "unix:@", "fd:", "fd:-1", "fd:x", "NONE", "localhost:80", "example.test:53",
                         longp, longa};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECKF(tf_config_set_address(cfg, bad[i]) == TF_ERR_INVALID, "%s", bad[i]);
done:
    tf_config_free(cfg);
}

/* ============================================================ Unix sockets */

static void test_unix_path_echo_peer_and_file(void) {
    struct rhost h;
    char dir[64] = "", path[128], addr[160], me[128], peer[128];
    int fd = -1, fd2 = -1;
    struct fmt f = {2, TF_PREFIX_BIG_ENDIAN};
    REQUIRE(make_dir(dir, "path") == 0);
    snprintf(path, sizeof path, "%s/echo.sock", dir);
    snprintf(addr, sizeof addr, "unix:%s", path);
    REQUIRE(start_fmt(&h, addr, f, 0) != NULL);
    CHECK(tf_server_port(h.srv) == 0);
    CHECK(is_socket_path(path));
    REQUIRE((fd = unix_connect(path)) >= 0);
    CHECK(f_send(fd, f, "over unix", 9) == 0 && f_expect(fd, f, "over unix", 9));
    CHECK(f_send(fd, f, "", 0) == 0 && f_expect(fd, f, "", 0));
    REQUIRE(rh_wait_connects(&h, 1, SC(5000)));
    my_creds(me);
    CHECKF(strcmp(rh_peer(&h, rh_conn(&h, 0), peer), me) == 0, "peer '%s', want '%s'", peer, me);
    tf_conn_info info;
    CHECK_RC(tf_conn_get_info(h.srv, rh_conn(&h, 0), &info), TF_OK);
    CHECK(strcmp(info.peer, me) == 0 && info.outbound == 0);
    { /* a second server on the live path: TF_ERR_IO, ours untouched */
        struct rhost h2;
        CHECK(start_fmt(&h2, addr, f, 0) == NULL);
        CHECK(is_socket_path(path));
    }
    REQUIRE((fd2 = unix_connect(path)) >= 0);
    CHECK(f_send(fd2, f, "two", 3) == 0 && f_expect(fd2, f, "two", 3));
    CHECK_RC(tf_server_stop(h.srv, 0), TF_OK);
    CHECK(peer_end(fd, SC(5000)) > 0);
    CHECKF(path_mode(path) < 0, "the socket file is removed at stop");
done:
    close_fd(&fd);
    close_fd(&fd2);
    rh_free(&h);
    if (dir[0])
        remove_dir(dir);
}

static void test_unix_abstract(void) {
    struct rhost h, h2;
    char name[64], addr[80], me[128], peer[128];
    int fd = -1;
    struct fmt f = {4, 0};
    memset(&h2, 0, sizeof h2);
    snprintf(name, sizeof name, "@tf-reach-%d-abs", (int)getpid());
    snprintf(addr, sizeof addr, "unix:%s", name);
    REQUIRE(start_fmt(&h, addr, f, 0) != NULL);
    CHECK(tf_server_port(h.srv) == 0);
    REQUIRE((fd = unix_connect(name)) >= 0);
    CHECK(echo_ok(fd, "abstract"));
    REQUIRE(rh_wait_connects(&h, 1, SC(5000)));
    my_creds(me);
    CHECKF(strcmp(rh_peer(&h, rh_conn(&h, 0), peer), me) == 0, "peer '%s'", peer);
    CHECK(start_fmt(&h2, addr, f, 0) == NULL); /* the name is taken */
    rh_free(&h);
    close_fd(&fd);
    CHECK(unix_connect(name) < 0); /* released at stop */
    REQUIRE(start_fmt(&h2, addr, f, 0) != NULL);
    REQUIRE((fd = unix_connect(name)) >= 0);
    CHECK(echo_ok(fd, "again"));
done:
    close_fd(&fd);
    rh_free(&h);
    rh_free(&h2);
}

static void test_unix_mode_applied(void) {
    static const unsigned modes[] = {0600, 0640, 0660, 0666, 0700, 0777};
    char dir[64] = "", path[128], addr[160];
    REQUIRE(make_dir(dir, "mode") == 0);
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        struct rhost h;
        rh_init(&h);
        snprintf(path, sizeof path, "%s/m%o.sock", dir, modes[i]);
        snprintf(addr, sizeof addr, "unix:%s", path);
        tf_config *cfg = cfg_at(addr);
        CHECK(cfg != NULL && tf_config_set_unix_mode(cfg, modes[i]) == TF_OK);
        if (rh_start(&h, cfg) == NULL) {
            CHECK(0);
            continue;
        }
        int m = path_mode(path);
        CHECKF(m >= 0 && S_ISSOCK((mode_t)m) && (m & 07777) == (int)modes[i], "mode %o: file has %o", modes[i],
               m & 07777);
        int fd = unix_connect(path);
        CHECK(fd >= 0 && echo_ok(fd, "m"));
        close_fd(&fd);
        rh_free(&h);
        CHECK(path_mode(path) < 0);
    }
done:
    if (dir[0])
        remove_dir(dir);
}

/* --uid-client PATH: run as another user by the test below. */
static int uid_client(const char *path) {
    int fd = unix_connect(path);
    if (fd < 0) {
        printf("error:%d\n", errno);
        return 0;
    }
    printf("me:pid=%d,uid=%u,gid=%u\n", (int)getpid(), (unsigned)getuid(), (unsigned)getgid());
    fflush(stdout);
    uint8_t pre[4];
    char buf[64];
    if (send_frame(fd, "who", 3) != 0 || recv_all(fd, pre, 4) != 0 || pre[0] > 60 ||
        recv_all(fd, buf, pre[0]) != 0) {
        printf("eof\n");
    } else {
        buf[pre[0]] = '\0';
        printf("reply:%s\n", buf);
    }
    close(fd);
    return 0;
}

/* How to switch to uid/gid 65534: argv prefix, or NULL (why in *why). */
static const char *const *as_nobody(const char **why) {
    static const char *setpriv[] = {NULL, "--reuid=65534", "--regid=65534", "--clear-groups", NULL};
    static const char *runuser[] = {NULL, "-u", "nobody", "--", NULL};
    static const char *sp[] = {"/usr/bin/setpriv", "/bin/setpriv"};
    static const char *ru[] = {"/usr/sbin/runuser", "/sbin/runuser"};
    if (geteuid() != 0) {
        *why = "not root: cannot switch to another uid";
        return NULL;
    }
    for (int i = 0; i < 2; i++)
        if (access(sp[i], X_OK) == 0) {
            setpriv[0] = sp[i];
            return setpriv;
        }
    for (int i = 0; i < 2; i++)
        if (access(ru[i], X_OK) == 0) {
            runuser[0] = ru[i];
            return runuser;
        }
    *why = "neither setpriv nor runuser is installed";
    return NULL;
}

/* Runs this program's --uid-client as uid 65534; its output in out, its pid in *pid. */
static int run_uid_client(const char *const *prefix, const char *path, char *out, size_t cap, pid_t *pid) {
    const char *argv[12];
    int n = 0, p[2];
    for (; prefix[n] != NULL; n++)
        argv[n] = prefix[n];
    argv[n++] = g_self;
    argv[n++] = "--uid-client";
    argv[n++] = path;
    argv[n] = NULL;
    if (pipe2(p, O_CLOEXEC) != 0)
        return -1;
    *pid = fork();
    if (*pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(p[1]);
    size_t len = 0;
    double end = now_ms() + SC(10000);
    while (len + 1 < cap && now_ms() < end) {
        struct pollfd q = {p[0], POLLIN, 0};
        if (poll(&q, 1, 100) <= 0)
            continue;
        ssize_t r = read(p[0], out + len, cap - 1 - len);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    out[len] = '\0';
    close(p[0]);
    int st = 0;
    for (int i = 0; i < 500 && waitpid(*pid, &st, WNOHANG) == 0; i++)
        sleep_ms(10);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A client running as uid 65534 is refused by an on_connect that checks the uid
 * in the peer text, then served once allowed; with mode 0600 the kernel refuses it. */
static void test_unix_other_uid(void) {
    struct rhost h;
    char dir[64] = "", path[128], addr[160], out[512], want[128];
    const char *why = "";
    pid_t pid = 0;
    const char *const *prefix = as_nobody(&why);
    rh_init(&h);
    if (prefix == NULL) {
        printf("    SKIPPED test_unix_other_uid: %s\n", why);
        return;
    }
    REQUIRE(make_dir(dir, "uid") == 0);
    REQUIRE(chmod(dir, 0777) == 0);
    snprintf(path, sizeof path, "%s/gate.sock", dir);
    snprintf(addr, sizeof addr, "unix:%s", path);
    h.refuse_uid = 65534;
    tf_config *cfg = cfg_at(addr);
    REQUIRE(cfg != NULL && tf_config_set_unix_mode(cfg, 0666) == TF_OK);
    REQUIRE(rh_start(&h, cfg) != NULL);
    int code = run_uid_client(prefix, path, out, sizeof out, &pid);
    if (code == 127 || strstr(out, "me:") == NULL) {
        printf("    SKIPPED test_unix_other_uid: this program cannot run as uid 65534 here (exit %d: %s)\n",
               code, out);
        goto done;
    }
    snprintf(want, sizeof want, "me:pid=%d,uid=65534,gid=65534", (int)pid);
    CHECKF(strstr(out, want) != NULL, "the client runs as uid 65534: %s", out);
    snprintf(want, sizeof want, "unix:pid=%d,uid=65534,gid=65534", (int)pid);
    CHECKF(strstr(out, "eof") != NULL && strstr(out, "reply:") == NULL, "refused: %s", out);
    pthread_mutex_lock(&g_mu);
    CHECKF(h.refused == 1 && strcmp(h.refused_peer, want) == 0 && h.connects == 0,
           "refused %d '%s', want '%s'", h.refused, h.refused_peer, want);
    pthread_mutex_unlock(&g_mu);
    tf_stats st;
    CHECK(tf_server_stats(h.srv, &st) == TF_OK && st.connections_rejected == 1);
    LOCKED(h.refuse_uid = -1);
    run_uid_client(prefix, path, out, sizeof out, &pid);
    CHECKF(strstr(out, "reply:who") != NULL, "accepted: %s", out);
    snprintf(want, sizeof want, "unix:pid=%d,uid=65534,gid=65534", (int)pid);
    char peer[128];
    CHECK(rh_wait_connects(&h, 1, SC(5000)));
    CHECKF(strcmp(rh_peer(&h, rh_conn(&h, 0), peer), want) == 0, "peer '%s', want '%s'", peer, want);
    rh_free(&h);
    /* Mode 0600: the kernel refuses another uid's connect (EACCES). */
    rh_init(&h);
    cfg = cfg_at(addr);
    REQUIRE(cfg != NULL && tf_config_set_unix_mode(cfg, 0600) == TF_OK);
    REQUIRE(rh_start(&h, cfg) != NULL);
    run_uid_client(prefix, path, out, sizeof out, &pid);
    snprintf(want, sizeof want, "error:%d", EACCES);
    CHECKF(strstr(out, want) != NULL, "mode 0600: %s", out);
done:
    rh_free(&h);
    if (dir[0])
        remove_dir(dir);
}

/* A dead socket file is replaced; a live one, a regular file, a directory, a
 * FIFO and a symlink are not, and nothing is deleted. */
static void test_unix_socket_file_rules(void) {
    struct rhost h;
    char dir[64] = "", p[160], addr[200], sub[180];
    int live = -1, fd = -1;
    rh_init(&h);
    REQUIRE(make_dir(dir, "rules") == 0);
    /* dead: bound, then closed; the file stays */
    snprintf(p, sizeof p, "%s/dead.sock", dir);
    int d = unix_listen(p);
    REQUIRE(d >= 0);
    close(d);
    REQUIRE(is_socket_path(p));
    snprintf(addr, sizeof addr, "unix:%s", p);
    REQUIRE(start_fmt(&h, addr, (struct fmt){4, 0}, 0) != NULL);
    REQUIRE((fd = unix_connect(p)) >= 0);
    CHECK(echo_ok(fd, "replaced"));
    close_fd(&fd);
    rh_free(&h);
    CHECK(path_mode(p) < 0);
    /* live: someone else's listener */
    snprintf(p, sizeof p, "%s/live.sock", dir);
    REQUIRE((live = unix_listen(p)) >= 0);
    snprintf(addr, sizeof addr, "unix:%s", p);
    CHECK(start_fmt(&h, addr, (struct fmt){4, 0}, 0) == NULL);
    CHECK(is_socket_path(p));
    REQUIRE((fd = unix_connect(p)) >= 0); /* still theirs, still answering */
    int a = accept_within(live, SC(2000));
    CHECK(a >= 0);
    close_fd(&a);
    close_fd(&fd);
    /* a regular file, a directory, a FIFO, a symlink to a dead socket */
    snprintf(p, sizeof p, "%s/file.sock", dir);
    FILE *fp = fopen(p, "w");
    REQUIRE(fp != NULL);
    fputs("precious", fp);
    fclose(fp);
    snprintf(sub, sizeof sub, "%s/dir.sock", dir);
    REQUIRE(mkdir(sub, 0700) == 0);
    char fifo[160], link[160], target[160];
    snprintf(fifo, sizeof fifo, "%s/fifo.sock", dir);
    REQUIRE(mkfifo(fifo, 0600) == 0);
    snprintf(target, sizeof target, "%s/gone.sock", dir);
    d = unix_listen(target);
    REQUIRE(d >= 0);
    close(d);
    snprintf(link, sizeof link, "%s/link.sock", dir);
    REQUIRE(symlink(target, link) == 0);
    const char *paths[] = {p, sub, fifo, link};
    for (int i = 0; i < 4; i++) {
        int before = path_mode(paths[i]);
        tf_config *cfg;
        tf_server *srv = NULL;
        tf_callbacks cb = {NULL, NULL, host_on_message, NULL};
        snprintf(addr, sizeof addr, "unix:%s", paths[i]);
        cfg = cfg_at(addr);
        REQUIRE(cfg != NULL);
        int32_t rc = tf_server_start(cfg, &cb, &srv);
        tf_config_free(cfg);
        CHECKF(rc == TF_ERR_IO, "%s: %d", paths[i], (int)rc);
        if (rc == TF_OK) {
            tf_server_stop(srv, 0);
            tf_server_free(srv);
        }
        CHECKF(path_mode(paths[i]) == before, "%s left as it was", paths[i]);
    }
    char text[16] = "";
    fp = fopen(p, "r");
    REQUIRE(fp != NULL);
    CHECK(fgets(text, sizeof text, fp) != NULL && strcmp(text, "precious") == 0);
    fclose(fp);
    CHECK(is_socket_path(target));
    /* ours is removed at stop, but not a file someone put there after our start */
    snprintf(p, sizeof p, "%s/ours.sock", dir);
    snprintf(addr, sizeof addr, "unix:%s", p);
    REQUIRE(start_fmt(&h, addr, (struct fmt){4, 0}, 0) != NULL);
    REQUIRE(unlink(p) == 0);
    fp = fopen(p, "w");
    REQUIRE(fp != NULL);
    fclose(fp);
    CHECK_RC(tf_server_stop(h.srv, 0), TF_OK);
    CHECK(path_mode(p) >= 0 && S_ISREG((mode_t)path_mode(p)));
done:
    close_fd(&fd);
    close_fd(&live);
    rh_free(&h);
    if (dir[0])
        remove_dir(dir);
}

/* ============================================================ fd:N */

/* --fd-child N: serves the inherited listener until its stdin ends; prints the
 * port, then whether the descriptor was closed by tf_server_stop. */
static int fd_child(int fd) {
    struct rhost h;
    char addr[32];
    snprintf(addr, sizeof addr, "fd:%d", fd);
    if (start_fmt(&h, addr, (struct fmt){4, 0}, 0) == NULL)
        return 2;
    printf("port=%u\n", (unsigned)tf_server_port(h.srv));
    fflush(stdout);
    char line[16];
    while (read(0, line, sizeof line) > 0) {
    }
    printf("stop=%d\n", (int)tf_server_stop(h.srv, 0));
    printf("fd_open=%d\n", fcntl(fd, F_GETFD) != -1);
    pthread_mutex_lock(&g_mu);
    printf("connects=%d peer=%s\n", h.connects, h.connects ? h.peer[0] : "");
    pthread_mutex_unlock(&g_mu);
    tf_server_free(h.srv);
    return 0;
}

/* Starts this program's --fd-child with lfd as descriptor 3; *in is its stdin,
 * *out its stdout. */
static pid_t spawn_fd_child(int lfd, int *in, int *out) {
    int pi[2], po[2];
    if (pipe2(pi, O_CLOEXEC) != 0 || pipe2(po, O_CLOEXEC) != 0) /* dup2 clears it on 0 and 1 */
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pi[0], 0);
        dup2(po[1], 1);
        if (lfd == 3)
            fcntl(3, F_SETFD, 0);
        else
            dup2(lfd, 3);
        execl(g_self, g_self, "--fd-child", "3", (char *)NULL);
        _exit(127);
    }
    close(pi[0]);
    close(po[1]);
    *in = pi[1];
    *out = po[0];
    return pid;
}

/* Reads the child's output until EOF (bounded). */
static void read_all_fd(int fd, char *buf, size_t cap, int ms) {
    size_t len = 0;
    double end = now_ms() + ms;
    while (len + 1 < cap && now_ms() < end) {
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, 100) <= 0)
            continue;
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    buf[len] = '\0';
}

/* Reads one line (bounded). */
static int read_line_fd(int fd, char *buf, size_t cap, int ms) {
    size_t len = 0;
    double end = now_ms() + ms;
    while (len + 1 < cap && now_ms() < end) {
        struct pollfd q = {fd, POLLIN, 0};
        if (poll(&q, 1, 100) <= 0)
            continue;
        if (read(fd, buf + len, 1) != 1)
            break;
        if (buf[len] == '\n') {
            buf[len] = '\0';
            return 0;
        }
        len++;
    }
    buf[len] = '\0';
    return -1;
}

static int reap(pid_t pid, int ms) {
    int st = 0;
    double end = now_ms() + ms;
    while (waitpid(pid, &st, WNOHANG) == 0) {
        if (now_ms() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return -1;
        }
        sleep_ms(10);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A parent binds and listens; a child process serves that descriptor with "fd:3". */
static void test_fd_from_parent_process(void) {
    char line[128], rest[512], dir[64] = "", path[128], me[128];
    int in = -1, out = -1, fd = -1;
    uint16_t port = 0;
    pid_t pid = -1;
    /* TCP */
    int lfd = tcp_listen(16, &port);
    REQUIRE(lfd >= 0);
    pid = spawn_fd_child(lfd, &in, &out);
    close_fd(&lfd); /* the child holds the only copy */
    REQUIRE(pid > 0);
    REQUIRE(read_line_fd(out, line, sizeof line, SC(10000)) == 0);
    char want[32];
    snprintf(want, sizeof want, "port=%u", (unsigned)port);
    CHECKF(strcmp(line, want) == 0, "'%s', want '%s'", line, want);
    REQUIRE((fd = cli_connect(port)) >= 0);
    CHECK(echo_ok(fd, "served by the child"));
    close_fd(&in);
    read_all_fd(out, rest, sizeof rest, SC(10000));
    CHECKF(strstr(rest, "stop=0\n") && strstr(rest, "fd_open=0\n") && strstr(rest, "connects=1 peer=127.0.0.1:"),
           "%s", rest);
    CHECK(reap(pid, SC(10000)) == 0);
    pid = -1;
    CHECK(peer_end(fd, SC(5000)) > 0);
    CHECK(port_refuses(port, SC(5000)));
    close_fd(&fd);
    close_fd(&out);
    /* Unix: port 0; the file stays (the server did not create it) */
    REQUIRE(make_dir(dir, "fdn") == 0);
    snprintf(path, sizeof path, "%s/activated.sock", dir);
    REQUIRE((lfd = unix_listen(path)) >= 0);
    pid = spawn_fd_child(lfd, &in, &out);
    close_fd(&lfd);
    REQUIRE(pid > 0);
    REQUIRE(read_line_fd(out, line, sizeof line, SC(10000)) == 0);
    CHECKF(strcmp(line, "port=0") == 0, "%s", line);
    REQUIRE((fd = unix_connect(path)) >= 0);
    CHECK(echo_ok(fd, "unix child"));
    close_fd(&in);
    read_all_fd(out, rest, sizeof rest, SC(10000));
    my_creds(me);
    char wantp[160];
    snprintf(wantp, sizeof wantp, "connects=1 peer=%s\n", me);
    CHECKF(strstr(rest, "fd_open=0\n") && strstr(rest, wantp), "%s", rest);
    CHECK(reap(pid, SC(10000)) == 0);
    pid = -1;
    CHECK(is_socket_path(path));
done:
    if (pid > 0)
        reap(pid, 100);
    close_fd(&fd);
    close_fd(&in);
    close_fd(&out);
    close_fd(&lfd);
    if (dir[0])
        remove_dir(dir);
}

static int same_file(int fd, const struct stat *before) {
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == before->st_dev && st.st_ino == before->st_ino;
}

/* Anything but a listening stream socket: TF_ERR_INVALID, and the descriptor is left open. */
static void test_fd_not_a_listener_is_invalid_and_left_open(void) {
    int fds[7], n = 0, sp[2], pp[2];
    uint16_t port;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    fds[n] = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(bind(fds[n], (struct sockaddr *)&a, sizeof a) == 0);
    n++;                                          /* bound, not listening */
    fds[n++] = socket(AF_INET, SOCK_STREAM, 0);   /* fresh */
    fds[n] = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK(bind(fds[n], (struct sockaddr *)&a, sizeof a) == 0);
    n++;                                          /* UDP */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
    fds[n++] = sp[0];                             /* connected Unix */
    close(sp[1]);
    CHECK(pipe(pp) == 0);
    fds[n++] = pp[0];
    close(pp[1]);
    fds[n++] = open("/dev/null", O_RDONLY);
    fds[n++] = socket(AF_UNIX, SOCK_DGRAM, 0);
    for (int i = 0; i < n; i++) {
        struct stat before;
        char addr[32];
        tf_server *srv = NULL;
        tf_callbacks cb = {NULL, NULL, host_on_message, NULL};
        CHECK(fstat(fds[i], &before) == 0);
        snprintf(addr, sizeof addr, "fd:%d", fds[i]);
        tf_config *cfg = cfg_at(addr);
        int32_t rc = cfg ? tf_server_start(cfg, &cb, &srv) : -1;
        tf_config_free(cfg);
        CHECKF(rc == TF_ERR_INVALID, "case %d (%s): %d %s", i, addr, (int)rc, tf_last_error());
        if (rc == TF_OK) {
            tf_server_stop(srv, 0);
            tf_server_free(srv);
        }
        CHECKF(same_file(fds[i], &before), "case %d: the descriptor is left open", i);
        close(fds[i]);
    }
    { /* a number that is not open */
        tf_server *srv = NULL;
        tf_callbacks cb = {NULL, NULL, host_on_message, NULL};
        tf_config *cfg = cfg_at("fd:1000000");
        CHECK(cfg != NULL);
        CHECK_RC(cfg ? tf_server_start(cfg, &cb, &srv) : -1, TF_ERR_INVALID);
        tf_config_free(cfg);
    }
    { /* and a listening one is taken: served, its port reported */
        struct rhost h;
        char addr[32];
        int lfd = tcp_listen(16, &port), fd = -1;
        REQUIRE(lfd >= 0);
        snprintf(addr, sizeof addr, "fd:%d", lfd);
        if (start_fmt(&h, addr, (struct fmt){4, 0}, 0) == NULL) {
            close(lfd);
            CHECK(0);
            goto done;
        }
        CHECK(tf_server_port(h.srv) == port);
        fd = cli_connect(port);
        CHECK(fd >= 0 && echo_ok(fd, "in process"));
        close_fd(&fd);
        rh_free(&h);
    }
done:;
}

/* ============================================================ outbound */

/* tf_connect to our own listener (TCP, Unix path, abstract): frames both ways. */
static void test_connect_to_own_listener(void) {
    char dir[64] = "", listen_at[3][160], target[160], peer[128], me[128];
    REQUIRE(make_dir(dir, "self") == 0);
    snprintf(listen_at[0], sizeof listen_at[0], "127.0.0.1:0");
    snprintf(listen_at[1], sizeof listen_at[1], "unix:%s/self.sock", dir);
    snprintf(listen_at[2], sizeof listen_at[2], "unix:@tf-reach-%d-self", (int)getpid());
    my_creds(me);
    for (int i = 0; i < 3; i++) {
        struct rhost h;
        struct fmt f = {2, TF_PREFIX_BIG_ENDIAN};
        if (start_fmt(&h, listen_at[i], f, 0) == NULL) {
            CHECK(0);
            continue;
        }
        if (i == 0)
            snprintf(target, sizeof target, "127.0.0.1:%u", (unsigned)tf_server_port(h.srv));
        else
            memcpy(target, listen_at[i], sizeof target);
        pthread_mutex_lock(&g_mu);
        tf_conn_id out = connect_out(h.srv, target);
        h.no_echo = out; /* set before its first message can arrive */
        pthread_mutex_unlock(&g_mu);
        CHECK(out != 0);
        CHECK_RC(tf_send(h.srv, out, (const uint8_t *)"queued at once", 14), TF_OK);
        CHECK(rh_wait_connects(&h, 2, SC(5000)));
        tf_conn_id in = rh_conn(&h, 0) == out ? rh_conn(&h, 1) : rh_conn(&h, 0);
        CHECKF(strcmp(rh_peer(&h, out, peer), target) == 0, "outbound peer '%s', want '%s'", peer, target);
        rh_peer(&h, in, peer);
        CHECKF(i == 0 ? strncmp(peer, "127.0.0.1:", 10) == 0 : strcmp(peer, me) == 0, "accepted peer '%s'", peer);
        CHECK_RC(tf_send(h.srv, out, (const uint8_t *)"ping", 4), TF_OK);
        CHECK_RC(tf_send(h.srv, in, (const uint8_t *)"from the accepted side", 22), TF_OK);
        int ok;
        WAIT_FOR(rh_count_msgs(&h, out) >= 3, SC(5000), ok);
        pthread_mutex_lock(&g_mu);
        CHECKF(ok && rh_has_msg(&h, out, "queued at once") && rh_has_msg(&h, out, "ping") &&
                   rh_has_msg(&h, out, "from the accepted side"),
               "%s: %d messages on the outbound side", listen_at[i], rh_count_msgs(&h, out));
        pthread_mutex_unlock(&g_mu);
        tf_conn_info info;
        CHECK_RC(tf_conn_get_info(h.srv, out, &info), TF_OK);
        CHECK(info.outbound == 1 && strcmp(info.peer, target) == 0);
        tf_stats st;
        CHECK(tf_server_stats(h.srv, &st) == TF_OK && st.connections_active == 2 && st.connections_accepted == 1);
        CHECK_RC(tf_conn_close(h.srv, out), TF_OK);
        CHECK(rh_wait_close(&h, out, SC(5000)) == TF_CLOSE_LOCAL);
        CHECK(rh_wait_close(&h, in, SC(5000)) == TF_CLOSE_PEER);
        rh_free(&h);
    }
done:
    if (dir[0])
        remove_dir(dir);
}

/* tf_connect from inside on_message: the new id takes a send at once (it is
 * written once connected) and echoes come back on it; TCP and abstract. */
static struct {
    tf_server *srv;
    char target[160];
    tf_conn_id out;
    int32_t connect_rc, send_rc, close_rc;
    int echoed; /* "first" came back on `out` */
} g_dial;

static void dial_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)ud;
    if (n == 4 && memcmp(d, "dial", 4) == 0) {
        tf_conn_id out = 0;
        int32_t rc = tf_connect(g_dial.srv, g_dial.target, &out);
        int32_t sent = tf_send(g_dial.srv, out, (const uint8_t *)"first", 5);
        LOCKED(g_dial.connect_rc = rc; g_dial.send_rc = sent; g_dial.out = out);
    } else if (n == 5 && memcmp(d, "first", 5) == 0) {
        LOCKED(if (c == g_dial.out) g_dial.echoed = 1);
    }
}

static void test_connect_from_a_callback_takes_sends_at_once(void) {
    for (int i = 0; i < 2; i++) {
        struct rhost e;
        struct fmt f = {4, 0};
        char at[64];
        int c = -1, ok;
        if (i == 0)
            snprintf(at, sizeof at, "127.0.0.1:0");
        else
            snprintf(at, sizeof at, "unix:@tf-reach-%d-dial", (int)getpid());
        memset(&g_dial, 0, sizeof g_dial);
        g_dial.connect_rc = g_dial.send_rc = -99;
        REQUIRE(start_fmt(&e, at, f, 0) != NULL);
        if (i == 0)
            snprintf(g_dial.target, sizeof g_dial.target, "127.0.0.1:%u", (unsigned)tf_server_port(e.srv));
        else
            snprintf(g_dial.target, sizeof g_dial.target, "%s", at);
        tf_config *cfg = cfg_new();
        tf_callbacks cb;
        memset(&cb, 0, sizeof cb);
        cb.on_message = dial_message;
        if (cfg == NULL || start_cb(cfg, &cb, &g_dial.srv) == NULL) {
            tf_config_free(cfg);
            rh_free(&e);
            CHECK(0);
            continue;
        }
        tf_config_free(cfg);
        if ((c = cli_connect(tf_server_port(g_dial.srv))) >= 0 && send_frame(c, "dial", 4) == 0) {
            WAIT_FOR(g_dial.echoed, SC(5000), ok);
            CHECKF(ok, "%s: the frame sent right after tf_connect did not come back", g_dial.target);
        } else {
            CHECK(0);
        }
        pthread_mutex_lock(&g_mu);
        CHECKF(g_dial.connect_rc == TF_OK && g_dial.send_rc == TF_OK, "%s: tf_connect %d, tf_send %d",
               g_dial.target, (int)g_dial.connect_rc, (int)g_dial.send_rc);
        pthread_mutex_unlock(&g_mu);
        close_fd(&c);
        tf_server_stop(g_dial.srv, 0);
        tf_server_free(g_dial.srv);
        rh_free(&e);
    }
done:;
}

/* A server with address "none": a pure client; after stop TF_ERR_STOPPED. */
static void test_connect_pure_client_and_stop(void) {
    struct rhost t, c;
    char target[32];
    tf_conn_id ids[3] = {0, 0, 0};
    rh_init(&c);
    REQUIRE(start_fmt(&t, "127.0.0.1:0", (struct fmt){4, TF_PREFIX_BIG_ENDIAN}, 0) != NULL);
    REQUIRE(start_fmt(&c, "none", (struct fmt){4, TF_PREFIX_BIG_ENDIAN}, 0) != NULL);
    c.echo = 0;
    CHECK(tf_server_port(c.srv) == 0);
    snprintf(target, sizeof target, "127.0.0.1:%u", (unsigned)tf_server_port(t.srv));
    for (int i = 0; i < 3; i++) {
        char msg[8];
        snprintf(msg, sizeof msg, "m%d", i);
        REQUIRE((ids[i] = connect_out(c.srv, target)) != 0);
        CHECK_RC(tf_send(c.srv, ids[i], (const uint8_t *)msg, 2), TF_OK);
    }
    int ok;
    WAIT_FOR(c.messages >= 3, SC(5000), ok);
    CHECK(ok);
    pthread_mutex_lock(&g_mu);
    CHECK(rh_has_msg(&c, ids[0], "m0") && rh_has_msg(&c, ids[1], "m1") && rh_has_msg(&c, ids[2], "m2"));
    pthread_mutex_unlock(&g_mu);
    tf_stats st;
    CHECK(tf_server_stats(c.srv, &st) == TF_OK && st.connections_active == 3 && st.connections_accepted == 0);
    CHECK_RC(tf_server_stop(c.srv, 0), TF_OK);
    for (int i = 0; i < 3; i++)
        CHECK(rh_wait_close(&c, ids[i], 100) == TF_CLOSE_SHUTDOWN);
    tf_conn_id id = 77;
    CHECK_RC(tf_connect(c.srv, target, &id), TF_ERR_STOPPED);
    CHECK(id == 77);
done:
    rh_free(&c);
    rh_free(&t);
}

/* Refused port, missing path, dead socket file, unused abstract name:
 * on_close(TF_CLOSE_CONNECT_FAILED), never a return code, never on_connect. */
static void test_connect_unreachable(void) {
    struct rhost h;
    char dir[64] = "", t[4][160];
    REQUIRE(make_dir(dir, "miss") == 0);
    REQUIRE(start_fmt(&h, "none", (struct fmt){4, 0}, 0) != NULL);
    snprintf(t[0], sizeof t[0], "127.0.0.1:%u", (unsigned)refused_port());
    snprintf(t[1], sizeof t[1], "unix:%s/missing.sock", dir);
    snprintf(t[2], sizeof t[2], "unix:%s/dead.sock", dir);
    snprintf(t[3], sizeof t[3], "unix:@tf-reach-%d-nobody", (int)getpid());
    int d = unix_listen(t[2] + 5);
    REQUIRE(d >= 0);
    close(d);
    for (int i = 0; i < 4; i++) {
        tf_conn_id id = connect_out(h.srv, t[i]);
        CHECK(id != 0);
        int32_t rc = tf_send(h.srv, id, (const uint8_t *)"dropped", 7);
        CHECK(rc == TF_OK || rc == TF_ERR_NO_CONN);
        CHECKF(rh_wait_close(&h, id, SC(5000)) == TF_CLOSE_CONNECT_FAILED, "%s", t[i]);
        CHECKF(!rh_connected(&h, id), "%s: no on_connect", t[i]);
        CHECK_RC(tf_send(h.srv, id, (const uint8_t *)"x", 1), TF_ERR_NO_CONN);
    }
    tf_stats st;
    CHECK(tf_server_stats(h.srv, &st) == TF_OK && st.connections_active == 0 && st.connections_accepted == 0 &&
          st.connections_rejected == 0);
    CHECK(path_mode(t[1] + 5) < 0);
done:
    rh_free(&h);
    if (dir[0])
        remove_dir(dir);
}

/* A loopback listener whose backlog is full never answers: 300 ms connect timeout. */
static void test_connect_times_out(void) {
    struct rhost h;
    struct full b;
    rh_init(&h);
    REQUIRE(full_open(&b) == 0);
    tf_config *cfg = cfg_at("none");
    REQUIRE(cfg != NULL && tf_config_set_connect_timeout_ms(cfg, 300) == TF_OK);
    REQUIRE(rh_start(&h, cfg) != NULL);
    double t0 = now_ms();
    tf_conn_id id = connect_out(h.srv, b.addr);
    REQUIRE(id != 0);
    CHECK_RC(tf_send(h.srv, id, (const uint8_t *)"never", 5), TF_OK);
    CHECK(rh_wait_close(&h, id, SC(10000)) == TF_CLOSE_CONNECT_FAILED);
    double took = now_ms() - t0;
    CHECKF(took >= 250 && took < SC(5000), "failed after %.0f ms", took);
    CHECK(!rh_connected(&h, id));
done:
    rh_free(&h);
    full_close(&b);
}

/* Frames sent before the connect completes are queued and written after it. */
static void test_connect_queued_before_established(void) {
    struct rhost h;
    struct full b;
    int fd = -1;
    struct fmt f = {2, TF_PREFIX_BIG_ENDIAN};
    rh_init(&h);
    REQUIRE(full_open(&b) == 0);
    REQUIRE(start_fmt(&h, "none", f, 0) != NULL);
    h.echo = 0;
    tf_conn_id id = connect_out(h.srv, b.addr);
    REQUIRE(id != 0);
    static const char *frames[] = {"one", "", "three", "four"};
    for (int i = 0; i < 4; i++)
        CHECK_RC(tf_send(h.srv, id, (const uint8_t *)frames[i], strlen(frames[i])), TF_OK);
    sleep_ms(150);
    CHECK(!rh_connected(&h, id));
    tf_conn_info info;
    CHECK_RC(tf_conn_get_info(h.srv, id, &info), TF_OK);
    CHECKF(info.outbound == 1 && info.queued_output == 4 * 2 + 3 + 0 + 5 + 4, "queued %" PRIu64,
           info.queued_output);
    full_release(&b);
    REQUIRE((fd = accept_within(b.lfd, SC(10000))) >= 0);
    for (int i = 0; i < 4; i++)
        CHECKF(f_expect(fd, f, frames[i], strlen(frames[i])), "frame %d", i);
    CHECK(rh_wait_connects(&h, 1, SC(5000)));
    char peer[128];
    CHECKF(strcmp(rh_peer(&h, id, peer), b.addr) == 0, "peer '%s'", peer);
    CHECK(f_send(fd, f, "reply", 5) == 0);
    int ok;
    WAIT_FOR(rh_count_msgs(&h, id) == 1 && rh_has_msg(&h, id, "reply"), SC(5000), ok);
    CHECK(ok);
    close_fd(&fd);
    CHECK(rh_wait_close(&h, id, SC(5000)) == TF_CLOSE_PEER);
done:
    close_fd(&fd);
    rh_free(&h);
    full_close(&b);
}

/* tf_conn_close before the connect completes: on_close(LOCAL), no on_connect. */
static void test_connect_close_before_established(void) {
    struct rhost h;
    struct full b;
    rh_init(&h);
    REQUIRE(full_open(&b) == 0);
    REQUIRE(start_fmt(&h, "none", (struct fmt){4, 0}, 0) != NULL);
    tf_conn_id id = connect_out(h.srv, b.addr);
    REQUIRE(id != 0);
    CHECK_RC(tf_send(h.srv, id, (const uint8_t *)"never", 5), TF_OK);
    CHECK_RC(tf_conn_close(h.srv, id), TF_OK);
    CHECK(rh_wait_close(&h, id, SC(5000)) == TF_CLOSE_LOCAL);
    CHECK_RC(tf_conn_close(h.srv, id), TF_ERR_NO_CONN);
    full_release(&b);
    sleep_ms(1500); /* past a SYN retransmission */
    CHECK(!rh_connected(&h, id));
    pthread_mutex_lock(&g_mu);
    CHECK(h.closes == 1);
    pthread_mutex_unlock(&g_mu);
    tf_stats st;
    CHECK(tf_server_stats(h.srv, &st) == TF_OK && st.connections_active == 0 && st.bytes_sent == 0);
done:
    rh_free(&h);
    full_close(&b);
}

/* Connects in progress count toward max connections; argument checks. */
static void test_connect_limits_and_arguments(void) {
    struct rhost h;
    struct full b;
    rh_init(&h);
    REQUIRE(full_open(&b) == 0);
    tf_config *cfg = cfg_at("none");
    REQUIRE(cfg != NULL && tf_config_set_max_connections(cfg, 2) == TF_OK);
    REQUIRE(rh_start(&h, cfg) != NULL);
    tf_conn_id a = connect_out(h.srv, b.addr), x = connect_out(h.srv, b.addr), id = 99;
    CHECK(a != 0 && x != 0 && a != x);
    CHECK_RC(tf_connect(h.srv, b.addr, &id), TF_ERR_FULL);
    CHECK(id == 99);
    CHECK_RC(tf_conn_close(h.srv, a), TF_OK);
    CHECK(rh_wait_close(&h, a, SC(5000)) == TF_CLOSE_LOCAL);
    CHECK((id = connect_out(h.srv, b.addr)) != 0);
    const char *bad[] = {"localhost:80", "example.test:53", "127.0.0.1", "fd:3", "none", "unix:", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        id = 99;
        CHECKF(tf_connect(h.srv, bad[i], &id) == TF_ERR_INVALID && id == 99, "'%s'", bad[i]);
    }
    CHECK_RC(tf_connect(h.srv, b.addr, NULL), TF_ERR_INVALID);
    CHECK_RC(tf_connect(h.srv, NULL, &id), TF_ERR_INVALID);
    CHECK_RC(tf_connect(NULL, b.addr, &id), TF_ERR_INVALID);
done:
    rh_free(&h);
    full_close(&b);
}

/* Pull mode: CONNECT (peer text), MESSAGE, CLOSE for an outbound connection;
 * one CLOSE (CONNECT_FAILED) for a failed one. */
static void test_connect_pull_mode(void) {
    tf_server *srv = NULL;
    tf_event ev[8];
    size_t n = 0;
    uint16_t port;
    char target[32], want[32];
    int lfd = tcp_listen(16, &port), fd = -1;
    REQUIRE(lfd >= 0);
    snprintf(target, sizeof target, "127.0.0.1:%u", (unsigned)port);
    tf_config *cfg = cfg_at("none");
    REQUIRE(cfg != NULL);
    int32_t rc = tf_server_start_pull(cfg, &srv);
    tf_config_free(cfg);
    REQUIRE(rc == TF_OK);
    tf_conn_id id = connect_out(srv, target);
    REQUIRE(id != 0);
    CHECK_RC(tf_send(srv, id, (const uint8_t *)"early", 5), TF_OK);
    REQUIRE((fd = accept_within(lfd, SC(5000))) >= 0);
    CHECK_RC(tf_server_poll(srv, ev, 1, &n, SC(5000)), TF_OK);
    CHECK(n == 1 && ev[0].kind == TF_EVENT_CONNECT && ev[0].conn == id && ev[0].len == strlen(target) &&
          strcmp((const char *)ev[0].data, target) == 0);
    CHECK(expect_frame(fd, "early"));
    CHECK(send_frame(fd, "to the pull host", 16) == 0);
    CHECK_RC(tf_server_poll(srv, ev, 8, &n, SC(5000)), TF_OK);
    CHECK(n == 1 && ev[0].kind == TF_EVENT_MESSAGE && ev[0].conn == id && ev[0].len == 16 &&
          memcmp(ev[0].data, "to the pull host", 16) == 0);
    close_fd(&fd);
    CHECK_RC(tf_server_poll(srv, ev, 8, &n, SC(5000)), TF_OK);
    CHECK(n == 1 && ev[0].kind == TF_EVENT_CLOSE && ev[0].conn == id && ev[0].reason == TF_CLOSE_PEER);
    snprintf(want, sizeof want, "127.0.0.1:%u", (unsigned)refused_port());
    id = connect_out(srv, want);
    CHECK_RC(tf_server_poll(srv, ev, 8, &n, SC(5000)), TF_OK);
    CHECK(n == 1 && ev[0].kind == TF_EVENT_CLOSE && ev[0].conn == id && ev[0].reason == TF_CLOSE_CONNECT_FAILED);
done:
    close_fd(&fd);
    close_fd(&lfd);
    if (srv != NULL) {
        tf_server_stop(srv, 0);
        tf_server_free(srv);
    }
}

/* ============================================================ DNS over TCP */

/* --dns-server: a tcpframe server speaking DNS over TCP (2-byte big-endian
 * prefix, RFC 1035 4.2.2) that answers A queries for example.test with
 * 192.0.2.1 and every other name with NXDOMAIN, for dig and dnspython. */
static tf_server *g_dns;
static volatile sig_atomic_t g_dns_stop;

static void dns_message(void *ud, tf_conn_id c, const uint8_t *q, size_t n) {
    uint8_t r[600];
    char name[256];
    size_t pos = 12, nl = 0;
    (void)ud;
    if (n < 12 || n > 512 || q[4] != 0 || q[5] != 1) { /* one question, or nothing to answer */
        tf_conn_close(g_dns, c);
        return;
    }
    while (pos < n && q[pos] != 0) {
        size_t l = q[pos];
        if (l > 63 || pos + 1 + l >= n || nl + l + 1 >= sizeof name) {
            tf_conn_close(g_dns, c);
            return;
        }
        if (nl)
            name[nl++] = '.';
        for (size_t i = 0; i < l; i++) {
            char ch = (char)q[pos + 1 + i];
            name[nl++] = ch >= 'A' && ch <= 'Z' ? (char)(ch + 32) : ch;
        }
        pos += 1 + l;
    }
    name[nl] = '\0';
    if (pos + 5 > n) {
        tf_conn_close(g_dns, c);
        return;
    }
    size_t qend = pos + 5; /* the root label, QTYPE, QCLASS */
    unsigned qtype = (unsigned)q[pos + 1] << 8 | q[pos + 2];
    int known = strcmp(name, "example.test") == 0;
    int answer = known && (qtype == 1 || qtype == 255);
    memcpy(r, q, qend);                    /* id and question */
    r[2] = (uint8_t)(0x84 | (q[2] & 0x01)); /* QR, AA, RD copied */
    r[3] = known ? 0 : 3;                   /* NOERROR / NXDOMAIN */
    r[6] = 0, r[7] = (uint8_t)answer;       /* ANCOUNT */
    r[8] = r[9] = r[10] = r[11] = 0;        /* no authority, no additional (EDNS dropped) */
    size_t len = qend;
    if (answer) {
        static const uint8_t rr[] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1};
        memcpy(r + len, rr, sizeof rr);
        len += sizeof rr;
    }
    printf("query %s type %u\n", name, qtype);
    fflush(stdout);
    (void)tf_send(g_dns, c, r, len);
}

static int dns_connect(void *ud, tf_conn_id c, const char *peer) {
    (void)ud;
    printf("connect %" PRIu64 " %s\n", c, peer);
    fflush(stdout);
    return 0;
}

static void dns_on_signal(int sig) {
    (void)sig;
    g_dns_stop = 1;
}

static int dns_server(const char *addr) {
    tf_config *cfg = tf_config_new();
    tf_callbacks cb = {NULL, dns_connect, dns_message, NULL};
    if (cfg == NULL || tf_config_set_address(cfg, addr) != TF_OK || tf_config_set_prefix(cfg, 2, TF_PREFIX_BIG_ENDIAN) != TF_OK ||
        tf_config_set_backend(cfg, g_backend) != TF_OK || tf_config_set_idle_timeout_ms(cfg, 30000) != TF_OK ||
        tf_server_start(cfg, &cb, &g_dns) != TF_OK) {
        fprintf(stderr, "dns: %s\n", tf_last_error());
        tf_config_free(cfg);
        return 1;
    }
    tf_config_free(cfg);
    signal(SIGINT, dns_on_signal);
    signal(SIGTERM, dns_on_signal);
    printf("listening on port %u\n", (unsigned)tf_server_port(g_dns));
    fflush(stdout);
    char buf[64];
    while (!g_dns_stop) { /* until end of input or a signal */
        struct pollfd p = {0, POLLIN, 0};
        if (poll(&p, 1, 200) == 1 && read(0, buf, sizeof buf) <= 0)
            break;
    }
    tf_stats st;
    tf_server_stats(g_dns, &st);
    tf_server_stop(g_dns, 1000);
    tf_server_free(g_dns);
    printf("frames_received=%" PRIu64 " frames_sent=%" PRIu64 "\n", st.frames_received, st.frames_sent);
    return 0;
}

/* ============================================================ runner */

static const struct test tests[] = {
    TEST(test_prefix_every_format_at_its_limits, 60, "v"),
    TEST(test_prefix_largest_payload_formula, 20, "v"),
    TEST(test_prefix_split_at_every_byte, 60, "v"),
    TEST(test_prefix_impossible_lengths, 30, "v"),
    TEST(test_setters_validate, 10, "v"),
    TEST(test_unix_path_echo_peer_and_file, 15, "v"),
    TEST(test_unix_abstract, 15, "v"),
    TEST(test_unix_mode_applied, 15, "v"),
    TEST(test_unix_other_uid, 30, "v"),
    TEST(test_unix_socket_file_rules, 15, "v"),
    TEST(test_fd_from_parent_process, 30, "v"),
    TEST(test_fd_not_a_listener_is_invalid_and_left_open, 15, "v"),
    TEST(test_connect_to_own_listener, 20, "v"),
    TEST(test_connect_pure_client_and_stop, 15, "v"),
    TEST(test_connect_unreachable, 15, "v"),
    TEST(test_connect_times_out, 15, "v"),
    TEST(test_connect_queued_before_established, 20, "v"),
    TEST(test_connect_close_before_established, 20, "v"),
    TEST(test_connect_limits_and_arguments, 15, "v"),
    TEST(test_connect_pull_mode, 15, "v"),
    TEST(test_connect_from_a_callback_takes_sends_at_once, 15, "v"),
};

int main(int argc, char **argv) {
    if (realpath(argv[0], g_self) == NULL)
        snprintf(g_self, sizeof g_self, "%s", argv[0]);
    if (argc == 3 && strcmp(argv[1], "--uid-client") == 0)
        return uid_client(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--fd-child") == 0) {
        const char *b = getenv("TF_TEST_BACKEND");
        if (b && strcmp(b, "poll") == 0)
            g_backend = TF_BACKEND_POLL;
        return fd_child(atoi(argv[2]));
    }
    if (argc >= 2 && strcmp(argv[1], "--dns-server") == 0) {
        const char *b = getenv("TF_TEST_BACKEND");
        if (b && strcmp(b, "poll") == 0)
            g_backend = TF_BACKEND_POLL;
        return dns_server(argc >= 3 ? argv[2] : "127.0.0.1:0");
    }
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
