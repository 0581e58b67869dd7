#!/usr/bin/env python3
"""Checks that no circle of imports remains between the source files of a crate.

Usage: scripts/check-layers.py [--verbose] [--self-test] [ROOT]

For every crate under ROOT/crates/*/src (ROOT: the repository, by default the folder above
this script) it builds the graph of which source file imports which other file of the same
crate, then looks for cycles. Standard library only.

The rule: the import graph between files, ignoring child -> ancestor edges (a module may use
what its ancestors define), has no cycle.

- Files are modules by their paths: `lib.rs` / `main.rs` is the crate root, `a/b.rs` and
  `a/b/mod.rs` are module `a::b` (`a.rs` + `a/` is the 2018 layout of `a/mod.rs`);
  `src/bin/NAME.rs` is a crate root of its own. Inline modules (`mod tests { ... }`) belong
  to their file.
- An import of file F by file G is any path in G's code that names an item or module of F:
  `use crate::…`, `use super::…`, `use self::…` (grouped trees included), path
  expressions such as `crate::a::b::f(`, `super::x::Y`, `$crate::…` in macros, and paths that
  start with a child module's name or with a name a `use` bound (`block::Block`,
  `trace::read(…)` after `use crate::trace;`). A path resolves to the deepest module that is
  a file; when it then names an item another module only re-exports (`pub use`, or a plain
  `use` a child reaches with `super::`), the re-export is followed to the file that defines
  it, so `use super::Block` in `pool/access.rs` is an import of `pool/block.rs`.
- Re-exports are not imports: `pub use x::Y;` (any `pub(…)`) in a file that never names `Y`
  in its own code only publishes `Y`; whoever names `Y` through it imports the file that
  defines `Y`. So a `mod.rs` may re-export what its children define without the children's
  imports coming back to it. A `use` that names a module (`use crate::snapshot;`) is not an
  import by itself either: the paths through it (`snapshot::load(…)`) are.
- `mod x;` is not an import: it makes `x` a child. A child using its ancestors' items
  (`super::PoolState`, `crate::error::…` from `error/…`) is not counted: that edge points
  up the tree, and a module's children are part of it. Every other edge counts: a parent
  using its child's items, siblings, cousins. (Types that hold each other can therefore
  live in a parent and its child, never in two siblings.)
- Comments and string literals are skipped; `#[cfg]`-gated code counts (tests included).
  Glob imports (`use super::*`) count as an import of that module's file. Paths that begin
  with an extern crate's name (`std::`, `accelrt_alloc::`) are not followed: crates are
  checked by the compiler (a wrong-way `use` between crates does not build). Not seen:
  `#[path]` attributes, items reached only through a glob re-export, and a trait imported
  by `pub use` only to call its methods in the same file.

Each cycle found is printed as a chain of files, with the line of each import, and the exit
status is 1; otherwise one summary line (crates, files, edges) and status 0.
`--verbose` prints every import counted (`file:line -> file`). `--self-test` builds a
temporary tree with a circle (and one without) and checks that the checker finds exactly the
circle and the other tree's imports; CI runs it next to the real check.
"""

import os
import re
import sys
import tempfile

# --------------------------------------------------------------------------------------
# Lexing: Rust source -> tokens (identifiers, `::`, punctuation), comments and literals out.

IDENT_START = re.compile(r"[A-Za-z_]")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RAW_STR = re.compile(r'(?:b|c)?r(#*)"')
NUMBER = re.compile(r"[0-9][0-9A-Za-z_]*(\.[0-9][0-9A-Za-z_]*)?")


