/* locker: hold or probe the three kinds of Linux file locks, for checkpoint/restore tests.
 *
 *   locker hold F1 F2 F3   flock(2) LOCK_EX on F1, a POSIX fcntl F_SETLK write lock on F2 and an
 *                          OFD F_OFD_SETLK write lock on F3 (files created if missing); prints
 *                          "locked <pid>" and sleeps forever, holding them. Exits 2 if any lock
 *                          cannot be taken.
 *   locker probe KIND FILE KIND = flock | posix | ofd: try that lock, non-blocking, on FILE (created
 *                          if missing) from a fresh open file description. Prints and exits with
 *                          "free" 0 (taken and released at exit), "held" 1 (EWOULDBLOCK/EAGAIN/EACCES),
 *                          else an error message and 2.
 *
 * Built `gcc -static -O2` by integration/testimage.py into the busybox test image as /usr/bin/locker.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static int open_file(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "locker: open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    return fd;
}

/* 0 taken, 1 held by someone else, -1 other error (errno set). */
static int try_lock(const char *kind, int fd)
{
    int rc;
    if (strcmp(kind, "flock") == 0) {
        rc = flock(fd, LOCK_EX | LOCK_NB);
    } else if (strcmp(kind, "posix") == 0 || strcmp(kind, "ofd") == 0) {
        struct flock fl;
        memset(&fl, 0, sizeof(fl));
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET; /* l_start 0, l_len 0: the whole file; l_pid must be 0 for OFD */
        rc = fcntl(fd, strcmp(kind, "ofd") == 0 ? F_OFD_SETLK : F_SETLK, &fl);
    } else {
        errno = EINVAL;
        return -1;
    }
    if (rc == 0)
        return 0;
    if (errno == EWOULDBLOCK || errno == EAGAIN || errno == EACCES)
        return 1;
    return -1;
}

static int hold(char **files)
{
    static const char *kinds[3] = {"flock", "posix", "ofd"};
    for (int i = 0; i < 3; i++) {
        int fd = open_file(files[i]);
        int rc = try_lock(kinds[i], fd);
        if (rc != 0) {
            fprintf(stderr, "locker: %s lock on %s: %s\n", kinds[i], files[i],
                    rc == 1 ? "held by another process" : strerror(errno));
            return 2;
        }
        /* fd stays open: closing it would drop the lock. */
    }
    printf("locked %d\n", (int)getpid());
    fflush(stdout);
    for (;;)
        sleep(3600);
}

static int probe(const char *kind, const char *path)
{
    int fd = open_file(path);
    int rc = try_lock(kind, fd);
    if (rc == 0) {
        puts("free");
        return 0;
    }
    if (rc == 1) {
        puts("held");
        return 1;
    }
    fprintf(stderr, "locker: %s lock on %s: %s\n", kind, path, strerror(errno));
    return 2;
}

static int usage(void)
{
    fputs("usage: locker hold FLOCK_FILE POSIX_FILE OFD_FILE\n"
          "       locker probe flock|posix|ofd FILE\n", stderr);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "hold") == 0)
        return hold(argv + 2);
    if (argc == 4 && strcmp(argv[1], "probe") == 0)
        return probe(argv[2], argv[3]);
    return usage();
}
