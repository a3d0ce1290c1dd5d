/* client: a plain-socket tcpframe client (it does not use the library). Sends
 * each stdin line, without its newline, as one frame; prints each frame it
 * receives as one line.
 *
 *   client [-t WAIT_MS] [ADDRESS]        (default 127.0.0.1:5882, "[::1]:5882" for IPv6)
 *
 * At end of input it waits, up to WAIT_MS (default 5000), until it has received
 * as many frames as it sent (the echo server's promise), then exits 0. It exits 1
 * on a timeout, a connection error or a malformed reply. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_ADDRESS "127.0.0.1:5882"
#define MAX_FRAME (8u * 1024u * 1024u) /* the library's default max frame */

struct buf {
    uint8_t *p;
    size_t len, cap;
};

static int buf_reserve(struct buf *b, size_t extra) {
    if (b->cap - b->len >= extra)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(struct buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n) != 0)
        return -1;
    if (n > 0)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static void buf_consume(struct buf *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Splits "host:port" or "[v6host]:port" in place. */
static int split_address(char *addr, char **host, char **port) {
    if (addr[0] == '[') {
        char *end = strchr(addr, ']');
        if (end == NULL || end[1] != ':')
            return -1;
        *end = '\0';
        *host = addr + 1;
        *port = end + 2;
    } else {
        char *colon = strrchr(addr, ':');
        if (colon == NULL)
            return -1;
        *colon = '\0';
        *host = addr;
        *port = colon + 1;
    }
    return **host && **port ? 0 : -1;
}

/* A blocking connect: on loopback it succeeds or is refused at once. */
static int connect_one(const struct addrinfo *ai) {
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0)
        return -1;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
        return fd;
    int err = errno;
    close(fd);
    errno = err;
    return -1;
}

static int dial(const char *address) {
    char *copy = strdup(address);
    if (copy == NULL)
        return -1;
    char *host, *port;
    if (split_address(copy, &host, &port) != 0) {
        fprintf(stderr, "client: bad address %s (want HOST:PORT or [V6]:PORT)\n", address);
        free(copy);
        return -1;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "client: %s: %s\n", address, gai_strerror(gai));
        free(copy);
        return -1;
    }
    int fd = -1;
    int err = 0;
    for (struct addrinfo *ai = res; ai != NULL && fd < 0; ai = ai->ai_next) {
        fd = connect_one(ai);
        if (fd < 0)
            err = errno;
    }
    freeaddrinfo(res);
    if (fd < 0)
        fprintf(stderr, "client: connect %s: %s\n", address, strerror(err));
    free(copy);
    return fd;
}

static uint32_t read_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Queues one frame: 4-byte little-endian length, then the payload. */
static int queue_frame(struct buf *out, const uint8_t *data, size_t len) {
    if (len > MAX_FRAME) {
        fprintf(stderr, "client: line of %zu bytes is over the %u-byte frame limit\n", len,
                MAX_FRAME);
        return -1;
    }
    uint8_t prefix[4] = {(uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16),
                         (uint8_t)(len >> 24)};
    if (buf_append(out, prefix, 4) != 0 || buf_append(out, data, len) != 0) {
        fprintf(stderr, "client: out of memory\n");
        return -1;
    }
    return 0;
}

/* Prints every whole frame in `in`; returns how many, or -1 on a malformed one. */
static long print_frames(struct buf *in) {
    long n = 0;
    size_t off = 0;
    while (in->len - off >= 4) {
        uint32_t len = read_le32(in->p + off);
        if (len > MAX_FRAME) {
            fprintf(stderr, "client: server announced a %u-byte frame\n", (unsigned)len);
            return -1;
        }
        if (in->len - off - 4 < len)
            break;
        if (fwrite(in->p + off + 4, 1, len, stdout) != len || putchar('\n') == EOF)
            return -1;
        off += 4 + (size_t)len;
        n++;
    }
    buf_consume(in, off);
    if (fflush(stdout) != 0)
        return -1;
    return n;
}

