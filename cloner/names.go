package cloner

// IFNAMSIZ is Linux's interface name buffer size, terminating NUL included.
const IFNAMSIZ = 16

// DefaultMaxUnit is the highest unit number a cloner hands out by default.
const DefaultMaxUnit = 32767

// ParseName splits name into a cloner prefix's unit. It accepts exactly
// prefix followed by a decimal unit without leading zeros ("tun0",
// "tun12"; not "tun01", "tun-1", "tun+1", "tunx"), with unit <= max and
// the whole name shorter than IFNAMSIZ. A bare prefix is the wildcard
// (the clone node): wildcard is true and unit is -1.
func ParseName(prefix, name string, max int) (unit int, wildcard, ok bool) {
	if len(name) >= IFNAMSIZ || len(name) < len(prefix) || name[:len(prefix)] != prefix {
		return 0, false, false
	}
	digits := name[len(prefix):]
	if digits == "" {
		return -1, true, true
	}
	if digits[0] == '0' && len(digits) > 1 {
		return 0, false, false
	}
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		if c < '0' || c > '9' {
			return 0, false, false
		}
		unit = unit*10 + int(c-'0')
		if unit > max {
			return 0, false, false
		}
	}
	return unit, false, true
}
