/*
 * icmpecho: ping through a tun device from the "far end" of the link.
 *
 * usage: icmpecho [-t IFNAME] [-u UPCMD] DEVICE SRC DST [COUNT]
 *
 * Opens DEVICE (for instance MOUNT/tun5 on a cdevfs mount) read-write and,
 * COUNT times (default 1), writes one IPv4 ICMP echo request from SRC to DST
 * with a single write(2), then read(2)s packets into a 65536-byte buffer until
 * the matching echo reply (DST to SRC, same id and sequence, same payload,
 * valid checksums) arrives. Any other packet (IPv6 router solicitations, ARP
 * on a tap, ...) is ignored. The device must carry raw IPv4 packets: a tun
 * without a packet-information or address-family header.
 *
 * If poll(2) reports nothing to read for 200 ms the same request is written
 * again. This is needed: when a fd attaches to a tun that is already up, the
 * kernel drops what it sends to the tun until its link watcher has noticed
 * the carrier and activated the queueing discipline, so the reply to a
 * request written at once after open(2) is sometimes lost (1 in 4 on a fresh
 * interface here, counted as "TX dropped" by `ip -s link`). On a device whose
 * poll always says "readable" (a FUSE file whose daemon does not answer
 * FUSE_POLL) the client cannot tell and only the timeout ends the wait.
 *
 * With -t IFNAME, DEVICE is the Linux clone device (/dev/net/tun) and the fd
 * is bound to the existing persistent interface IFNAME with
 * TUNSETIFF(IFF_TUN|IFF_NO_PI) before use. The Go tests of package cloner
 * use this to check the client against a plain kernel tun, without a cdevfs
 * mount.
 *
 * With -u UPCMD, once DEVICE is open the client asks which interface it
 * got (cdevfs's BSD TUNGIFNAME ioctl, as from include/net/if_tun.h)
 * and runs `sh -c UPCMD sh IFNAME` before the first request, as OpenVPN
 * runs its --up script: opening a clone node (MOUNT/tun) creates an
 * interface whose name only the opener learns, and someone has to give it
 * addresses and set it up. The client fails if UPCMD does.
 *
 * Exit status 0 when every echo was answered; 1 with a message on stderr on
 * any failure, including no answer within 5 seconds per request (alarm(2)).
 * On a FUSE device the signal ends a blocked read(2) only if the daemon
 * answers the FUSE interrupt; one that never does can still hang the
 * client, so callers should add their own kill timeout.
 *
 * Build: gcc -std=c99 -Wall -Wextra -O2 -o icmpecho icmpecho.c
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/if.h>
#include <linux/if_tun.h>
#endif

#ifdef __linux__
/* cdevfs's TUNGIFNAME (BSD's, re-encoded for Linux); the same number as in
 * include/net/if_tun.h, whose <net/if.h> clashes with <linux/if.h>. */
#ifndef TUNGIFNAME
#define TUNGIFNAME _IOR('t', 93, struct ifreq)
#endif
#endif

#define IPHDR_LEN 20
#define ICMPHDR_LEN 8
#define PAYLOAD_LEN 56
#define TIMEOUT_SECONDS 5
#define RESEND_MS 200
#define BUFSIZE 65536

static const char *prog = "icmpecho";
static unsigned char buf[BUFSIZE];

static void die(const char *fmt, const char *arg)
{
	fprintf(stderr, "%s: ", prog);
	fprintf(stderr, fmt, arg);
	fputc('\n', stderr);
	exit(1);
}

static void die_errno(const char *what, const char *arg)
{
	int e = errno;
	fprintf(stderr, "%s: %s %s: %s\n", prog, what, arg, strerror(e));
	exit(1);
}

static void on_alarm(int sig)
{
	static const char msg[] = "icmpecho: timed out waiting for the echo reply\n";
	ssize_t r;
	(void)sig;
	r = write(STDERR_FILENO, msg, sizeof msg - 1);
	(void)r;
	_exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: %s [-t IFNAME] [-u UPCMD] DEVICE SRC DST [COUNT]\n", prog);
	exit(1);
}

