/*
 * mmapzero: maps /dev/zero as allocators and shared-memory setups do:
 *
 *	mmapzero [PATH]
 *
 * Maps 1 MiB of PATH (default /dev/zero) with MAP_PRIVATE and with
 * MAP_SHARED; checks each reads as zeros and takes writes; then a child
 * writes into the shared mapping and the parent must see it (a
 * MAP_SHARED mapping of /dev/zero is shared anonymous memory: fork
 * keeps it shared). Prints "mmap PATH ok" and exits 0; on any failure a
 * message on stderr and status 1. On a /dev/zero that is no character
 * device (a FUSE file with direct I/O) MAP_SHARED fails with ENODEV.
 */
#define _GNU_SOURCE
#include <err.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define LEN (1 << 20)

static unsigned char *map(int fd, int flags, const char *path, const char *what)
{
	unsigned char *p = mmap(NULL, LEN, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (p == MAP_FAILED)
		err(1, "mmap %s %s", what, path);
	for (size_t i = 0; i < LEN; i += 4096)
		if (p[i] != 0 || p[i + 4095] != 0)
			errx(1, "mmap %s %s: byte %zu is not zero", what, path, i);
	p[LEN / 2] = 7;
	if (p[LEN / 2] != 7)
		errx(1, "mmap %s %s: a write did not stay", what, path);
	return p;
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/dev/zero";
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		err(1, "open %s", path);
	map(fd, MAP_PRIVATE, path, "MAP_PRIVATE");
	unsigned char *shared = map(fd, MAP_SHARED, path, "MAP_SHARED");
	pid_t pid = fork();
	if (pid < 0)
		err(1, "fork");
	if (pid == 0) {
		shared[1] = 42;
		_exit(0);
	}
	int status;
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		errx(1, "the child that wrote into the shared mapping failed");
	if (shared[1] != 42)
		errx(1, "mmap MAP_SHARED %s: the child's write is not seen by its parent", path);
	printf("mmap %s ok\n", path);
	return 0;
}
