#!/usr/bin/env bash
# Put PyTorch's own test files that scripts/torch-tests/run.py runs into .torch-tests/ (not
# part of this repository: .torch-tests/ is git-ignored through .git/info/exclude), at the
# tag of a PyTorch version (default v2.11.0, what the GPU machine has):
#
#     scripts/get-torch-tests.sh [--tag v2.11.0] [--git-dir DIR | --from DIR]
#
# Sources, first that works:
#   --from DIR      a folder holding test/test_cuda.py, test/inductor/test_cudagraph_trees.py
#                   (e.g. a PyTorch checkout at the tag); copied as they are
#   --git-dir DIR   a PyTorch git directory (a clone, or the search tool's fetched mirror):
#                   `git show TAG:PATH`
#   otherwise       https://raw.githubusercontent.com/pytorch/pytorch/TAG/PATH
#   --from-index    no command can do it: prints how the files were taken from the search tool's
#                   file index (where neither GitHub nor a mirror is reachable), then checks the
#                   files already in .torch-tests/ (compile, sizes, sha256 against SOURCE.txt)
# .torch-tests/SOURCE.txt records where the files came from; the runner prints it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG=v2.11.0
FROM_INDEX=
FROM=
GIT_DIR_SRC=
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG=$2; shift 2 ;;
        --from) FROM=$2; shift 2 ;;
        --git-dir) GIT_DIR_SRC=$2; shift 2 ;;
        --from-index) FROM_INDEX=1; shift ;;
        *) echo "usage: $0 [--tag TAG] [--git-dir DIR | --from DIR | --from-index]" >&2; exit 2 ;;
    esac
done

if [ -n "$FROM_INDEX" ]; then
    cat <<'HOW'
How .torch-tests/ was filled from the search tool's file index (2026-11-30, no network to GitHub,
`fetch github:pytorch/pytorch` refused as too large):
  1. find_files(repo="pytorch/pytorch", path=FILE) names a stored version; read_file without a
     commit returns one of several stored versions, so pick one (its commit, or its file id from
     find_string) and read every page of that one: read_file(..., commit=C, offset=0, 16000, ...)
     until next_offset is absent.
  2. Write each page to a part file as the tool returned it (JSON-decoded), check each part is
     exactly 16,000 characters (the last one: total_chars mod 16,000), concatenate in order, and
     check the total against total_chars and `python3 -m py_compile`.
  3. Record repository, commit (or file id), characters and sha256 per file in SOURCE.txt, and
     say whether it is the installed version's tag (it was not: see SOURCE.txt).
  4. test/inductor/__init__.py is an empty package marker.
Checking the files now in .torch-tests/:
HOW
    [ -f .torch-tests/SOURCE.txt ] || { echo "no .torch-tests/SOURCE.txt" >&2; exit 1; }
    status=0
    for f in test/test_cuda.py test/inductor/test_cudagraph_trees.py; do
        path=.torch-tests/$f
        if [ ! -f "$path" ]; then echo "  $f: MISSING"; status=1; continue; fi
        sum=$(sha256sum "$path" | cut -d' ' -f1)
        chars=$(python3 -c 'import sys; print(len(open(sys.argv[1], encoding="utf-8").read()))' "$path")
        if python3 -c 'import ast, sys; ast.parse(open(sys.argv[1], encoding="utf-8").read())' "$path"; then parse=parses; else parse="DOES NOT PARSE"; status=1; fi
        if grep -q "$sum" .torch-tests/SOURCE.txt; then match="sha256 as recorded"; else match="sha256 NOT as recorded in SOURCE.txt"; status=1; fi
        echo "  $f: $chars characters, $parse, $match"
    done
    exit $status
fi

# The files the selection needs (scripts/torch-tests/selection.txt), and the helpers in
# test/ they import.
FILES=(
    test/test_cuda.py
    test/inductor/test_cudagraph_trees.py
    test/inductor/__init__.py
)
DEST=.torch-tests
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
source_note=
for f in "${FILES[@]}"; do
    mkdir -p "$DEST.tmp/$(dirname "$f")"
    if [ -n "$FROM" ]; then
        if [ -f "$FROM/$f" ]; then cp "$FROM/$f" "$DEST.tmp/$f"; else : > "$DEST.tmp/$f.missing"; fi
        source_note="copied from $FROM (said to be PyTorch $TAG)"
    elif [ -n "$GIT_DIR_SRC" ]; then
        if git --git-dir="$GIT_DIR_SRC" rev-parse -q --verify "$TAG^{commit}" >/dev/null; then
            git --git-dir="$GIT_DIR_SRC" show "$TAG:$f" > "$DEST.tmp/$f" 2>/dev/null || : > "$DEST.tmp/$f.missing"
            source_note="git show $TAG ($(git --git-dir="$GIT_DIR_SRC" rev-parse "$TAG^{commit}")) from $GIT_DIR_SRC"
        else
            echo "$GIT_DIR_SRC has no $TAG: pass --tag with a tag or commit it has" >&2
            exit 1
        fi
    else
        url="https://raw.githubusercontent.com/pytorch/pytorch/$TAG/$f"
        if ! curl -fsSL --max-time 60 "$url" -o "$DEST.tmp/$f"; then
            rm -f "$DEST.tmp/$f"
            if [ "$f" = test/inductor/__init__.py ]; then
                : > "$DEST.tmp/$f"  # an empty package marker is enough
                continue
            fi
            echo "cannot download $url (no network to GitHub here?): use --git-dir with a PyTorch clone or --from with a folder of the files" >&2
            rm -rf "$DEST.tmp"
            exit 1
        fi
        source_note="downloaded from raw.githubusercontent.com at $TAG"
    fi
done
[ -f "$DEST.tmp/test/inductor/__init__.py" ] || : > "$DEST.tmp/test/inductor/__init__.py"
rm -f "$DEST.tmp"/test/inductor/__init__.py.missing
missing=$(find "$DEST.tmp" -name '*.missing' | sed "s|^$DEST.tmp/||; s|\.missing$||")
if [ -n "$missing" ]; then
    echo "missing from the source: $missing" >&2
    rm -rf "$DEST.tmp"
    exit 1
fi
echo "PyTorch $TAG test files, $source_note, $(date -u +%F)" > "$DEST.tmp/SOURCE.txt"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
if [ -d .git ] || [ -f .git ]; then
    exclude=$(git rev-parse --git-common-dir)/info/exclude
    grep -qxF '/.torch-tests/' "$exclude" 2>/dev/null || echo "note: add /.torch-tests/ to $exclude so the files are never committed" >&2
fi
cat "$DEST/SOURCE.txt"
find "$DEST" -type f | sort
