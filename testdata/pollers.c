/*
 * pollers: readiness tests of cdevfs device nodes, one mode per run.
 * Each node must be a configured tun (198.18.0.1 peer 198.18.0.2).
 *
 *   pollers poll NODE        poll(2) with timeouts: no event on an empty
 *                            queue (100 ms), POLLOUT at once, POLLIN after an
 *                            echo request; prints the POLLIN latencies
 *                            (write returned -> poll returned) as
 *                            "latency_us p50 P p99 P max M" over 200 rounds
 *   pollers epollet NODE N   edge-triggered epoll, nonblocking reads until
 *                            EAGAIN: N echo replies, 32 outstanding, none missed
 *   pollers select NODE...   select(2) over every NODE after sending one
 *                            request through the second: exactly it is ready
 *   pollers revoke NODE      poll(2) with no timeout; prints the revents
 *                            that end it (the test deletes the interface)
 *   pollers many CLONE N MS  opens the clone node N times (N interfaces),
 *                            prints "polling" and polls all N fds for MS ms
 *                            (nothing arrives): N concurrent pollers
 *
 * Exit 0 on success, 1 with a message on any failure; alarm(20) against hangs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#include "icmp.h"

#define SRC "198.18.0.2"
#define DST "198.18.0.1"
#define ID 0x4242

static void
die(const char *what)
{
	fprintf(stderr, "pollers: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void
fail(const char *what)
{
	fprintf(stderr, "pollers: %s\n", what);
	exit(1);
}

static double
now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void
send_echo(int fd, uint16_t seq)
{
	uint8_t p[64];
	size_t n = build_echo(p, SRC, DST, ID, seq);
	if (write(fd, p, n) != (ssize_t)n)
		die("write");
}

/* drain reads nonblocking until EAGAIN; returns replies seen, marks seqs. */
static int
drain(int fd, unsigned char *seen, int max)
{
	uint8_t buf[65536];
	int got = 0;
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf);
		if (n < 0) {
			if (errno == EAGAIN)
				return got;
			if (errno == EINTR)
				continue;
			die("read");
		}
		int seq = echo_reply_seq(buf, (size_t)n, ID);
		if (seq >= 0 && seq < max && seen != NULL && !seen[seq]) {
			seen[seq] = 1;
			got++;
		}
	}
}

static int
cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static int
mode_poll(const char *node)
{
	int fd = open(node, O_RDWR | O_NONBLOCK);
	if (fd < 0)
		die(node);
	drain(fd, NULL, 0);
	struct pollfd p = {.fd = fd, .events = POLLIN};
	double t0 = now_us();
	int r = poll(&p, 1, 100);
	if (r != 0)
		fail("poll on an empty queue reported an event");
	if (now_us() - t0 < 90e3)
		fail("poll on an empty queue returned before its 100 ms timeout");
	p.events = POLLOUT;
	if (poll(&p, 1, 0) != 1 || !(p.revents & POLLOUT))
		fail("no POLLOUT at once");
	enum { ROUNDS = 200 };
	double lat[ROUNDS];
	for (int i = 0; i < ROUNDS; i++) {
		send_echo(fd, (uint16_t)i);
		double t = now_us();
		p.events = POLLIN;
		p.revents = 0;
		r = poll(&p, 1, 1000);
		lat[i] = now_us() - t;
		if (r != 1 || !(p.revents & POLLIN))
			fail("no POLLIN within 1 s of a packet");
		unsigned char seen[ROUNDS] = {0};
		int got = 0;
		while (got == 0) {
			got = drain(fd, seen, ROUNDS);
			if (got == 0 && poll(&p, 1, 1000) != 1)
				fail("echo reply never came");
		}
	}
	qsort(lat, ROUNDS, sizeof lat[0], cmp);
	printf("latency_us p50 %.0f p99 %.0f max %.0f\n", lat[ROUNDS / 2], lat[ROUNDS * 99 / 100], lat[ROUNDS - 1]);
	return 0;
}

