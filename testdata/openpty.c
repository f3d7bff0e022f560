/*
 * openpty: opens a pseudo-terminal through /dev/ptmx, as script(1),
 * tmux, sshd and every terminal emulator do, and passes a line through
 * it:
 *
 *	openpty [PTMX]
 *
 * Opens PTMX (default /dev/ptmx, on an OCI /dev a symlink to pts/ptmx),
 * unlocks it, opens the slave by the name ptsname(3) gives, writes a
 * line to the slave and reads it back from the master (the slave's
 * ONLCR turns its newline into CR LF). Prints "pty SLAVE ok" and exits
 * 0; on any failure a message on stderr and status 1, within 5 seconds.
 */
#define _GNU_SOURCE
#include <err.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *ptmx = argc > 1 ? argv[1] : "/dev/ptmx";
	const char want[] = "through the pty\r\n";
	char got[64];
	size_t n = 0;

	alarm(5);
	int m = open(ptmx, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (m < 0)
		err(1, "open %s", ptmx);
	if (grantpt(m) < 0 || unlockpt(m) < 0)
		err(1, "grantpt/unlockpt %s", ptmx);
	char *name = ptsname(m);
	if (name == NULL)
		err(1, "ptsname");
	int s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (s < 0)
		err(1, "open %s", name);
	if (write(s, "through the pty\n", 16) != 16)
		err(1, "write %s", name);
	while (n < strlen(want)) {
		struct pollfd p = {.fd = m, .events = POLLIN};
		if (poll(&p, 1, 2000) != 1)
			errx(1, "%s: nothing to read on the master after 2 s", name);
		ssize_t r = read(m, got + n, sizeof got - 1 - n);
		if (r <= 0)
			err(1, "read %s", ptmx);
		n += (size_t)r;
	}
	got[n] = 0;
	if (strcmp(got, want) != 0)
		errx(1, "the master read %zu bytes %.*s, want %s", n, (int)n, got, want);
	printf("pty %s ok\n", name);
	return 0;
}
