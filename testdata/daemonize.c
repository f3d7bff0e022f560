/*
 * daemonize: call glibc's daemon(3), as tmux and every daemon do, then,
 * in the daemon, write what its stdin now is to FILE:
 *
 *	daemonize FILE
 *
 * daemon(0, 0) opens /dev/null and refuses one that is not the
 * character device 1:3 (ENODEV); then the daemon writes "ok MAJ:MIN" to
 * FILE.tmp and renames it to FILE. Exit status 1 if daemon(3) fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: daemonize FILE\n");
		return 2;
	}
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
	if (daemon(0, 0) < 0) {
		fprintf(stderr, "daemon: %s\n", strerror(errno));
		return 1;
	}
	struct stat st;
	if (fstat(0, &st) < 0)
		return 1;
	FILE *f = fopen(tmp, "w");
	if (f == NULL)
		return 1;
	fprintf(f, "ok %u:%u\n", major(st.st_rdev), minor(st.st_rdev));
	if (fclose(f) != 0)
		return 1;
	return rename(tmp, argv[1]) == 0 ? 0 : 1;
}
