/* net/if_tap.h for cdevfs: the TAP names are aliases of net/if_tun.h's. */
#ifndef CDEVFS_NET_IF_TAP_H
#define CDEVFS_NET_IF_TAP_H
#include <net/if_tun.h>
#endif