/* Moves each complete stdin line (or the final unterminated one at EOF) to `out`. */
static int lines_to_frames(struct buf *lines, struct buf *out, int at_eof, long *sent) {
    size_t start = 0;
    for (size_t i = 0; i < lines->len; i++) {
        if (lines->p[i] == '\n') {
            if (queue_frame(out, lines->p + start, i - start) != 0)
                return -1;
            (*sent)++;
            start = i + 1;
        }
    }
    if (at_eof && start < lines->len) {
        if (queue_frame(out, lines->p + start, lines->len - start) != 0)
            return -1;
        (*sent)++;
        start = lines->len;
    }
    buf_consume(lines, start);
    return 0;
}

int main(int argc, char **argv) {
    long wait_ms = 5000;
    int opt;
    while ((opt = getopt(argc, argv, "t:h")) != -1) {
        if (opt == 't') {
            char *end;
            wait_ms = strtol(optarg, &end, 10);
            if (*end != '\0' || wait_ms < 0) {
                fprintf(stderr, "client: bad -t value %s\n", optarg);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: client [-t WAIT_MS] [ADDRESS]   (default %s)\n",
                    DEFAULT_ADDRESS);
            return opt == 'h' ? 0 : 2;
        }
    }
    if (argc - optind > 1) {
        fprintf(stderr, "usage: client [-t WAIT_MS] [ADDRESS]\n");
        return 2;
    }
    const char *address = optind < argc ? argv[optind] : DEFAULT_ADDRESS;
    int fd = dial(address);
    if (fd < 0)
        return 1;

    struct buf lines = {0}, out = {0}, in = {0};
    long sent = 0, received = 0;
    int stdin_open = 1, status = -1; /* -1: running, else the exit code */
    int64_t deadline = 0;

    while (status < 0) {
        struct pollfd p[2];
        p[0].fd = stdin_open ? STDIN_FILENO : -1;
        p[0].events = POLLIN;
        p[0].revents = 0;
        p[1].fd = fd;
        p[1].events = (short)(POLLIN | (out.len > 0 ? POLLOUT : 0));
        p[1].revents = 0;
        int timeout = -1;
        if (!stdin_open) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                fprintf(stderr, "client: timed out: %ld of %ld replies\n", received, sent);
                status = 1;
                break;
            }
            timeout = (int)left;
        }
        int n = poll(p, 2, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("client: poll");
            status = 1;
            break;
        }
        if (p[0].revents) {
            uint8_t chunk[4096];
            ssize_t r = read(STDIN_FILENO, chunk, sizeof chunk);
            if (r < 0 && errno != EINTR) {
                perror("client: read stdin");
                status = 1;
                break;
            }
            if (r > 0 && buf_append(&lines, chunk, (size_t)r) != 0) {
                fprintf(stderr, "client: out of memory\n");
                status = 1;
                break;
            }
            if (r == 0) {
                stdin_open = 0;
                deadline = now_ms() + wait_ms;
            }
            if (lines_to_frames(&lines, &out, !stdin_open, &sent) != 0) {
                status = 1;
                break;
            }
        }
        if (p[1].revents & POLLOUT) {
            ssize_t w = send(fd, out.p, out.len, MSG_NOSIGNAL);
            if (w < 0 && errno != EINTR && errno != EAGAIN) {
                perror("client: send");
                status = 1;
                break;
            }
            if (w > 0)
                buf_consume(&out, (size_t)w);
        }
        if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (buf_reserve(&in, 65536) != 0) {
                fprintf(stderr, "client: out of memory\n");
                status = 1;
                break;
            }
            ssize_t r = recv(fd, in.p + in.len, in.cap - in.len, 0);
            if (r < 0 && errno != EINTR && errno != EAGAIN) {
                perror("client: recv");
                status = 1;
                break;
            }
            if (r == 0) {
                long got = print_frames(&in);
                if (got >= 0)
                    received += got;
                if (got < 0 || stdin_open || received < sent || out.len > 0 || in.len > 0) {
                    fprintf(stderr, "client: server closed the connection (%ld of %ld replies)\n",
                            received, sent);
                    status = 1;
                } else {
                    status = 0;
                }
                break;
            }
            if (r > 0) {
                in.len += (size_t)r;
                long got = print_frames(&in);
                if (got < 0) {
                    status = 1;
                    break;
                }
                received += got;
            }
        }
        if (!stdin_open && out.len == 0 && received >= sent)
            status = 0;
    }

    close(fd);
    free(lines.p);
    free(out.p);
    free(in.p);
    return status;
}
