/* A tiny HTTP server standing in for the nginx and httpd of critest's images: every request gets
 * "200 OK" and a small page. Usage: NAME PORT [PIDFILE]. It says "NAME: serving on port PORT" on
 * stdout (critest looks for the server's name in its log) and writes its pid to PIDFILE (critest
 * reads /var/run/nginx.pid). It runs as PID 1 of a container, where SIGTERM has no default action:
 * it exits on SIGTERM/SIGINT itself. Built with `gcc -static` by integration/conformance/images.py.
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

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s PORT [PIDFILE]\n", argv[0]); return 2; }
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
    printf("%s: serving on port %d\n", basename(argv[0]), port);
    fflush(stdout);
    for (;;) {
        int conn = accept(sock, NULL, NULL);
        if (conn < 0) continue;
        answer(conn);
        close(conn);
    }
}
