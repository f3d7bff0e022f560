/*-
 * Port of FreeBSD's tests/sys/net/transient_tuntap.c (Kyle Evans, 2024,
 * BSD-2-Clause) to cdevfs: the same logic, with net/if_tun.h from
 * include/ (the BSD ioctls re-encoded for Linux).
 *
 * This test simply configures the tunnel as transient and exits. By the time
 * the close is processed, the tunnel should be gone because the last
 * reference disappears. (On cdevfs the close reaches the daemon
 * asynchronously and the destroy is deferred to a worker, so the caller
 * waits for the interface to go away instead of checking at once.)
 */

#include <sys/types.h>
#include <sys/ioctl.h>
#include <net/if_tun.h>
#include <net/if_tap.h>

#include <assert.h>
#include <err.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

int
main(int argc, char *argv[])
{
	unsigned long tunreq;
	const char *tundev;
	int one = 1, tunfd;

	assert(argc > 1);
	tundev = argv[1];

	tunfd = open(tundev, O_RDWR);
	if (tunfd < 0)
		err(1, "open %s", tundev);

	/*
	 * These are technically the same request, but we'll use the technically
	 * correct one just in case.
	 */
	if (strstr(tundev, "tun") != NULL) {
		tunreq = TUNSTRANSIENT;
	} else {
		assert(strstr(tundev, "tap") != NULL);
		tunreq = TAPSTRANSIENT;
	}

	if (ioctl(tunfd, tunreq, &one) == -1)
		err(1, "ioctl");

	/* Final close should destroy the tunnel automagically. */
	close(tunfd);

	return (0);
}
