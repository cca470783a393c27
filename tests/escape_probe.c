/* What an attacker inside a container would try, one word per attempt (tests/test_escapes.py).
 * Built static so it runs in any rootfs. Each attempt prints one line: "<what>:ok..." or
 * "<what>:<errno name>".
 *
 *   escape_probe tiocsti TEXT        push TEXT into fd 0's terminal input (TIOCSTI)
 *   escape_probe own-tty-tiocsti     TIOCSTI on a pty it made its own controlling terminal
 *   escape_probe keyread ID          read key ID's payload (keyctl KEYCTL_READ)
 *   escape_probe keysearch RING DESC search keyring RING (-3 session, -4 user) for a user key
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEYCTL_SEARCH 10
#define KEYCTL_READ 11

static int report(const char *what, long ret) {
    if (ret < 0) {
        printf("%s:%s\n", what, strerrorname_np(errno));
        return 1;
    }
    return 0;
}

static int tiocsti(int fd, const char *text) {
    for (const char *c = text; *c; c++)
        if (report("tiocsti", ioctl(fd, TIOCSTI, c)))
            return 1;
    printf("tiocsti:ok\n");
    return 0;
}

static int own_tty_tiocsti(void) {
    int master = open("/dev/ptmx", O_RDWR | O_NOCTTY), unlock = 0, n = 0;
    char name[64];
    if (report("ptmx", master) || report("unlock", ioctl(master, TIOCSPTLCK, &unlock)) ||
        report("ptn", ioctl(master, TIOCGPTN, &n)))
        return 1;
    snprintf(name, sizeof name, "/dev/pts/%d", n);
    setsid();
    int slave = open(name, O_RDWR);
    if (report("slave", slave) || report("ctty", ioctl(slave, TIOCSCTTY, 0)))
        return 1;
    return tiocsti(slave, "x");
}

static int keyread(long id) {
    char buf[256] = {0};
    long n = syscall(SYS_keyctl, KEYCTL_READ, id, buf, sizeof buf - 1);
    if (report("key", n))
        return 1;
    printf("key:ok:%.*s\n", (int)n, buf);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && !strcmp(argv[1], "tiocsti"))
        return tiocsti(0, argv[2]);
    if (argc == 2 && !strcmp(argv[1], "own-tty-tiocsti"))
        return own_tty_tiocsti();
    if (argc == 3 && !strcmp(argv[1], "keyread"))
        return keyread(atol(argv[2]));
    if (argc == 4 && !strcmp(argv[1], "keysearch")) {
        long id = syscall(SYS_keyctl, KEYCTL_SEARCH, atol(argv[2]), "user", argv[3], 0);
        return report("search", id) ? 1 : keyread(id);
    }
    fprintf(stderr, "usage: escape_probe tiocsti TEXT | own-tty-tiocsti | keyread ID | keysearch RING DESC\n");
    return 2;
}
