/* Per-syscall cost loop for bench/seccomp_hotpath.py.
 * usage: seccomp_loop getppid|openclose ITERATIONS  -> prints nanoseconds per iteration
 * Raw syscall(2) calls so no libc caching or vDSO shortcut hides the kernel entry. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    long n = atol(argv[2]);
    int openclose = strcmp(argv[1], "openclose") == 0;
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        if (openclose) {
            long fd = syscall(SYS_openat, AT_FDCWD, "/dev/null", O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                return 1;
            syscall(SYS_close, fd);
        } else {
            syscall(SYS_getppid);
        }
    }
    printf("%.2f\n", (now_ns() - start) / n);
    return 0;
}
