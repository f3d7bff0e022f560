/*
 * net/if_tun.h for cdevfs: FreeBSD's tun(4)/tap(4) ioctl interface,
 * re-encoded with Linux's _IOW/_IOR so that FUSE passes the commands as
 * "restricted" ioctls (their size and direction are in the number; the BSD
 * values would decode wrongly on Linux).
 *
 * Use: cc -I path/to/cdevfs/include prog.c (or install it under
 * /usr/local/include, as the README shows), then
 *   #include <net/if_tun.h>
 *   fd = open("/dev/tun", O_RDWR);              (on a cdevfs mount)
 *   struct ifreq ifr; ioctl(fd, TUNGIFNAME, &ifr);  -> "tun0"
 * The Go package github.com/cdevfs/cdevfs/bsdtun has the same numbers.
 */
#ifndef CDEVFS_NET_IF_TUN_H
#define CDEVFS_NET_IF_TUN_H

#include <sys/ioctl.h>
#include <net/if.h>

/* Maximum transmit packet size (the MRU): a longer write is EIO. */
#define TUNMRU 65535

struct tuninfo {
	int baudrate;        /* linespeed */
	unsigned short mtu;  /* maximum transmission unit */
	unsigned char type;  /* ethernet, tokenring, etc. (IFT_PPP for tun, IFT_ETHER for tap) */
	unsigned char dummy; /* place holder */
};

#define IFT_ETHER 0x6
#define IFT_PPP 0x17

#define TUNSDEBUG      _IOW('t', 90, int)
#define TUNGDEBUG      _IOR('t', 89, int)
#define TUNSIFINFO     _IOW('t', 91, struct tuninfo)
#define TUNGIFINFO     _IOR('t', 92, struct tuninfo)
#define TUNSLMODE      _IOW('t', 93, int)
#define TUNGIFNAME     _IOR('t', 93, struct ifreq)
#define TUNSIFMODE     _IOW('t', 94, int)
#define TUNSIFPID      _IO('t', 95)
#define TUNSIFHEAD     _IOW('t', 96, int)
#define TUNGIFHEAD     _IOR('t', 97, int)
#define TUNSTRANSIENT  _IOW('t', 98, int)
#define TUNGTRANSIENT  _IOR('t', 99, int)

/* net/if_tap.h names: aliases of the tun ones. */
#define TAPSDEBUG      TUNSDEBUG
#define TAPGDEBUG      TUNGDEBUG
#define TAPSIFINFO     TUNSIFINFO
#define TAPGIFINFO     TUNGIFINFO
#define TAPGIFNAME     TUNGIFNAME
#define TAPSTRANSIENT  TUNSTRANSIENT
#define TAPGTRANSIENT  TUNGTRANSIENT

#endif /* CDEVFS_NET_IF_TUN_H */
