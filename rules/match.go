package rules

import "strings"

// Match reports whether name matches the shell pattern pattern as
// FreeBSD's fnmatch(3) does with FNM_PATHNAME, the flag devfs uses for
// `path` conditions (devfs_rule_matchpath): `*` matches any run of
// characters but '/', `?` any one character but '/', `[...]` a set
// (negated by a leading '!' or '^', with ranges and [:class:]), and a
// backslash quotes the next character. A '[' without its ']' is an
// ordinary character, as in fnmatch.
//
// A `*` is retried from its last position only (the single backtrack
// point of FreeBSD's fnmatch since 2014), so matching is linear in
// len(pattern)*len(name), never exponential, whatever the input.
func Match(pattern, name string) bool {
	p, n := 0, 0
	starP, starN := -1, -1
	for p < len(pattern) || n < len(name) {
		if p < len(pattern) {
			switch c := pattern[p]; c {
			case '*':
				for p < len(pattern) && pattern[p] == '*' {
					p++
				}
				if p == len(pattern) {
					// A trailing star takes the rest of the component.
					return !strings.Contains(name[n:], "/")
				}
				starP, starN = p, n
				continue
			case '?':
				if n < len(name) && name[n] != '/' {
					p++
					n++
					continue
				}
			case '[':
				if n < len(name) && name[n] != '/' {
					if ok, width, wellFormed := matchSet(pattern[p:], name[n]); !wellFormed {
						if name[n] == '[' {
							p++
							n++
							continue
						}
					} else if ok {
						p += width
						n++
						continue
					}
				}
			case '\\':
				lit, width := byte('\\'), 1
				if p+1 < len(pattern) {
					lit, width = pattern[p+1], 2
				}
				if n < len(name) && name[n] == lit {
					p += width
					n++
					continue
				}
			default:
				if n < len(name) && name[n] == c {
					p++
					n++
					continue
				}
			}
		}
		// Mismatch: let the last star take one more character, unless
		// that character is a '/', which no star may take.
		if starP >= 0 && starN < len(name) && name[starN] != '/' {
			starN++
			p, n = starP, starN
			continue
		}
		return false
	}
	return true
}

// matchSet matches c against the bracket expression at the start of
// pat. It returns whether c is in the set, the expression's length, and
// false as wellFormed if the expression has no closing ']'.
func matchSet(pat string, c byte) (ok bool, width int, wellFormed bool) {
	i := 1
	negate := false
	if i < len(pat) && (pat[i] == '!' || pat[i] == '^') {
		negate = true
		i++
	}
	first := true
	for {
		if i >= len(pat) {
			return false, 0, false
		}
		if pat[i] == ']' && !first {
			return ok != negate, i + 1, true
		}
		first = false
		if pat[i] == '[' && i+1 < len(pat) && pat[i+1] == ':' {
			if end := strings.Index(pat[i+2:], ":]"); end >= 0 {
				if inClass(pat[i+2:i+2+end], c) {
					ok = true
				}
				i += 2 + end + 2
				continue
			}
		}
		lo, w := setChar(pat[i:])
		if w == 0 {
			return false, 0, false
		}
		i += w
		hi := lo
		if i+1 < len(pat) && pat[i] == '-' && pat[i+1] != ']' {
			h, w := setChar(pat[i+1:])
			if w == 0 {
				return false, 0, false
			}
			hi = h
			i += 1 + w
		}
		if lo <= c && c <= hi {
			ok = true
		}
	}
}

// setChar reads one (possibly backslash-quoted) character of a set.
func setChar(s string) (byte, int) {
	if s[0] == '\\' {
		if len(s) < 2 {
			return 0, 0
		}
		return s[1], 2
	}
	return s[0], 1
}

// inClass reports whether c is in the POSIX character class named
// class (C locale); an unknown class matches nothing.
func inClass(class string, c byte) bool {
	switch class {
	case "alnum":
		return isAlpha(c) || isDigit(c)
	case "alpha":
		return isAlpha(c)
	case "blank":
		return c == ' ' || c == '\t'
	case "cntrl":
		return c < 0x20 || c == 0x7f
	case "digit":
		return isDigit(c)
	case "graph":
		return c > 0x20 && c < 0x7f
	case "lower":
		return c >= 'a' && c <= 'z'
	case "print":
		return c >= 0x20 && c < 0x7f
	case "punct":
		return c > 0x20 && c < 0x7f && !isAlpha(c) && !isDigit(c)
	case "space":
		return c == ' ' || (c >= '\t' && c <= '\r')
	case "upper":
		return c >= 'A' && c <= 'Z'
	case "xdigit":
		return isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
	}
	return false
}

func isAlpha(c byte) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }
func isDigit(c byte) bool { return c >= '0' && c <= '9' }
