/*
 * refusals: asks a cdevfs mount, as fast as it can for a while, for what
 * an unprivileged caller is refused, to show that the daemon's log of
 * refusals stays bounded however many there are.
 *
 *   refusals stat DIR SECONDS   stat DIR/tunN for random N (a lookup the
 *                               daemon refuses to clone: ENOENT)
 *   refusals open DIR SECONDS   open DIR/tun (a clone: EPERM; the node's
 *                               mode must let the caller open it, or the
 *                               kernel refuses first: EACCES)
 *
 * Prints "refused N" (the calls that failed as expected) and exits 1 if
 * any call had another outcome, since then the daemon did not refuse it.
 */

#include <sys/stat.h>

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

int
main(int argc, char *argv[])
{
	char path[4096];
	struct stat st;
	unsigned long refused = 0, other = 0;
	double end;
	int stat_mode, fd;

	if (argc != 4)
		errx(2, "usage: refusals stat|open DIR SECONDS");
	stat_mode = strcmp(argv[1], "stat") == 0;
	if (!stat_mode && strcmp(argv[1], "open") != 0)
		errx(2, "unknown mode %s", argv[1]);
	end = now() + atof(argv[3]);
	srandom(getpid());
	while (now() < end) {
		if (stat_mode) {
			/* Units up to 32767, the daemon's default maximum. */
			snprintf(path, sizeof(path), "%s/tun%ld", argv[2], random() % 32768);
			if (stat(path, &st) == -1 && errno == ENOENT)
				refused++;
			else
				other++;
		} else {
			snprintf(path, sizeof(path), "%s/tun", argv[2]);
			fd = open(path, O_RDWR);
			if (fd == -1 && errno == EPERM) {
				refused++;
			} else {
				if (fd >= 0)
					close(fd);
				other++;
			}
		}
	}
	printf("refused %lu\n", refused);
	if (other != 0) {
		fprintf(stderr, "%lu calls were not refused\n", other);
		return 1;
	}
	return 0;
}
