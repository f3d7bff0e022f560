package rules

import "testing"

func TestMatch(t *testing.T) {
	cases := []struct {
		pattern, name string
		want          bool
	}{
		{"tun*", "tun0", true},
		{"tun*", "tun", true},
		{"tun*", "tap0", false},
		{"tun?", "tun0", true},
		{"tun?", "tun10", false},
		{"tun[0-3]", "tun2", true},
		{"tun[0-3]", "tun4", false},
		{"tun[!0-3]", "tun4", true},
		{"tun[^0-3]", "tun2", false},
		{"tun[]]", "tun]", true},
		{"tun[!]]", "tun]", false},
		{"tun[[:digit:]]", "tun7", true},
		{"tun[[:digit:]]", "tunx", false},
		{"tun[[:alpha:][:digit:]]x", "tunbx", true},
		{"tun[", "tun[", true}, // no closing ']': an ordinary '['
		{"tun[0", "tun0", false},
		{`tun\*`, "tun*", true},
		{`tun\*`, "tun0", false},
		{`tun\`, `tun\`, true}, // a trailing backslash is itself
		{"*", "", true},
		{"", "", true},
		{"", "a", false},
		{"*", "net/tun0", false}, // FNM_PATHNAME: '*' stops at '/'
		{"*/*", "net/tun0", true},
		{"net/tun?", "net/tun0", true},
		{"net?tun0", "net/tun0", false},
		{"net[/]tun0", "net/tun0", false},
		{"*0", "tun10", true},
		{"*1*0", "tun10", true},
		{"t*n*n", "tunnn", true},
		{"a*b*c", "aXbYbZc", true},
		{"a*b*c", "aXbYbZ", false},
		{"*a*a*a*a*a*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false},
	}
	for _, c := range cases {
		if got := Match(c.pattern, c.name); got != c.want {
			t.Errorf("Match(%q, %q) = %v, want %v", c.pattern, c.name, got, c.want)
		}
	}
}

// FuzzMatch: Match never panics, and a name always matches itself
// quoted with backslashes.
func FuzzMatch(f *testing.F) {
	for _, s := range []string{"tun*", "[!a-z]", "[[:alpha:]", `\`, "*/*", "a*b?c[", "[]-]"} {
		f.Add(s, "tun0")
	}
	f.Fuzz(func(t *testing.T, pattern, name string) {
		Match(pattern, name)
		quoted := make([]byte, 0, 2*len(name))
		for i := 0; i < len(name); i++ {
			quoted = append(quoted, '\\', name[i])
		}
		if !Match(string(quoted), name) {
			t.Errorf("Match(%q, %q) = false for the quoted name", quoted, name)
		}
	})
}
