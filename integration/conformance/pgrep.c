/* `pgrep NAME` for the busybox stand-in image (Debian's busybox has no pgrep applet): prints the pid
 * of every process whose name contains NAME, one a line, and exits 1 when there is none. critest's
 * ExecSync-timeout spec runs `pgrep sleep` to see that the timed-out process is gone. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: pgrep NAME\n"); return 2; }
    DIR *proc = opendir("/proc");
    if (!proc) { perror("/proc"); return 3; }
    int found = 0;
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL) {
        char path[300], comm[64] = "";
        if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%s/comm", entry->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;  /* gone meanwhile */
        if (fgets(comm, sizeof comm, f)) comm[strcspn(comm, "\n")] = '\0';
        fclose(f);
        if (strstr(comm, argv[1])) { printf("%s\n", entry->d_name); found = 1; }
    }
    closedir(proc);
    return found ? 0 : 1;
}
