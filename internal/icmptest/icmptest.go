// Package icmptest builds IPv4 ICMP echo requests for the tests that send
// packets through tun interfaces (package cloner's and cmd/cdevfs's).
package icmptest

import (
	"encoding/binary"
	"net/netip"
)

// Checksum is the Internet checksum (RFC 1071).
func Checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// EchoRequest builds an IPv4 ICMP echo request from src to dst with the
// given id and sequence number and a payload of size bytes.
func EchoRequest(src, dst netip.Addr, id, seq uint16, size int) []byte {
	const ihl = 20
	p := make([]byte, ihl+8+size)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:], seq)
	binary.BigEndian.PutUint16(p[6:], 0x4000) // DF
	p[8] = 64                                 // TTL
	p[9] = 1                                  // ICMP
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[10:], Checksum(p[:ihl]))
	icmp := p[ihl:]
	icmp[0] = 8 // echo request
	binary.BigEndian.PutUint16(icmp[4:], id)
	binary.BigEndian.PutUint16(icmp[6:], seq)
	for i := range icmp[8:] {
		icmp[8+i] = byte(i) + byte(seq)
	}
	binary.BigEndian.PutUint16(icmp[2:], Checksum(icmp))
	return p
}