def lex(text):
    """Yields (token, line) pairs. Tokens: identifiers (`r#` stripped), `$crate`, `::`,
    and single punctuation characters. Comments, strings, chars and numbers are dropped."""
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        line += 1
                    i += 1
        elif (m := RAW_STR.match(text, i)) and (i == 0 or not IDENT.match(text[i - 1])):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            line += text.count("\n", i, j)
            i = j
        elif c == '"' or (c in "bc" and text.startswith('"', i + 1)):
            i = i + 1 if c == '"' else i + 2
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                if i < n and text[i] == "\n":
                    line += 1
                i += 1
            i += 1
        elif c == "'" or (c == "b" and text.startswith("'", i + 1)):
            # A char literal ('a', '\n', '\u{1F600}', b'x') or a lifetime / label ('a).
            k = i + 1 if c == "'" else i + 2
            if k < n and text[k] == "\\":
                j = text.find("'", k + 2)
                i = n if j < 0 else j + 1
            elif k + 1 < n and text[k + 1] == "'":
                i = k + 2
            else:
                i = k  # a lifetime: its name lexes as an identifier, harmlessly
        elif text.startswith("$crate", i):
            yield "$crate", line
            i += 6
        elif text.startswith("r#", i) and IDENT_START.match(text, i + 2):
            m = IDENT.match(text, i + 2)
            yield m.group(0), line
            i = m.end()
        elif IDENT_START.match(c):
            m = IDENT.match(text, i)
            yield m.group(0), line
            i = m.end()
        elif c.isdigit():
            i = NUMBER.match(text, i).end()
        elif text.startswith("::", i):
            yield "::", line
            i += 2
        else:
            yield c, line
            i += 1


# --------------------------------------------------------------------------------------
# Parsing: per file, the `use` bindings of each module and the paths its code names.

KEYWORD_STARTS = {"Self", "self", "super", "crate", "$crate"}


def parse_use_tree(toks, k, prefix, out):
    """Parses a use tree at toks[k]; appends (segments, alias, is_glob) to out.
    Returns the index after the tree."""
    segs = list(prefix)
    if k < len(toks) and toks[k][0] == "::":  # `use ::std::…`: an extern path
        segs.append("::")
        k += 1
    while k < len(toks):
        t = toks[k][0]
        if t == "{":
            k += 1
            while k < len(toks) and toks[k][0] != "}":
                k = parse_use_tree(toks, k, segs, out)
                if k < len(toks) and toks[k][0] == ",":
                    k += 1
            return k + 1
        if t == "*":
            out.append((segs, None, True))
            return k + 1
        if IDENT.fullmatch(t) or t == "$crate":
            segs = segs + [t]
            k += 1
            if k < len(toks) and toks[k][0] == "::":
                k += 1
                continue
            alias = None
            if k + 1 < len(toks) and toks[k][0] == "as":
                alias = toks[k + 1][0]
                k += 2
            out.append((segs, alias, False))
            return k
        return k  # something unexpected: stop this tree
    return k


class FileInfo:
    def __init__(self, rel, modpath):
        self.rel = rel  # path relative to the crate's src folder
        self.modpath = tuple(modpath)
        # module path -> {name: (segments, line)} bound by `use` in that module
        self.bindings = {}
        # (module path the reference is written in, segments, line, kind, name), kind one of
        # "path" (in code), "use", "glob", "reexport" (a `pub use`)
        self.refs = []
        # identifiers of the file's code outside `use` declarations
        self.code_idents = set()
        self.inline_mods = set()


