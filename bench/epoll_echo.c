/* epoll_echo.c — the hand-written floor for the tcpframe benchmark.
 *
 * usage: epoll_echo [ADDRESS]      (default 127.0.0.1:0; "HOST:PORT", IPv4)
 *
 * Single thread, level-triggered epoll, non-blocking sockets, TCP_NODELAY.
 * Frames are a 4-byte little-endian length + payload; every frame is echoed.
 * Per connection: a read buffer that exists only while a partial frame is
 * pending (reads otherwise go to one per-loop scratch buffer, so an idle
 * connection costs a few dozen bytes), and an output buffer that only exists
 * while a write was partial. On readable: one read (level-triggered: the rest
 * comes on the next wake-up), parse every complete frame, append prefix+payload
 * for each to one reply buffer, and send it with ONE write per readable batch.
 * EPOLLOUT is armed only while output remains; while it does, reading pauses
 * once the backlog passes MAX_OUT (backpressure).
 *
 * Prints "listening on port N" (flushed); SIGINT/SIGTERM stop it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FRAME (8u * 1024 * 1024)
#define READ_INIT 16384
#define MAX_OUT (4u * 1024 * 1024)
#define MAX_EVENTS 256

struct conn {
    int fd;          /* -1: slot free */
    uint32_t events; /* what epoll currently watches */
    char *rbuf;
    size_t rlen, rcap;
    char *obuf; /* pending output (partial write); NULL when none */
    size_t olen, ooff, ocap;
};

static struct conn *conns; /* indexed by fd */
static size_t nconns;
static int epfd, lfd, spare_fd = -1;
static volatile sig_atomic_t stop_flag;
static char *reply;        /* per-loop scratch for one batch of replies */
static size_t reply_cap;

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) { perror("realloc"); exit(1); }
    return q;
}

static struct conn *conn_get(int fd) {
    if ((size_t)fd >= nconns) {
        size_t n = nconns ? nconns : 1024;
        while (n <= (size_t)fd) n *= 2;
        conns = xrealloc(conns, n * sizeof *conns);
        for (size_t i = nconns; i < n; i++) memset(&conns[i], 0, sizeof conns[i]), conns[i].fd = -1;
        nconns = n;
    }
    return &conns[fd];
}

static void conn_close(struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->rbuf);
    free(c->obuf);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}

