#!/usr/bin/env python3
"""Size limits of src/: no file over 700 lines, no function over 120 lines (bodies found by
brace matching, comments and literals blanked; functions inside `#[cfg(test)]` modules are
not counted). Exits 1 on an excess that is not in EXEMPT."""
import os, re, sys

MAX_FILE, MAX_FN = 700, 120
# (file, function) -> why it may be longer.
EXEMPT = {}


def blank(src):
    """Comments, strings and char literals replaced by spaces (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith('//', i):
            j = src.find('\n', i)
            j = n if j < 0 else j
            out.append(' ' * (j - i)); i = j
        elif src.startswith('/*', i):
            j = src.find('*/', i) + 2
            out.append(re.sub(r'[^\n]', ' ', src[i:j])); i = j
        elif re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == '_')):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0))) + len(end)
            out.append(re.sub(r'[^\n]', ' ', src[i:j])); i = j
        elif c == '"':
            j = i + 1
            while src[j] != '"':
                j += 2 if src[j] == '\\' else 1
            j += 1
            out.append(re.sub(r'[^\n]', ' ', src[i:j])); i = j
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            if m:
                out.append(' ' * len(m.group(0))); i += len(m.group(0))
            else:
                out.append(c); i += 1
        else:
            out.append(c); i += 1
    return ''.join(out)


def match_brace(s, i):
    depth = 0
    for j in range(i, len(s)):
        if s[j] == '{':
            depth += 1
        elif s[j] == '}':
            depth -= 1
            if depth == 0:
                return j
    return len(s) - 1


def test_spans(s):
    spans = []
    for m in re.finditer(r'#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{', s):
        spans.append((m.end() - 1, match_brace(s, m.end() - 1)))
    return spans


def functions(s):
    for m in re.finditer(r'\bfn\s+(\w+)', s):
        # The body starts at the first `{` outside parentheses/brackets; a `;` first means
        # no body (a trait method declaration).
        depth, j = 0, m.end()
        while j < len(s):
            ch = s[j]
            if ch in '([':
                depth += 1
            elif ch in ')]':
                depth -= 1
            elif depth == 0 and ch == ';':
                j = None
                break
            elif depth == 0 and ch == '{':
                break
            j += 1
        if j is None or j >= len(s):
            continue
        end = match_brace(s, j)
        yield m.group(1), m.start(), s.count('\n', m.start(), end) + 1


def main():
    bad = []
    for root, _, files in sorted(os.walk('src')):
        for f in sorted(files):
            if not f.endswith('.rs'):
                continue
            p = os.path.join(root, f)
            src = open(p).read()
            lines = src.count('\n')
            if lines > MAX_FILE:
                bad.append((p, None, lines))
            s = blank(src)
            tests = test_spans(s)
            for name, pos, n in functions(s):
                if n > MAX_FN and not any(a <= pos <= b for a, b in tests):
                    bad.append((p, name, n))
    rc = 0
    for p, name, n in bad:
        what = f'{p}: {n} lines' if name is None else f'{p}: fn {name}: {n} lines'
        why = EXEMPT.get((p, name))
        print(f'{what} (exempt: {why})' if why else what)
        rc |= not why
    if not bad:
        print(f'ok: no file over {MAX_FILE} lines, no function over {MAX_FN} lines')
    return rc


sys.exit(main())