def parse_file(info, text):
    toks = list(lex(text))
    stack = []  # per open brace: the inline module's name, or None
    modpath = lambda: info.modpath + tuple(s for s in stack if s is not None)  # noqa: E731
    k, n = 0, len(toks)
    while k < n:
        t, line = toks[k]
        if t == "{":
            name = None
            if k >= 2 and toks[k - 2][0] == "mod" and IDENT.fullmatch(toks[k - 1][0]):
                name = toks[k - 1][0]
                info.inline_mods.add(modpath() + (name,))
            stack.append(name)
            k += 1
        elif t == "}":
            if stack:
                stack.pop()
            k += 1
        elif t == "use" and (k == 0 or toks[k - 1][0] != "::"):
            trees = []
            j = parse_use_tree(toks, k + 1, [], trees)
            here = modpath()
            # `pub use`, `pub(crate) use`, `pub(super) use`, `pub(in …) use`
            before = [tok for tok, _ in toks[max(0, k - 8) : k]]
            public = bool(before) and (
                before[-1] == "pub" or (before[-1] == ")" and "pub" in before)
            )
            for segs, alias, glob in trees:
                if not segs:
                    continue
                if glob:
                    info.refs.append((here, segs, line, "glob", None))
                    continue
                name = alias or segs[-1]
                if segs[-1] == "self":  # `use a::b::{self, …}`
                    segs = segs[:-1]
                    name = alias or (segs[-1] if segs else None)
                if not segs:
                    continue
                if name and name != "_":
                    info.bindings.setdefault(here, {})[name] = (segs, line)
                info.refs.append((here, segs, line, "reexport" if public else "use", name))
            while j < n and toks[j][0] != ";":
                j += 1
            k = j + 1
        elif (IDENT.fullmatch(t) or t == "$crate") and k + 2 < n and toks[k + 1][0] == "::":
            if k > 0 and toks[k - 1][0] in ("::", "."):
                k += 1
                continue
            segs = [t]
            j = k + 1
            while j + 1 < n and toks[j][0] == "::" and (
                IDENT.fullmatch(toks[j + 1][0]) or toks[j + 1][0] == "$crate"
            ):
                segs.append(toks[j + 1][0])
                j += 2
            if len(segs) > 1 and t != "Self":
                info.refs.append((modpath(), segs, line, "path", None))
            info.code_idents.update(segs)
            k = j
        else:
            if IDENT.fullmatch(t) and not (k > 0 and toks[k - 1][0] == "mod"):
                info.code_idents.add(t)
            k += 1


# --------------------------------------------------------------------------------------
# Resolving paths to files.


class Crate:
    def __init__(self, name, src, files):
        self.name = name  # e.g. accelrt-alloc, accelrt-fuzz/bin/accelrt-fuzz
        self.src = src
        self.files = files  # rel path -> FileInfo
        self.file_of_mod = {f.modpath: f for f in files.values()}
        self.mods = set(self.file_of_mod)
        self.bindings = {}
        for f in files.values():
            self.mods |= f.inline_mods
            for m in f.inline_mods:
                self.file_of_mod.setdefault(m, f)
            for m, b in f.bindings.items():
                self.bindings.setdefault(m, {}).update(b)

    def absolute(self, here, segs, depth=0):
        """The absolute module path a path written in module `here` names, or None when it
        leaves the crate (an extern crate, std, a generic, a local item)."""
        first = segs[0]
        if first in ("crate", "$crate"):
            return tuple(segs[1:])
        if first == "self":
            return here + tuple(segs[1:])
        if first == "super":
            base = list(here)
            i = 0
            while i < len(segs) and segs[i] == "super":
                if not base:
                    return None
                base.pop()
                i += 1
            return tuple(base) + tuple(segs[i:])
        if first == "::":
            return None
        if here + (first,) in self.mods:
            return here + tuple(segs)
        bound = self.bindings.get(here, {}).get(first)
        if bound is not None and depth < 16 and bound[0][0] != first:
            target = self.absolute(here, bound[0], depth + 1)
            if target is None:
                return None
            return target + tuple(segs[1:])
        return None

    def file_for(self, path, depth=0):
        """The file that defines what absolute path `path` names: the deepest module that
        is a file, following re-exports of the next name."""
        i = len(path)
        while i > 0 and path[:i] not in self.mods:
            i -= 1
        mod = path[:i]
        if i < len(path) and depth < 16:
            bound = self.bindings.get(mod, {}).get(path[i])
            if bound is not None:
                target = self.absolute(mod, bound[0])
                if target is not None and target != path:
                    found = self.file_for(target + path[i + 1 :], depth + 1)
                    if found is not None:
                        return found
        return self.file_of_mod.get(mod)

    def edges(self):
        """{(from rel, to rel): first line} for every counted import."""
        out = {}
        for f in self.files.values():
            for here, segs, line, kind, name in f.refs:
                if kind == "reexport" and name not in f.code_idents:
                    continue  # a re-export only: who names the item through it is counted
                path = self.absolute(here, segs)
                if path is None:
                    continue
                if kind in ("use", "reexport") and path in self.mods:
                    continue  # a module named by `use`: the paths through it are counted
                g = self.file_for(path)
                if g is None or g is f:
                    continue
                if f.modpath[: len(g.modpath)] == g.modpath:
                    continue  # child -> ancestor: a module may use its ancestors' items
                out.setdefault((f.rel, g.rel), line)
        return out


