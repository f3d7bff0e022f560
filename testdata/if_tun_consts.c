/* Prints the values of net/if_tun.h, one "NAME VALUE" per line, for the
 * test that compares them with the Go package bsdtun. */
#include <stdio.h>
#include <net/if_tun.h>
#include <net/if_tap.h>

#define P(x) printf("%s %lu\n", #x, (unsigned long)(x))

int
main(void)
{
	P(TUNSDEBUG); P(TUNGDEBUG); P(TUNSIFINFO); P(TUNGIFINFO);
	P(TUNSLMODE); P(TUNGIFNAME); P(TUNSIFMODE); P(TUNSIFPID);
	P(TUNSIFHEAD); P(TUNGIFHEAD); P(TUNSTRANSIENT); P(TUNGTRANSIENT);
	P(TAPSDEBUG); P(TAPGDEBUG); P(TAPSIFINFO); P(TAPGIFINFO);
	P(TAPGIFNAME); P(TAPSTRANSIENT); P(TAPGTRANSIENT);
	P(IFT_ETHER); P(IFT_PPP); P(TUNMRU);
	printf("sizeof_tuninfo %zu\n", sizeof(struct tuninfo));
	printf("sizeof_ifreq %zu\n", sizeof(struct ifreq));
	return 0;
}
