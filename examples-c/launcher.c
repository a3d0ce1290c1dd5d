/* launcher: socket activation without systemd. Binds and listens on ADDRESS,
 * puts the listening socket on descriptor 3, sets LISTEN_FDS=1 and LISTEN_PID
 * (its own pid, which exec keeps), then execs PROGRAM: what systemd does for a
 * .socket unit, and what examples-c/activated.c expects.
 *
 *   launcher ADDRESS PROGRAM [ARG...]
 *   launcher 127.0.0.1:0 build/c/activated        ADDRESS: IPv4:PORT, [IPv6]:PORT or unix:/path
 *
 * Prints "launcher: listening on port N" (or "on unix:/path") before the exec,
 * so port 0 is usable. */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int fail(const char *what) {
    perror(what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: launcher ADDRESS PROGRAM [ARG...]\n");
        return 2;
    }
    const char *addr = argv[1];
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof ss);
    char host[64];
    unsigned port = 0;
    if (strncmp(addr, "unix:/", 6) == 0) {
        struct sockaddr_un *un = (struct sockaddr_un *)&ss;
        if (strlen(addr + 5) >= sizeof un->sun_path) {
            fprintf(stderr, "launcher: path too long\n");
            return 2;
        }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, addr + 5);
        len = sizeof *un;
    } else if (sscanf(addr, "[%63[0-9a-fA-F:.]]:%u", host, &port) == 2) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
            return fprintf(stderr, "launcher: bad address %s\n", addr), 2;
        len = sizeof *a;
    } else if (sscanf(addr, "%63[0-9.]:%u", host, &port) == 2) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            return fprintf(stderr, "launcher: bad address %s\n", addr), 2;
        len = sizeof *a;
    } else {
        fprintf(stderr, "launcher: bad address %s (want IPv4:PORT, [IPv6]:PORT or unix:/path)\n", addr);
        return 2;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM, 0); /* no CLOEXEC: it is for the program */
    int one = 1;
    if (fd < 0)
        return fail("launcher: socket");
    if (ss.ss_family != AF_UNIX)
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0)
        return fail("launcher: bind");
    if (listen(fd, SOMAXCONN) != 0)
        return fail("launcher: listen");
    if (fd != 3) {
        if (dup2(fd, 3) != 3)
            return fail("launcher: dup2");
        close(fd);
    }
    if (ss.ss_family == AF_UNIX) {
        printf("launcher: listening on %s\n", addr);
    } else {
        len = sizeof ss;
        getsockname(3, (struct sockaddr *)&ss, &len);
        port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                             : ((struct sockaddr_in6 *)&ss)->sin6_port);
        printf("launcher: listening on port %u\n", port);
    }
    fflush(stdout);
    char pid[32];
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    if (setenv("LISTEN_FDS", "1", 1) != 0 || setenv("LISTEN_PID", pid, 1) != 0)
        return fail("launcher: setenv");
    execvp(argv[2], argv + 2);
    return fail("launcher: exec");
}