static int
mode_epollet(const char *node, int total)
{
	int fd = open(node, O_RDWR | O_NONBLOCK);
	if (fd < 0)
		die(node);
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.fd = fd};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl");
	drain(fd, NULL, 0);
	unsigned char *seen = calloc((size_t)total, 1);
	int sent = 0, got = 0;
	while (got < total) {
		while (sent < total && sent - got < 32)
			send_echo(fd, (uint16_t)sent++);
		struct epoll_event out;
		int n = epoll_wait(ep, &out, 1, 2000);
		if (n < 0 && errno == EINTR)
			continue;
		if (n != 1) {
			fprintf(stderr, "pollers: epoll_wait timed out with %d of %d replies (sent %d): an edge was missed\n", got, total, sent);
			return 1;
		}
		got += drain(fd, seen, total);
	}
	printf("epollet received %d of %d\n", got, total);
	return 0;
}

static int
mode_select(int n, char **nodes)
{
	int fds[16];
	int maxfd = 0;
	for (int i = 0; i < n; i++) {
		fds[i] = open(nodes[i], O_RDWR | O_NONBLOCK);
		if (fds[i] < 0)
			die(nodes[i]);
		drain(fds[i], NULL, 0);
		if (fds[i] > maxfd)
			maxfd = fds[i];
	}
	send_echo(fds[1], 1);
	usleep(50000);
	fd_set r;
	FD_ZERO(&r);
	for (int i = 0; i < n; i++)
		FD_SET(fds[i], &r);
	struct timeval tv = {.tv_sec = 1};
	int k = select(maxfd + 1, &r, NULL, NULL, &tv);
	if (k != 1 || !FD_ISSET(fds[1], &r)) {
		fprintf(stderr, "pollers: select reported %d ready, want exactly %s\n", k, nodes[1]);
		return 1;
	}
	printf("select: only %s ready\n", nodes[1]);
	return 0;
}

static int
mode_revoke(const char *node)
{
	int fd = open(node, O_RDWR | O_NONBLOCK);
	if (fd < 0)
		die(node);
	drain(fd, NULL, 0);
	printf("waiting\n");
	fflush(stdout);
	struct pollfd p = {.fd = fd, .events = POLLIN};
	if (poll(&p, 1, -1) != 1)
		die("poll");
	printf("revents%s%s%s\n", p.revents & POLLERR ? " POLLERR" : "", p.revents & POLLHUP ? " POLLHUP" : "",
	    p.revents & POLLIN ? " POLLIN" : "");
	return (p.revents & (POLLERR | POLLHUP)) ? 0 : 1;
}

static int
mode_many(const char *clone, int n, int ms)
{
	struct pollfd *p = calloc((size_t)n, sizeof *p);
	for (int i = 0; i < n; i++) {
		p[i].fd = open(clone, O_RDWR | O_NONBLOCK);
		if (p[i].fd < 0)
			die(clone);
		p[i].events = POLLIN;
	}
	printf("polling\n");
	fflush(stdout);
	int r = poll(p, (nfds_t)n, ms);
	printf("poll returned %d\n", r);
	return r < 0;
}

int
main(int argc, char **argv)
{
	alarm(20);
	if (argc >= 3 && strcmp(argv[1], "poll") == 0)
		return mode_poll(argv[2]);
	if (argc >= 4 && strcmp(argv[1], "epollet") == 0)
		return mode_epollet(argv[2], atoi(argv[3]));
	if (argc >= 4 && strcmp(argv[1], "select") == 0)
		return mode_select(argc - 2 > 16 ? 16 : argc - 2, argv + 2);
	if (argc >= 3 && strcmp(argv[1], "revoke") == 0)
		return mode_revoke(argv[2]);
	if (argc >= 5 && strcmp(argv[1], "many") == 0) {
		alarm(120);
		return mode_many(argv[2], atoi(argv[3]), atoi(argv[4]));
	}
	fprintf(stderr, "usage: pollers poll|epollet|select|revoke NODE...\n");
	return 2;
}