def modpath_of(rel):
    parts = rel[:-3].split("/")  # drop ".rs"
    if parts[-1] in ("mod", "lib", "main") and (parts[-1] == "mod" or len(parts) == 1):
        parts = parts[:-1]
    return parts


def load_crates(root):
    crates = []
    base = os.path.join(root, "crates")
    for name in sorted(os.listdir(base)):
        src = os.path.join(base, name, "src")
        if not os.path.isdir(src):
            continue
        groups = {name: {}}  # crate name -> rel -> FileInfo
        for dirpath, _, names in os.walk(src):
            for fname in names:
                if not fname.endswith(".rs"):
                    continue
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, src).replace(os.sep, "/")
                if rel.startswith("bin/"):
                    # src/bin/NAME.rs or src/bin/NAME/main.rs: a crate root of its own.
                    parts = rel.split("/")[1:]
                    top = parts[0][:-3] if len(parts) == 1 else parts[0]
                    key = f"{name}/bin/{top}"
                    mp = [] if len(parts) == 1 else modpath_of("/".join(parts[1:]))
                else:
                    key = name
                    mp = modpath_of(rel)
                info = FileInfo(rel, mp)
                with open(full, encoding="utf-8") as fh:
                    parse_file(info, fh.read())
                groups.setdefault(key, {})[rel] = info
        for key, files in sorted(groups.items()):
            if files:
                crates.append(Crate(key, src, files))
    return crates


# --------------------------------------------------------------------------------------
# Cycles.