static void set_events(struct conn *c, uint32_t ev) {
    if (ev == c->events) return;
    struct epoll_event e = {.events = ev, .data.fd = c->fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
    c->events = ev;
}

static void update_interest(struct conn *c) {
    uint32_t ev = 0;
    size_t pending = c->olen - c->ooff;
    if (pending < MAX_OUT) ev |= EPOLLIN;
    if (pending) ev |= EPOLLOUT;
    set_events(c, ev);
}

/* Write c's pending output; returns -1 if the connection died. */
static int flush_pending(struct conn *c) {
    while (c->ooff < c->olen) {
        ssize_t n = send(c->fd, c->obuf + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
        if (n > 0) { c->ooff += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return -1;
    }
    if (c->ooff == c->olen) {
        free(c->obuf);
        c->obuf = NULL;
        c->olen = c->ooff = c->ocap = 0;
    }
    return 0;
}

/* Queue bytes behind existing pending output. */
static void append_pending(struct conn *c, const char *p, size_t n) {
    if (c->ooff && c->ooff == c->olen) c->ooff = c->olen = 0;
    if (c->olen + n > c->ocap) {
        if (c->ooff) { /* compact first */
            memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff);
            c->olen -= c->ooff;
            c->ooff = 0;
        }
        size_t cap = c->ocap ? c->ocap : 4096;
        while (cap < c->olen + n) cap *= 2;
        c->obuf = xrealloc(c->obuf, cap);
        c->ocap = cap;
    }
    memcpy(c->obuf + c->olen, p, n);
    c->olen += n;
}

/* Build replies for every complete frame in p[0..n); returns bytes consumed,
 * or (size_t)-1 for a frame over MAX_FRAME. Replies go to the scratch `reply`. */
static size_t parse_frames(const char *p, size_t n, size_t *rl) {
    size_t off = 0;
    while (n - off >= 4) {
        uint32_t len;
        memcpy(&len, p + off, 4); /* little-endian host assumed (x86/arm LE) */
        if (len > MAX_FRAME) return (size_t)-1;
        if (n - off - 4 < len) break;
        size_t flen = 4 + (size_t)len;
        if (*rl + flen > reply_cap) {
            while (reply_cap < *rl + flen) reply_cap *= 2;
            reply = xrealloc(reply, reply_cap);
        }
        memcpy(reply + *rl, p + off, 4);               /* prefix */
        memcpy(reply + *rl + 4, p + off + 4, len);     /* payload */
        *rl += flen;
        off += flen;
    }
    return off;
}

static char scratch[65536]; /* per-loop read buffer */

/* One readable event: one read (into the connection's buffer when it holds a
 * partial frame, else into the loop's scratch), reply to every complete frame
 * with one write, keep only a trailing partial frame per connection. */
static void handle_readable(struct conn *c) {
    size_t rl = 0, used;
    if (c->rlen) {
        /* partial frame pending: make room for at least the whole frame */
        size_t want = READ_INIT;
        if (c->rlen >= 4) {
            uint32_t len;
            memcpy(&len, c->rbuf, 4);
            if ((size_t)len + 4 > want) want = (size_t)len + 4;
        }
        if (c->rcap < want || c->rcap - c->rlen < 4096) {
            size_t cap = c->rcap ? c->rcap : READ_INIT;
            while (cap < want || cap - c->rlen < 4096) cap *= 2;
            c->rbuf = xrealloc(c->rbuf, cap);
            c->rcap = cap;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
        if (n <= 0) { conn_close(c); return; }
        c->rlen += (size_t)n;
        used = parse_frames(c->rbuf, c->rlen, &rl);
        if (used == (size_t)-1) { conn_close(c); return; }
        if (used == c->rlen) { /* nothing partial left: drop the buffer */
            free(c->rbuf);
            c->rbuf = NULL;
            c->rlen = c->rcap = 0;
        } else if (used) {
            memmove(c->rbuf, c->rbuf + used, c->rlen - used);
            c->rlen -= used;
        }
    } else {
        ssize_t n = recv(c->fd, scratch, sizeof scratch, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
        if (n <= 0) { conn_close(c); return; }
        used = parse_frames(scratch, (size_t)n, &rl);
        if (used == (size_t)-1) { conn_close(c); return; }
        if (used < (size_t)n) { /* keep the partial frame */
            c->rcap = READ_INIT;
            while (c->rcap < (size_t)n - used) c->rcap *= 2;
            c->rbuf = xrealloc(NULL, c->rcap);
            memcpy(c->rbuf, scratch + used, (size_t)n - used);
            c->rlen = (size_t)n - used;
        }
    }

    if (rl) {
        if (c->olen > c->ooff) {
            append_pending(c, reply, rl); /* keep order behind what is pending */
        } else {
            size_t done = 0;
            while (done < rl) {
                ssize_t n = send(c->fd, reply + done, rl - done, MSG_NOSIGNAL);
                if (n > 0) { done += (size_t)n; continue; }
                if (n < 0 && errno == EINTR) continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                conn_close(c);
                return;
            }
            if (done < rl) append_pending(c, reply + done, rl - done);
        }
    }
    update_interest(c);
}

static void accept_all(void) {
    for (int i = 0; i < 1024; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
                close(spare_fd); /* shed one pending connection, never spin */
                int x = accept(lfd, NULL, NULL);
                if (x >= 0) close(x);
                spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            return; /* EAGAIN or other */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = conn_get(fd);
        memset(c, 0, sizeof *c);
        c->fd = fd;
        c->events = EPOLLIN;
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) { close(fd); c->fd = -1; }
    }
}

int main(int argc, char **argv) {
    const char *addr = argc > 1 ? argv[1] : "127.0.0.1:0";
    char host[64];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof host) { fprintf(stderr, "bad address %s\n", addr); return 2; }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = 0;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", addr); return 2; }

    struct sigaction act = {0};
    act.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGINT, &act, NULL);
    sigaction(SIGTERM, &act, NULL);
    signal(SIGPIPE, SIG_IGN);

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0) { perror("bind/listen"); return 1; }
    socklen_t sl = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &sl);
    spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &e);
    reply_cap = 65536;
    reply = xrealloc(NULL, reply_cap);

    printf("listening on port %u\n", ntohs(sa.sin_port));
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    while (!stop_flag) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) { accept_all(); continue; }
            struct conn *c = conn_get(fd);
            if (c->fd != fd) continue; /* closed earlier in this batch */
            uint32_t ev = evs[i].events;
            if (ev & EPOLLOUT) {
                if (flush_pending(c) < 0) { conn_close(c); continue; }
                update_interest(c);
            }
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) handle_readable(c);
        }
    }
    for (size_t i = 0; i < nconns; i++)
        if (conns[i].fd >= 0) conn_close(&conns[i]);
    close(lfd);
    close(epfd);
    free(conns);
    free(reply);
    return 0;
}
