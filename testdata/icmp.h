/* icmp.h: build IPv4 ICMP echo requests and recognize their replies, for
 * the testdata clients. */
#ifndef CDEVFS_TESTDATA_ICMP_H
#define CDEVFS_TESTDATA_ICMP_H

#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

static uint16_t
icmp_cksum(const uint8_t *p, size_t n)
{
	uint32_t s = 0;
	for (size_t i = 0; i + 1 < n; i += 2)
		s += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (n & 1)
		s += (uint32_t)p[n - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

/* build_echo writes an echo request src->dst with id, seq and a 32-byte
 * payload into p (at least 60 bytes) and returns its length. */
static size_t
build_echo(uint8_t *p, const char *src, const char *dst, uint16_t id, uint16_t seq)
{
	size_t len = 20 + 8 + 32;
	memset(p, 0, len);
	p[0] = 0x45;
	p[2] = (uint8_t)(len >> 8);
	p[3] = (uint8_t)len;
	p[8] = 64;
	p[9] = 1;
	inet_pton(AF_INET, src, p + 12);
	inet_pton(AF_INET, dst, p + 16);
	uint16_t c = icmp_cksum(p, 20);
	p[10] = (uint8_t)(c >> 8);
	p[11] = (uint8_t)c;
	uint8_t *icmp = p + 20;
	icmp[0] = 8;
	icmp[4] = (uint8_t)(id >> 8);
	icmp[5] = (uint8_t)id;
	icmp[6] = (uint8_t)(seq >> 8);
	icmp[7] = (uint8_t)seq;
	for (int i = 0; i < 32; i++)
		icmp[8 + i] = (uint8_t)i;
	c = icmp_cksum(icmp, 8 + 32);
	icmp[2] = (uint8_t)(c >> 8);
	icmp[3] = (uint8_t)c;
	return len;
}

/* echo_reply_seq returns the sequence number of an echo reply with the
 * given id, or -1 for any other packet. */
static int
echo_reply_seq(const uint8_t *p, size_t n, uint16_t id)
{
	if (n < 28 || (p[0] >> 4) != 4 || p[9] != 1)
		return -1;
	size_t ihl = (size_t)(p[0] & 0xf) * 4;
	if (n < ihl + 8 || p[ihl] != 0)
		return -1;
	if ((uint16_t)(p[ihl + 4] << 8 | p[ihl + 5]) != id)
		return -1;
	return p[ihl + 6] << 8 | p[ihl + 7];
}

#endif