def find_cycles(nodes, edges):
    """One cycle (a list of nodes, first == last) per strongly connected component with
    more than one node (Tarjan, iterative)."""
    succ = {v: [] for v in nodes}
    for a, b in edges:
        succ[a].append(b)
    for v in succ:
        succ[v].sort()
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            recurse = False
            for j in range(i, len(succ[v])):
                w = succ[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    cycles = []
    for comp in comps:
        inside = set(comp)
        start = comp[0]
        # Shortest path from start back to itself inside the component (BFS).
        prev, frontier, done = {}, [start], None
        while frontier and done is None:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w not in inside:
                        continue
                    if w == start:
                        done = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if done is not None:
                    break
            frontier = nxt
        chain, v = [start], done
        while v != start:
            chain.append(v)
            v = prev[v]
        chain.append(start)
        cycles.append(list(reversed(chain)))
    return cycles


def check(root, verbose=False, out=sys.stdout):
    """Returns (cycles, files, edges); prints each cycle."""
    crates = load_crates(root)
    cycles_found, nfiles, nedges = [], 0, 0
    for crate in crates:
        edges = crate.edges()
        nfiles += len(crate.files)
        nedges += len(edges)
        if verbose:
            for (a, b), line in sorted(edges.items()):
                print(f"{crate.name}: {a}:{line} -> {b}", file=out)
        for cycle in find_cycles(list(crate.files), edges):
            shown = []
            for a, b in zip(cycle, cycle[1:]):
                shown.append(f"src/{a}:{edges[(a, b)]}")
            shown.append(f"src/{cycle[-1]}")
            print(f"circle in {crate.name}: " + " -> ".join(shown), file=out)
            cycles_found.append((crate.name, cycle))
    return cycles_found, len(crates), nfiles, nedges


# --------------------------------------------------------------------------------------
# Self-test.

SELF_TEST_TREE = {
    # A crate with a circle: a.rs -> b/c.rs (`crate::b::C2`, re-exported by b/mod.rs) -> a.rs.
    "crates/circle/src/lib.rs": "mod a;\nmod b;\npub use a::A;\n",
    "crates/circle/src/a.rs": (
        "// use crate::nowhere; a comment, not an import\n"
        'const S: &str = "crate::b::c";\n'
        "pub struct A;\n"
        "pub fn f() { let _ = crate::b::C2; }\n"
    ),
    "crates/circle/src/b/mod.rs": "mod c;\npub use c::C2;\npub use self::c::C;\n",
    "crates/circle/src/b/c.rs": (
        "use super::super::{a::{self, A}};\npub struct C;\npub struct C2;\n"
        "fn g() -> A { a::A }\n"
    ),
    # A crate without one: children use their ancestors (super::, crate::), parents their
    # children, siblings one way only; a parent's re-export of a sibling's item is not an
    # import of that sibling (who names the item through it is); inline test modules;
    # a circle hidden in comments, strings and a raw string.
    "crates/clean/src/lib.rs": "mod pool;\nmod size;\nmod stats;\npub use pool::Pool;\n",
    "crates/clean/src/size.rs": (
        "use crate::stats::Kind;\npub fn round() -> Kind { Kind }\n"
        "#[cfg(test)]\nmod tests { use super::*; use super::super::size::round; }\n"
    ),
    "crates/clean/src/stats.rs": (
        "/* use crate::size::round; /* nested */ crate::size::round() */\n"
        'const R: &str = r#"crate::size::round()"#;\nconst C: char = \'"\';\n'
        "pub struct Kind;\nfn f<'a>(x: &'a str) -> &'a str { x }\n"
    ),
    "crates/clean/src/pool/mod.rs": (
        "use crate::size;\nmod access;\nmod block;\npub use block::Block;\n"
        "pub(crate) use crate::stats::Kind;\n"
        "pub struct Pool;\nfn f() { access::read(); size::round(); }\n"
    ),
    "crates/clean/src/pool/access.rs": (
        "use super::{Block, Kind, Pool};\n"
        "impl Pool { fn x(&self) -> Block { crate::pool::Block } }\npub fn read() {}\n"
    ),
    "crates/clean/src/pool/block.rs": "use super::Pool;\npub struct Block;\n",
}

SELF_TEST_CLEAN_EDGES = [
    ("pool/access.rs", "pool/block.rs"),
    ("pool/access.rs", "stats.rs"),
    ("pool/mod.rs", "pool/access.rs"),
    ("pool/mod.rs", "size.rs"),
    ("size.rs", "stats.rs"),
]


def self_test():
    """Builds SELF_TEST_TREE in a temporary folder and checks what the checker finds."""
    import io

    with tempfile.TemporaryDirectory() as tmp:
        for rel, text in SELF_TEST_TREE.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        buf = io.StringIO()
        cycles, _, _, _ = check(tmp, out=buf)
        got = sorted((name, tuple(c)) for name, c in cycles)
        want = [("circle", ("a.rs", "b/c.rs", "a.rs"))]
        edges = {crate.name: sorted(crate.edges()) for crate in load_crates(tmp)}
        ok = True
        if got != want:
            print(f"self-test FAILED: cycles {got}, expected {want}\n{buf.getvalue()}")
            ok = False
        if edges.get("clean") != SELF_TEST_CLEAN_EDGES:
            print(f"self-test FAILED: edges {edges.get('clean')}, expected {SELF_TEST_CLEAN_EDGES}")
            ok = False
        if ok:
            print("self-test passed: the circle is found, and the clean tree's imports are exact")
        return 0 if ok else 1


def main(argv):
    args = argv[1:]
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    if "--self-test" in args:
        return self_test()
    verbose = "--verbose" in args
    rest = [a for a in args if not a.startswith("--")]
    root = rest[0] if rest else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    cycles, ncrates, nfiles, nedges = check(root, verbose=verbose)
    if cycles:
        print(f"{len(cycles)} circle(s) of imports between files (rule: scripts/check-layers.py)")
        return 1
    print(f"no circle of imports between files: {ncrates} crates, {nfiles} files, {nedges} imports")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