/* The Internet checksum (RFC 1071) of len bytes at p. */
static uint16_t cksum(const unsigned char *p, size_t len)
{
	uint32_t sum = 0;
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void put16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
}

static uint16_t get16(const unsigned char *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

/* build writes an echo request into pkt and returns its length. */
static size_t build(unsigned char *pkt, const struct in_addr *src,
		    const struct in_addr *dst, uint16_t id, uint16_t seq)
{
	size_t total = IPHDR_LEN + ICMPHDR_LEN + PAYLOAD_LEN;
	unsigned char *icmp = pkt + IPHDR_LEN;
	size_t i;

	memset(pkt, 0, total);
	pkt[0] = 0x45;			/* version 4, IHL 5 */
	put16(pkt + 2, (uint16_t)total);
	put16(pkt + 4, seq);		/* identification */
	put16(pkt + 6, 0x4000);		/* DF */
	pkt[8] = 64;			/* TTL */
	pkt[9] = IPPROTO_ICMP;
	memcpy(pkt + 12, &src->s_addr, 4);
	memcpy(pkt + 16, &dst->s_addr, 4);
	put16(pkt + 10, cksum(pkt, IPHDR_LEN));

	icmp[0] = 8;			/* echo request */
	icmp[1] = 0;
	put16(icmp + 4, id);
	put16(icmp + 6, seq);
	for (i = 0; i < PAYLOAD_LEN; i++)
		icmp[ICMPHDR_LEN + i] = (unsigned char)(i + seq);
	put16(icmp + 2, cksum(icmp, ICMPHDR_LEN + PAYLOAD_LEN));
	return total;
}

/* send_request writes the len-byte packet req to fd with one write(2). */
static void send_request(int fd, const char *dev, const unsigned char *req,
			 size_t len)
{
	ssize_t n = write(fd, req, len);

	if (n < 0)
		die_errno("write", dev);
	if ((size_t)n != len)
		die("short write to %s", dev);
}

/* is_reply tells whether the n bytes in p are the reply to req. */
static int is_reply(const unsigned char *p, size_t n, const unsigned char *req,
		    size_t reqlen)
{
	size_t ihl, tot;
	const unsigned char *icmp;
	size_t icmplen = reqlen - IPHDR_LEN;

	if (n < IPHDR_LEN || p[0] >> 4 != 4)
		return 0;
	ihl = (size_t)(p[0] & 0x0f) * 4;
	tot = get16(p + 2);
	if (ihl < IPHDR_LEN || tot < ihl || tot > n || p[9] != IPPROTO_ICMP)
		return 0;
	if (cksum(p, ihl) != 0)
		return 0;
	/* from our DST to our SRC */
	if (memcmp(p + 12, req + 16, 4) != 0 || memcmp(p + 16, req + 12, 4) != 0)
		return 0;
	if (tot - ihl != icmplen)
		return 0;
	icmp = p + ihl;
	if (icmp[0] != 0 || icmp[1] != 0 || cksum(icmp, icmplen) != 0)
		return 0;
	/* same id, seq and payload */
	return memcmp(icmp + 4, req + IPHDR_LEN + 4, icmplen - 4) == 0;
}

/* run_up runs `sh -c cmd sh ifname` and waits for it; it must succeed. */
static void run_up(const char *cmd, const char *ifname)
{
	pid_t pid = fork();
	int st;

	if (pid < 0)
		die_errno("fork", "for -u");
	if (pid == 0) {
		execl("/bin/sh", "sh", "-c", cmd, "sh", ifname, (char *)NULL);
		_exit(127);
	}
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			die_errno("waitpid", "-u command");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		die("-u command failed for %s", ifname);
}

int main(int argc, char **argv)
{
	const char *ifname = NULL, *upcmd = NULL, *dev;
	struct in_addr src, dst;
	unsigned char req[IPHDR_LEN + ICMPHDR_LEN + PAYLOAD_LEN];
	struct sigaction sa;
	long count = 1;
	uint16_t id;
	long seq;
	int fd, c;

	while ((c = getopt(argc, argv, "t:u:")) != -1) {
		switch (c) {
		case 't':
			ifname = optarg;
			break;
		case 'u':
			upcmd = optarg;
			break;
		default:
			usage();
		}
	}
	argc -= optind;
	argv += optind;
	if (argc < 3 || argc > 4)
		usage();
	dev = argv[0];
	if (inet_pton(AF_INET, argv[1], &src) != 1)
		die("bad SRC address %s", argv[1]);
	if (inet_pton(AF_INET, argv[2], &dst) != 1)
		die("bad DST address %s", argv[2]);
	if (argc == 4) {
		char *end;
		errno = 0;
		count = strtol(argv[3], &end, 10);
		if (errno != 0 || *end != '\0' || end == argv[3] || count < 1 ||
		    count > 65535)
			die("bad COUNT %s", argv[3]);
	}

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGALRM, &sa, NULL) != 0)
		die_errno("sigaction", "SIGALRM");
	alarm(TIMEOUT_SECONDS);

	fd = open(dev, O_RDWR);
	if (fd < 0)
		die_errno("open", dev);
	if (ifname != NULL) {
#ifdef TUNSETIFF
		struct ifreq ifr;
		if (strlen(ifname) >= IFNAMSIZ)
			die("interface name too long: %s", ifname);
		memset(&ifr, 0, sizeof ifr);
		strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
		ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
		if (ioctl(fd, TUNSETIFF, &ifr) != 0)
			die_errno("TUNSETIFF", ifname);
		/*
		 * TUNSETIFF creates IFNAME if it does not exist; such an
		 * interface is not persistent and goes away on exit.
		 */
		if (ioctl(fd, TUNGETIFF, &ifr) != 0)
			die_errno("TUNGETIFF", ifname);
		if (!(ifr.ifr_flags & IFF_PERSIST))
			die("%s is not an existing persistent tun interface", ifname);
#else
		die("-t %s: TUNSETIFF is Linux only", ifname);
#endif
	}

	if (upcmd != NULL) {
#ifdef __linux__
		struct ifreq ifr;
		char name[IFNAMSIZ + 1];
		memset(&ifr, 0, sizeof ifr);
		if (ioctl(fd, TUNGIFNAME, &ifr) != 0)
			die_errno("TUNGIFNAME", dev);
		memcpy(name, ifr.ifr_name, IFNAMSIZ);
		name[IFNAMSIZ] = '\0';
		run_up(upcmd, name);
#else
		die("-u %s: needs Linux's struct ifreq", upcmd);
#endif
	}

	id = (uint16_t)getpid();
	for (seq = 1; seq <= count; seq++) {
		size_t len = build(req, &src, &dst, id, (uint16_t)seq);
		ssize_t n;

		alarm(TIMEOUT_SECONDS);
		send_request(fd, dev, req, len);
		for (;;) {
			struct pollfd pfd;
			int r;

			pfd.fd = fd;
			pfd.events = POLLIN;
			pfd.revents = 0;
			r = poll(&pfd, 1, RESEND_MS);
			if (r < 0) {
				if (errno == EINTR)
					continue;
				die_errno("poll", dev);
			}
			if (r == 0) {
				send_request(fd, dev, req, len);
				continue;
			}
			n = read(fd, buf, sizeof buf);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				die_errno("read", dev);
			}
			if (n == 0)
				die("end of file on %s", dev);
			if (is_reply(buf, (size_t)n, req, len))
				break;
		}
	}
	alarm(0);
	if (close(fd) != 0)
		die_errno("close", dev);
	return 0;
}
