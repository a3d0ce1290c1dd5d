/* legacy_daemon: a classic Unix daemon around tcpframe, linked statically.
 * It echoes frames, logs syslog-style lines (its own and the library's), and
 * starts the server only AFTER daemonizing: a server does not survive fork().
 *
 *   legacy_daemon [-f | -d] [-p PIDFILE] [-a ADDRESS] [-l LOGFILE]
 *
 *   -f  stay in the foreground (default)     -d  daemonize (double fork, setsid, chdir /)
 *   -p  write the daemon's pid to PIDFILE, removed again on a clean stop
 *   -a  listen address (default 127.0.0.1:5882)
 *   -l  append log lines to LOGFILE instead of stderr; SIGHUP reopens it
 *
 * With -d the starting process waits until the daemon listens (or fails),
 * prints "listening on port N", and exits 0 (or 1). SIGTERM or SIGINT stops. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

#define DEFAULT_ADDRESS "127.0.0.1:5882"
#define DRAIN_MS 1000
#define READY_TIMEOUT_MS 10000
#define PROG "legacy_daemon"

enum { LOG_LVL_ERR = 3, LOG_LVL_WARNING = 4, LOG_LVL_NOTICE = 5, LOG_LVL_INFO = 6, LOG_LVL_DEBUG = 7 };

/* ---- logging ------------------------------------------------------------ */

/* Log lines go to g_log_fd with one write() each, so lines written by the
 * library's loop thread and by main never interleave. SIGHUP reopens the file
 * and dup2()s it over the same descriptor number, which is atomic for writers. */
static int g_log_fd = STDERR_FILENO;
static const char *g_log_path; /* absolute, or NULL for stderr */

static const char *level_name(int lvl) {
    switch (lvl) {
    case LOG_LVL_ERR: return "err";
    case LOG_LVL_WARNING: return "warning";
    case LOG_LVL_NOTICE: return "notice";
    case LOG_LVL_INFO: return "info";
    default: return "debug";
    }
}

static void log_line(int lvl, const char *fmt, ...) {
    char line[1024];
    time_t now = time(NULL);
    struct tm tm;
    size_t off = 0;
    if (localtime_r(&now, &tm) != NULL)
        off = strftime(line, sizeof line, "%b %e %H:%M:%S ", &tm);
    int n = snprintf(line + off, sizeof line - off, PROG "[%ld]: %s: ", (long)getpid(),
                     level_name(lvl));
    if (n > 0)
        off += (size_t)n < sizeof line - off ? (size_t)n : sizeof line - off - 1;
    va_list ap;
    va_start(ap, fmt);
    n = vsnprintf(line + off, sizeof line - off, fmt, ap);
    va_end(ap);
    if (n > 0)
        off += (size_t)n < sizeof line - off ? (size_t)n : sizeof line - off - 1;
    if (off >= sizeof line - 1)
        off = sizeof line - 2; /* truncated: keep room for the newline */
    line[off++] = '\n';
    ssize_t w = write(g_log_fd, line, off);
    (void)w; /* nowhere left to report a failing log */
}

/* The library's diagnostics, routed into our log with its level mapped. */
static void on_library_log(void *user_data, int32_t level, const char *msg) {
    (void)user_data;
    int lvl = level == TF_LOG_ERROR ? LOG_LVL_ERR
              : level == TF_LOG_WARN ? LOG_LVL_WARNING
              : level == TF_LOG_INFO ? LOG_LVL_INFO
                                     : LOG_LVL_DEBUG;
    log_line(lvl, "%s", msg); /* the library's messages name it: "tcpframe: ..." */
}

static int open_log(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        fprintf(stderr, PROG ": open %s: %s\n", path, strerror(errno));
    return fd;
}

static void reopen_log(void) {
    if (g_log_path == NULL)
        return;
    int fd = open_log(g_log_path);
    if (fd < 0)
        return;
    if (dup2(fd, g_log_fd) < 0)
        log_line(LOG_LVL_ERR, "reopen %s: %s", g_log_path, strerror(errno));
    close(fd);
    log_line(LOG_LVL_NOTICE, "log reopened");
}

