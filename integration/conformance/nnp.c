/* Stand-in for the Kubernetes e2e "nonewprivs" image's program: installed set-uid root, it prints
 * the effective uid it runs with, so that critest sees whether no_new_privs stopped the set-uid. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
