package cloner

import (
	"strconv"
	"strings"
	"testing"
)

func TestParseName(t *testing.T) {
	tests := []struct {
		name     string
		prefix   string
		max      int
		unit     int
		wildcard bool
		ok       bool
	}{
		// Accepted.
		{name: "tun0", unit: 0, ok: true},
		{name: "tun12", unit: 12, ok: true},
		{name: "tun32767", unit: 32767, ok: true},
		{name: "tun", unit: -1, wildcard: true, ok: true},
		{name: "tap3", prefix: "tap", unit: 3, ok: true},
		{name: "tap", prefix: "tap", unit: -1, wildcard: true, ok: true},
		{name: "tun5", max: 5, unit: 5, ok: true},
		// Rejected: leading zeros, signs, non-digits, spaces.
		{name: "tun01"},
		{name: "tun00"},
		{name: "tun-1"},
		{name: "tun+1"},
		{name: "tunx"},
		{name: "tun1x"},
		{name: "tun 1"},
		{name: " tun1"},
		{name: "tun1 "},
		{name: "tun\x001"},
		// Rejected: over the maximum unit.
		{name: "tun32768"},
		{name: "tun99999999"},
		{name: "tun6", max: 5},
		// Rejected: IFNAMSIZ (16 bytes with the NUL) or more.
		{name: "tun" + strings.Repeat("1", 13), max: 1 << 62}, // 16 bytes
		{name: "tun" + strings.Repeat("1", 20), max: 1 << 62},
		// Rejected: wrong prefix, empty, prefix only in part.
		{name: "tap3"},
		{name: "tun3", prefix: "tap"},
		{name: ""},
		{name: "tu"},
		{name: "TUN0"},
	}
	for _, tt := range tests {
		prefix, max := tt.prefix, tt.max
		if prefix == "" {
			prefix = "tun"
		}
		if max == 0 {
			max = DefaultMaxUnit
		}
		t.Run(strconv.Quote(tt.name)+"/"+prefix, func(t *testing.T) {
			unit, wildcard, ok := ParseName(prefix, tt.name, max)
			if ok != tt.ok {
				t.Fatalf("ParseName(%q, %q, %d): ok = %v, want %v", prefix, tt.name, max, ok, tt.ok)
			}
			if !ok {
				return
			}
			if unit != tt.unit || wildcard != tt.wildcard {
				t.Fatalf("ParseName(%q, %q, %d) = unit %d wildcard %v, want unit %d wildcard %v",
					prefix, tt.name, max, unit, wildcard, tt.unit, tt.wildcard)
			}
		})
	}
}

// A 15-byte name is the longest that fits IFNAMSIZ; 16 bytes is not.
func TestParseNameLengthLimit(t *testing.T) {
	max := 1 << 62
	fits := "tun" + strings.Repeat("1", IFNAMSIZ-1-len("tun")) // 15 bytes
	if _, _, ok := ParseName("tun", fits, max); !ok {
		t.Errorf("ParseName(%q) (%d bytes) rejected, want accepted", fits, len(fits))
	}
	over := fits + "1"
	if _, _, ok := ParseName("tun", over, max); ok {
		t.Errorf("ParseName(%q) (%d bytes) accepted, want rejected (IFNAMSIZ %d)", over, len(over), IFNAMSIZ)
	}
}

func FuzzParseName(f *testing.F) {
	for _, s := range []string{
		"tun", "tun0", "tun1", "tun12", "tun32767", "tun32768", "tun01", "tun00",
		"tun-1", "tun+1", "tunx", "tun1x", "tun 1", "tun99999999", "tap3", "",
		"tun123456789012", "tun1234567890123", "tun\xff", "tun٣",
	} {
		f.Add(s, DefaultMaxUnit)
	}
	f.Add("tun7", 7)
	f.Add("tun8", 7)
	f.Add("tun0", 0)
	f.Add("tun0", -1)
	f.Add("tun9223372036854775807", int(^uint(0)>>1))
	f.Fuzz(func(t *testing.T, name string, max int) {
		unit, wildcard, ok := ParseName("tun", name, max)
		if !ok {
			return
		}
		if len(name) >= IFNAMSIZ {
			t.Fatalf("ParseName accepted %q of %d bytes, want < %d", name, len(name), IFNAMSIZ)
		}
		if wildcard {
			if name != "tun" || unit != -1 {
				t.Fatalf("ParseName(%q) = wildcard with unit %d, want only \"tun\" with unit -1", name, unit)
			}
			return
		}
		digits := strings.TrimPrefix(name, "tun")
		if len(digits) > 1 && digits[0] == '0' {
			t.Fatalf("ParseName accepted %q with a leading zero", name)
		}
		if unit < 0 || unit > max {
			t.Fatalf("ParseName(%q, max %d) = unit %d, want within [0, %d]", name, max, unit, max)
		}
		if back := "tun" + strconv.Itoa(unit); back != name {
			t.Fatalf("ParseName(%q) = unit %d, which formats back as %q", name, unit, back)
		}
	})
}