/* ---- signals ------------------------------------------------------------ */

static volatile sig_atomic_t g_stop;
static volatile sig_atomic_t g_hup;
static int g_wake[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    if (sig == SIGHUP)
        g_hup = 1;
    else
        g_stop = sig;
    ssize_t n = write(g_wake[1], "x", 1);
    (void)n;
    errno = saved;
}

static int set_flags(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) != 0)
        return -1;
    return 0;
}

static int install_signals(void) {
    if (pipe(g_wake) != 0 || set_flags(g_wake[0]) != 0 || set_flags(g_wake[1]) != 0)
        return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0 ||
        sigaction(SIGHUP, &sa, NULL) != 0)
        return -1;
    return 0;
}

/* ---- daemonizing -------------------------------------------------------- */

/* Writes all of buf, retrying on EINTR. */
static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The starting process: wait for the daemon's one-line report on the ready
 * pipe ("port N" or "error MSG"), bounded in time, and turn it into our exit code. */
static int await_daemon(int ready_fd, pid_t first_child) {
    int status;
    /* The first child exits right after the second fork. */
    while (waitpid(first_child, &status, 0) < 0 && errno == EINTR) {
    }
    char msg[512];
    size_t used = 0;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (long)(now.tv_sec - start.tv_sec) * 1000 +
                       (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed >= READY_TIMEOUT_MS) {
            fprintf(stderr, PROG ": the daemon did not report within %d ms\n", READY_TIMEOUT_MS);
            return 1;
        }
        struct pollfd p = {.fd = ready_fd, .events = POLLIN, .revents = 0};
        int n = poll(&p, 1, (int)(READY_TIMEOUT_MS - elapsed));
        if (n < 0 && errno != EINTR)
            return 1;
        if (n <= 0)
            continue;
        ssize_t r = read(ready_fd, msg + used, sizeof msg - 1 - used);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || (used += (size_t)r) == sizeof msg - 1 || memchr(msg, '\n', used))
            break;
    }
    msg[used] = '\0';
    unsigned port;
    if (sscanf(msg, "port %u", &port) == 1) {
        printf("listening on port %u\n", port);
        fflush(stdout);
        return 0;
    }
    fprintf(stderr, PROG ": daemon failed: %s", used ? msg + (strncmp(msg, "error ", 6) ? 0 : 6)
                                                      : "it exited without a word\n");
    return 1;
}

/* Classic double fork. Returns in the daemon with *ready_fd set (the write end
 * of the pipe to the waiting starter); the starter and the middle child never
 * return from here. */
static int daemonize(int *ready_fd) {
    int pfd[2];
    if (pipe(pfd) != 0) {
        perror(PROG ": pipe");
        return -1;
    }
    fflush(NULL); /* nothing buffered may be written twice */
    pid_t pid = fork();
    if (pid < 0) {
        perror(PROG ": fork");
        return -1;
    }
    if (pid > 0) {
        close(pfd[1]);
        int code = await_daemon(pfd[0], pid);
        close(pfd[0]);
        exit(code);
    }
    close(pfd[0]);
    if (setsid() < 0)
        _exit(1);
    /* The session leader forks again so the daemon can never regain a terminal. */
    signal(SIGHUP, SIG_IGN);
    pid = fork();
    if (pid < 0)
        _exit(1);
    if (pid > 0)
        _exit(0);
    /* The daemon. From here a failure is reported to the waiting starter. */
    *ready_fd = pfd[1];
    signal(SIGHUP, SIG_DFL);
    umask(022);
    if (chdir("/") != 0)
        return -1;
    int null = open("/dev/null", O_RDWR);
    if (null < 0)
        return -1;
    /* Detach from the terminal: stdin, stdout and stderr all go to /dev/null. The
     * log, if any, has its own descriptor, opened before we forked. */
    if (dup2(null, STDIN_FILENO) < 0 || dup2(null, STDOUT_FILENO) < 0 ||
        dup2(null, STDERR_FILENO) < 0)
        return -1;
    if (null > STDERR_FILENO)
        close(null);
    if (g_log_fd == STDERR_FILENO)
        g_log_fd = -1; /* a daemon without -l logs nowhere */
    return 0;
}

