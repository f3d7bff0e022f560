package main

import (
	"net/netip"

	"github.com/cdevfs/cdevfs/internal/icmptest"
)

// echoRequest builds an IPv4 ICMP echo request from src to dst with a
// payload of size bytes.
func echoRequest(src, dst string, seq uint16, size int) []byte {
	return icmptest.EchoRequest(netip.MustParseAddr(src), netip.MustParseAddr(dst), 0xcd, seq, size)
}
