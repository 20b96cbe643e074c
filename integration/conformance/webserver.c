/* A tiny HTTP server standing in for the nginx and httpd of critest's images: every request gets
 * "200 OK" and a small page. Usage: NAME PORT [PIDFILE]. It says "NAME: serving on port PORT" on
 * stdout (critest looks for the server's name in its log) and writes its pid to PIDFILE (critest
 * reads /var/run/nginx.pid). It runs as PID 1 of a container, where SIGTERM has no default action:
 * it exits on SIGTERM/SIGINT itself. Like nginx, its command line says "NAME: master process ..."
 * (critest's ContainerPID spec waits for that in /proc/1/cmdline): it re-executes itself with that
 * argv[0], its name (comm) staying the file's. Built with `gcc -static` by images.py.
 */
#include <arpa/inet.h>
#include <libgen.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static const char PAGE[] = "<html><body><h1>It works!</h1></body></html>\n";

static void on_signal(int sig) { (void)sig; _exit(0); }

static void write_pidfile(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); exit(1); }
    fprintf(f, "%d\n", (int)getpid());
    fclose(f);
}

static void answer(int conn) {
    char request[4096], head[256];
    struct timeval timeout = {2, 0};
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    /* One read is enough: the request is not looked at, only waited for. */
    if (read(conn, request, sizeof request) <= 0) return;
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n", sizeof PAGE - 1);
    if (write(conn, head, n) != n) return;
    if (write(conn, PAGE, sizeof PAGE - 1) < 0) return;
}

static const char TITLE[] = ": master process ";

/* Re-executes this program with argv[0] "NAME: master process ARGV0"; returns only if it is that already. */
static void set_title(char **argv, const char *exe, const char *name) {
    if (strstr(argv[0], TITLE)) return;
    char title[512];
    snprintf(title, sizeof title, "%s%s%s", name, TITLE, argv[0]);
    argv[0] = title;
    execv(exe, argv);
    perror("re-executing with the nginx-like title");
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s PORT [PIDFILE]\n", argv[0]); return 2; }
    char exe[256];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len < 0) { perror("/proc/self/exe"); return 1; }
    exe[len] = '\0';
    const char *name = basename(strdup(exe));
    set_title(argv, exe, name);
    int port = atoi(argv[1]);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    if (argc > 2) write_pidfile(argv[2]);

    int sock = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (sock < 0 || bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(sock, 64) < 0) {
        perror("listen");
        return 1;
    }
    printf("%s: serving on port %d\n", name, port);
    fflush(stdout);
    for (;;) {
        int conn = accept(sock, NULL, NULL);
        if (conn < 0) continue;
        answer(conn);
        close(conn);
    }
}