static void report_ready(int ready_fd, const char *fmt, ...) {
    if (ready_fd < 0)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n > 0)
        (void)write_all(ready_fd, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
}

/* Makes a path absolute against the current directory (we chdir / later). */
static char *absolute_path(const char *path) {
    if (path[0] == '/')
        return strdup(path);
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof cwd) == NULL)
        return NULL;
    size_t len = strlen(cwd) + 1 + strlen(path) + 1;
    char *out = malloc(len);
    if (out != NULL)
        snprintf(out, len, "%s/%s", cwd, path);
    return out;
}

/* O_EXCL-free but careful: refuse to run when the pid file names a live process. */
static int write_pidfile(const char *path) {
    FILE *f = fopen(path, "r");
    if (f != NULL) {
        long old = 0;
        int got = fscanf(f, "%ld", &old);
        fclose(f);
        if (got == 1 && old > 0 && old != (long)getpid() && kill((pid_t)old, 0) == 0) {
            log_line(LOG_LVL_ERR, "pid file %s names running process %ld", path, old);
            return -1;
        }
    }
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        log_line(LOG_LVL_ERR, "open %s: %s", tmp, strerror(errno));
        return -1;
    }
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
    int ok = write_all(fd, buf, (size_t)n) == 0;
    ok = close(fd) == 0 && ok;
    /* rename() makes the file appear whole: a reader never sees it half written. */
    if (!ok || rename(tmp, path) != 0) {
        log_line(LOG_LVL_ERR, "write %s: %s", path, strerror(errno));
        (void)unlink(tmp);
        return -1;
    }
    return 0;
}

/* ---- the server --------------------------------------------------------- */

struct app {
    tf_server *srv; /* written by tf_server_start before any callback runs */
};

static int on_connect(void *user_data, tf_conn_id conn, const char *peer) {
    (void)user_data;
    log_line(LOG_LVL_INFO, "connect %" PRIu64 " from %s", conn, peer);
    return 0;
}

static void on_message(void *user_data, tf_conn_id conn, const uint8_t *data, size_t len) {
    tf_server *srv = ((struct app *)user_data)->srv;
    int32_t rc = tf_send(srv, conn, data, len);
    if (rc == TF_ERR_FULL) {
        log_line(LOG_LVL_WARNING, "connection %" PRIu64 " does not read; closing it", conn);
        (void)tf_conn_close(srv, conn);
    } else if (rc != TF_OK && rc != TF_ERR_NO_CONN && rc != TF_ERR_STOPPED) {
        log_line(LOG_LVL_ERR, "send to %" PRIu64 ": %s", conn, tf_last_error());
    }
}

static void on_close(void *user_data, tf_conn_id conn, int32_t reason) {
    (void)user_data;
    log_line(LOG_LVL_INFO, "close %" PRIu64 " reason=%d", conn, (int)reason);
}

static void usage(void) {
    fprintf(stderr, "usage: " PROG " [-f | -d] [-p PIDFILE] [-a ADDRESS] [-l LOGFILE]\n");
}

