/* Per-operation cost loop for bench/bpf_overhead.py (no interpreter between the syscalls).
 *
 * usage: bpf_loop CGROUP|- NETNS|- OP ITERATIONS
 *   CGROUP  cgroup2 directory to join first ("-": stay where we are)
 *   NETNS   network namespace to enter, e.g. /run/netns/NAME with lo up ("-": a fresh one,
 *           lo brought up here); the UDP target is 127.0.0.1:9 in there, where nobody listens
 *   OP      openclose | udpconnect | sendto | spawn
 * Runs one warm-up pass (a tenth) and one timed pass, and prints nanoseconds per operation of
 * the timed pass twice: wall clock, then the thread's CPU time (CLOCK_THREAD_CPUTIME_ID: the
 * scheduler's exact run time, softirq work done on the way included, time spent preempted by
 * other tenants of a shared machine excluded).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int join_cgroup(const char *dir)
{
    char path[4096], pid[32];
    snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    int len = snprintf(pid, sizeof(pid), "%d", getpid());
    int ok = write(fd, pid, len) == len;
    close(fd);
    return ok ? 0 : -1;
}

static int enter_netns(const char *path)
{
    if (strcmp(path, "-") != 0) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -1;
        int rc = setns(fd, CLONE_NEWNET);
        close(fd);
        return rc;
    }
    if (unshare(CLONE_NEWNET) != 0)
        return -1;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    ifr.ifr_flags |= IFF_UP;
    if (rc == 0)
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    close(s);
    return rc;
}

static struct sockaddr_in target;
static int send_sock = -1;

static int op_openclose(void)
{
    long fd = syscall(SYS_openat, AT_FDCWD, "/etc/hostname", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    return syscall(SYS_close, fd);
}

static int op_udpconnect(void)
{
    long s = syscall(SYS_socket, AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        return -1;
    long rc = syscall(SYS_connect, s, &target, sizeof(target));
    syscall(SYS_close, s);
    return rc;
}

static int op_sendto(void)
{
    long rc = syscall(SYS_sendto, send_sock, "x", 1, 0, &target, sizeof(target));
    return rc == 1 ? 0 : -1;
}

static int op_spawn(void)
{
    pid_t pid;
    char *argv[] = {"/bin/true", NULL};
    if (posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ) != 0)
        return -1;
    int status;
    return waitpid(pid, &status, 0) == pid ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: bpf_loop CGROUP|- NETNS|- OP ITERATIONS\n");
        return 2;
    }
    if (strcmp(argv[1], "-") != 0 && join_cgroup(argv[1]) != 0) {
        perror("join cgroup");
        return 1;
    }
    if (enter_netns(argv[2]) != 0) {
        perror("netns");
        return 1;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons(9);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    send_sock = socket(AF_INET, SOCK_DGRAM, 0);
    int (*op)(void) = NULL;
    const char *name = argv[3];
    if (strcmp(name, "openclose") == 0)
        op = op_openclose;
    else if (strcmp(name, "udpconnect") == 0)
        op = op_udpconnect;
    else if (strcmp(name, "sendto") == 0)
        op = op_sendto;
    else if (strcmp(name, "spawn") == 0)
        op = op_spawn;
    if (!op) {
        fprintf(stderr, "unknown op %s\n", name);
        return 2;
    }
    long n = atol(argv[4]);
    for (long i = 0; i < n / 10 + 1; i++)
        if (op() != 0) {
            perror(name);
            return 1;
        }
    double wall = now_ns(CLOCK_MONOTONIC), cpu = now_ns(CLOCK_THREAD_CPUTIME_ID);
    for (long i = 0; i < n; i++)
        if (op() != 0) {
            perror(name);
            return 1;
        }
    cpu = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu;
    wall = now_ns(CLOCK_MONOTONIC) - wall;
    printf("%.1f %.1f\n", wall / n, cpu / n);
    return 0;
}
