/*
 * reopen: closes a cdevfs device node and opens it again at once, as a
 * program or script does, and counts the opens that find it still busy.
 * On BSD close(2) is synchronous: once it has returned, or the holder
 * has exited, the node is free, and a reopen must never be EBUSY.
 *
 *   reopen close PATH N   N times: open PATH, close it, open it again at
 *                         once (the next round's open)
 *   reopen exit PATH N    N times: a child opens PATH and exits without
 *                         closing it; once waitpid(2) has returned, the
 *                         parent opens PATH, and closes it before the
 *                         next child opens it
 *
 * Prints "busy B of N" (the opens after a close or an exit that failed
 * with EBUSY; each is retried until it succeeds) and, for exit, "child
 * busy C" (children whose open, right after the parent's close, was
 * EBUSY). Exits 1 if an open fails otherwise or is still EBUSY after 5 s.
 */

#include <sys/wait.h>

#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/*
 * open_counting opens path, retrying EBUSY for up to 5 s; *busy is set
 * to 1 if the first try was EBUSY. Exits on any other failure.
 */
static int
open_counting(const char *path, int *busy)
{
	double end = now() + 5;
	int fd;

	*busy = 0;
	for (;;) {
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd >= 0)
			return fd;
		if (errno != EBUSY)
			err(1, "open %s", path);
		*busy = 1;
		if (now() > end)
			errx(1, "open %s: still EBUSY after 5 s", path);
		usleep(1000);
	}
}

int
main(int argc, char *argv[])
{
	unsigned long busy = 0, child_busy = 0, n, i;
	const char *path;
	int exit_mode, fd, b, st;
	pid_t pid;

	if (argc != 4)
		errx(2, "usage: reopen close|exit PATH N");
	exit_mode = strcmp(argv[1], "exit") == 0;
	if (!exit_mode && strcmp(argv[1], "close") != 0)
		errx(2, "unknown mode %s", argv[1]);
	path = argv[2];
	n = strtoul(argv[3], NULL, 10);

	if (!exit_mode) {
		fd = open_counting(path, &b);
		for (i = 0; i < n; i++) {
			if (close(fd) == -1)
				err(1, "close");
			fd = open_counting(path, &b);
			busy += b;
		}
		close(fd);
		printf("busy %lu of %lu\n", busy, n);
		return 0;
	}

	for (i = 0; i < n; i++) {
		pid = fork();
		if (pid == -1)
			err(1, "fork");
		if (pid == 0) {
			/* The holder: exits with the node open (exit closes it). */
			open_counting(path, &b);
			_exit(b ? 3 : 0);
		}
		if (waitpid(pid, &st, 0) == -1)
			err(1, "waitpid");
		if (!WIFEXITED(st) || (WEXITSTATUS(st) != 0 && WEXITSTATUS(st) != 3))
			errx(1, "child failed (status %#x)", st);
		child_busy += WEXITSTATUS(st) == 3;
		fd = open_counting(path, &b);
		busy += b;
		if (close(fd) == -1)
			err(1, "close");
	}
	printf("busy %lu of %lu\n", busy, n);
	printf("child busy %lu\n", child_busy);
	return 0;
}