int main(int argc, char **argv) {
    int daemon_mode = 0;
    const char *pid_arg = NULL, *log_arg = NULL, *address = DEFAULT_ADDRESS;
    int opt;
    while ((opt = getopt(argc, argv, "fdp:a:l:h")) != -1) {
        switch (opt) {
        case 'f': daemon_mode = 0; break;
        case 'd': daemon_mode = 1; break;
        case 'p': pid_arg = optarg; break;
        case 'a': address = optarg; break;
        case 'l': log_arg = optarg; break;
        default: usage(); return opt == 'h' ? 0 : 2;
        }
    }
    if (optind != argc) {
        usage();
        return 2;
    }

    int code = 1, ready_fd = -1, pid_written = 0;
    char *pid_path = NULL, *log_path = NULL;
    tf_config *cfg = NULL;
    tf_server *srv = NULL;
    struct app app;
    memset(&app, 0, sizeof app);

    /* Everything that can fail on bad arguments fails here, in the terminal. */
    if ((pid_arg && (pid_path = absolute_path(pid_arg)) == NULL) ||
        (log_arg && (log_path = absolute_path(log_arg)) == NULL)) {
        fprintf(stderr, PROG ": cannot resolve a path: %s\n", strerror(errno));
        goto out;
    }
    if (log_path != NULL) {
        g_log_path = log_path;
        if ((g_log_fd = open_log(log_path)) < 0)
            goto out;
    }
    cfg = tf_config_new();
    if (cfg == NULL || tf_config_set_address(cfg, address) != TF_OK ||
        tf_config_set_log(cfg, on_library_log, NULL) != TF_OK) {
        fprintf(stderr, PROG ": configuration (%s): %s\n", address, tf_last_error());
        code = 2;
        goto out;
    }

    if (daemon_mode && daemonize(&ready_fd) != 0) {
        log_line(LOG_LVL_ERR, "daemonize: %s", strerror(errno));
        report_ready(ready_fd, "error daemonize: %s\n", strerror(errno));
        goto out;
    }
    /* From here on we are the process that serves: the daemon, or us in -f. */
    if (install_signals() != 0) {
        log_line(LOG_LVL_ERR, "signals: %s", strerror(errno));
        report_ready(ready_fd, "error signals: %s\n", strerror(errno));
        goto out;
    }
    if (pid_path != NULL) {
        if (write_pidfile(pid_path) != 0) {
            report_ready(ready_fd, "error cannot write pid file %s\n", pid_path);
            goto out;
        }
        pid_written = 1;
    }

    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = &app;
    cb.on_connect = on_connect;
    cb.on_message = on_message;
    cb.on_close = on_close;
    int32_t rc = tf_server_start(cfg, &cb, &app.srv);
    if (rc != TF_OK) {
        log_line(LOG_LVL_ERR, "start on %s: %s", address, tf_last_error());
        report_ready(ready_fd, "error start on %s: %s\n", address, tf_last_error());
        goto out;
    }
    srv = app.srv;
    unsigned port = tf_server_port(srv);
    log_line(LOG_LVL_NOTICE, "tcpframe %s listening on %s (port %u)", tf_version(), address, port);
    if (ready_fd >= 0) {
        report_ready(ready_fd, "port %u\n", port);
        close(ready_fd);
        ready_fd = -1;
    } else {
        printf("listening on port %u\n", port);
        fflush(stdout);
    }

    while (!g_stop) {
        struct pollfd p = {.fd = g_wake[0], .events = POLLIN, .revents = 0};
        int n = poll(&p, 1, -1);
        if (n < 0 && errno != EINTR) {
            log_line(LOG_LVL_ERR, "poll: %s", strerror(errno));
            break;
        }
        char drain[16];
        while (read(g_wake[0], drain, sizeof drain) > 0) {
        }
        if (g_hup) {
            g_hup = 0;
            reopen_log();
        }
    }
    log_line(LOG_LVL_NOTICE, "signal %d: stopping", (int)g_stop);
    code = 0;
    if (tf_server_stop(srv, DRAIN_MS) != TF_OK) {
        log_line(LOG_LVL_ERR, "stop: %s", tf_last_error());
        code = 1;
    }
    tf_stats st;
    if (tf_server_stats(srv, &st) == TF_OK)
        log_line(LOG_LVL_NOTICE,
                 "served %" PRIu64 " connections, %" PRIu64 " frames in, %" PRIu64 " frames out",
                 st.connections_accepted, st.frames_received, st.frames_sent);

out:
    tf_server_free(srv);
    tf_config_free(cfg);
    if (pid_written && unlink(pid_path) != 0)
        log_line(LOG_LVL_ERR, "remove %s: %s", pid_path, strerror(errno));
    if (code == 0)
        log_line(LOG_LVL_NOTICE, "exiting");
    if (ready_fd >= 0)
        close(ready_fd);
    for (int i = 0; i < 2; i++)
        if (g_wake[i] >= 0)
            close(g_wake[i]);
    if (g_log_fd > STDERR_FILENO)
        close(g_log_fd);
    free(pid_path);
    free(log_path);
    return code;
}
