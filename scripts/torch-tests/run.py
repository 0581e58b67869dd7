#!/usr/bin/env python3
"""Run PyTorch's own allocator tests against accelrt and against PyTorch's allocator.

    python3 scripts/torch-tests/run.py --tests .torch-tests --out OUT [--budget SECONDS]

The test files come from PyTorch's repository at the installed version's tag
(scripts/get-torch-tests.sh puts them in .torch-tests/; they are not part of this
repository). selection.txt says which files and which tests (keywords); every selected file
runs under pytest twice, in separate processes: on PyTorch's allocator, then on accelrt
(ACCELRT_TORCH=strict: the installed package's .pth hook makes accelrt PyTorch's allocator as
soon as torch is imported, and accelrt_plugin.py checks it is). Each run has a time budget;
results are written test by test, so a run cut short still counts what ran.

Writes OUT/torch-tests.md (counts per file and allocator, collection errors, every test that did
not pass on both allocators with its class and reason, and a closing summary table),
OUT/torch-tests.json, the raw per-test results and pytest logs. Because the test files may not
be the installed version's (see .torch-tests/SOURCE.txt), each test is classed by what it did
on both allocators: "pass on both"; "fails on both" (a test-file / version mismatch or the
machine, not accelrt); "fails only on accelrt (ours)", with accelrt's failure message;
"expected on accelrt" when expected-failures.txt explains such a failure; "passes only on
accelrt"; "skipped"; "not run on ..." (time budget). Exit status 1 when any test is ours.

    python3 scripts/torch-tests/run.py --tests .torch-tests --list

lists, without torch or a GPU, the test functions each selected file defines and whether the
selection's keywords pick them (read with `ast`; parametrized and device-type tests are
expanded by PyTorch at import, so the real ids carry suffixes); `--collect-only` runs pytest's
collection on both allocators instead of the tests (needs torch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_selection() -> list[tuple[str, list[str]]]:
    out = []
    for line in (HERE / "selection.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        file, _, words = line.partition("\t")
        out.append((file.strip(), words.split()))
    return out


def read_expected() -> list[tuple[str, str, str]]:
    out = []
    for line in (HERE / "expected-failures.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pattern, _, reason = line.partition("\t")
        kind, _, text = pattern.partition(":")
        if kind not in ("id", "message"):
            raise SystemExit(f"expected-failures.txt: {line!r}: KIND must be id or message")
        out.append((kind, text, reason.strip()))
    return out


def keyword_expr(words: list[str]) -> str | None:
    if words == ["*"] or not words:
        return None
    return " or ".join(words)


def run_pytest(tests: Path, file: str, words: list[str], allocator: str, out: Path, budget: float,
               collect_only: bool = False) -> dict:
    tag = f"{Path(file).stem}.{allocator}"
    results = out / f"{tag}.jsonl"
    log = out / f"{tag}.log"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(tests / file), "-p", "accelrt_plugin", "-q", "-rN",
           "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    expr = keyword_expr(words)
    if expr:
        cmd += ["-k", expr]
    if collect_only:
        cmd += ["--collect-only"]
    env = dict(os.environ)
    env.pop("ACCELRT_TORCH", None)
    env.pop("ACCELRT_TRACE", None)
    env["ACCELRT_TESTS_ALLOCATOR"] = allocator
    env["ACCELRT_TESTS_RESULTS"] = str(results)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(tests / "test"), str(tests), env.get("PYTHONPATH", "")]
    )
    if allocator == "accelrt":
        env["ACCELRT_TORCH"] = "strict"
    started = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}  (cwd {tests / 'test'}, allocator {allocator})\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=tests / "test", env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=budget)
            cut = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, cut = None, True
    per_test = {}
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            per_test[r["id"]] = r
    return {"file": file, "allocator": allocator, "rc": rc, "cut_by_budget": cut,
            "seconds": round(time.monotonic() - started, 1), "tests": per_test, "log": str(log)}


def counts(run: dict) -> dict:
    c = {"passed": 0, "failed": 0, "skipped": 0, "xfail": 0, "xpass": 0}
    for r in run["tests"].values():
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


def explain(test_id: str, message: str, expected) -> str | None:
    for kind, text, reason in expected:
        if (kind == "id" and text in test_id) or (kind == "message" and text in message):
            return reason
    return None


def list_tests(tests: Path) -> int:
    """Print each selected file's test functions (by class) and whether the keywords select them."""
    import ast

    total = chosen = 0
    for file, words in read_selection():
        path = tests / file
        if not path.exists():
            print(f"{file}: MISSING from {tests}")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                        found.append(f"{node.name}::{item.name}")
        keys = [w.lower() for w in words]
        sel = [t for t in found if keys == ["*"] or not keys or any(k in t.lower() for k in keys)]
        total += len(found)
        chosen += len(sel)
        print(f"{file}: {len(found)} test functions, {len(sel)} selected")
        for t in sel:
            print(f"  {t}")
    print(f"in all: {chosen} of {total} test functions selected (before parametrization)")
    return 0 if chosen else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tests", type=Path, default=Path(".torch-tests"))
    p.add_argument("--out", type=Path)
    p.add_argument("--budget", type=float, default=120, help="seconds per file and allocator")
    p.add_argument("--allocators", default="native,accelrt")
    p.add_argument("--native-budget", type=float, default=None,
                   help="seconds per file on PyTorch's allocator (default: --budget)")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier --out folder: PyTorch's-allocator results found there fill in "
                        "the tests this call did not run on native (same machine and test files)")
    p.add_argument("--jobs", type=int, default=1,
                   help="test files run at once per allocator (each gets the full --budget)")
    p.add_argument("--list", action="store_true", help="list the selected tests (no torch needed)")
    p.add_argument("--collect-only", action="store_true", help="pytest --collect-only on both allocators")
    a = p.parse_args()
    if a.list:
        return list_tests(a.tests.resolve())
    if a.out is None:
        p.error("--out is required (except with --list)")
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    tests = a.tests.resolve()
    report = a.out / "torch-tests.md"
    if not (tests / "test").is_dir():
        msg = (f"no PyTorch test files in {tests}: run scripts/get-torch-tests.sh where "
               "PyTorch's repository is reachable and carry .torch-tests/")
        report.write_text(f"# PyTorch's allocator tests\n\nNOT RUN: {msg}\n")
        print(f"torch-tests: NOT RUN: {msg}")
        return 2
    source = (tests / "SOURCE.txt").read_text().strip() if (tests / "SOURCE.txt").exists() else "unknown"
    expected = read_expected()
    runs = []
    selection = [(f, w) for f, w in read_selection()]
    for file, _ in selection:
        if not (tests / file).exists():
            runs.append({"file": file, "missing": True})
    present = [(f, w) for f, w in selection if (tests / f).exists()]
    # One allocator at a time (two processes of one test file could take the same large share
    # of the GPU); with --jobs N, up to N files of that allocator at once.
    from concurrent.futures import ThreadPoolExecutor

    for allocator in a.allocators.split(","):
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            done = list(pool.map(
                lambda fw: run_pytest(tests, fw[0], fw[1], allocator, a.out,
                                      a.native_budget if allocator == "native" and a.native_budget else a.budget,
                                      a.collect_only),
                present))
        for r in done:
            runs.append(r)
            print(f"torch-tests: {r['file']} on {allocator}: {counts(r)}"
                  f"{' (cut by the time budget)' if r['cut_by_budget'] else ''} in {r['seconds']} s",
                  flush=True)
    reused_note = reuse_results(a.reuse, present, runs) if a.reuse else None
    if a.collect_only:
        return report_collection(runs, source, report)
    lines = ["# PyTorch's allocator tests on accelrt", "", f"Test files: {source}", ""]
    if reused_note:
        lines += [reused_note, ""]
    lines += [
             "| file | allocator | passed | failed | skipped | pytest exit | cut by budget | seconds | collection |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {"source": source, "files": []}
    for r in runs:
        if r.get("missing"):
            lines.append(f"| {r['file']} | - | missing from .torch-tests | | | | | | |")
            continue
        c = counts(r)
        coll = collection_error(r)
        lines.append(f"| {r['file']} | {r['allocator']} | {c['passed']} | {c['failed']} | "
                     f"{c['skipped']} | {r['rc']} | {'yes' if r['cut_by_budget'] else 'no'} | {r['seconds']} | "
                     f"{cell(coll) if coll else 'ok'} |")
    by_file: dict[str, dict] = {}
    for r in runs:
        if not r.get("missing"):
            by_file.setdefault(r["file"], {})[r["allocator"]] = r
    classes = {k: 0 for k in CLASSES}
    rows = []
    uncollected: list[str] = []
    for file, pair in by_file.items():
        acc, nat = pair.get("accelrt"), pair.get("native")
        if acc is None:
            continue
        file_sum = {"file": file, "accelrt": counts(acc), "native": counts(nat) if nat else None,
                    "collection_error": {"accelrt": collection_error(acc),
                                         "native": collection_error(nat) if nat else None},
                    "tests": []}
        ids = sorted(set(acc["tests"]) | set(nat["tests"] if nat else {}))
        for tid in ids:
            ta = acc["tests"].get(tid)
            tn = nat["tests"].get(tid) if nat else None
            cls, reason = classify(ta, tn, expected, acc, nat)
            classes[cls] += 1
            file_sum["tests"].append({"id": tid, "accelrt": ta["outcome"] if ta else "not run",
                                      "native": tn["outcome"] if tn else "not run",
                                      "class": cls, "reason": reason})
            if cls not in ("pass on both", "skipped"):
                rows.append(f"| `{tid}` | {ta['outcome'] if ta else 'not run'} | "
                            f"{tn['outcome'] if tn else 'not run'} | {cls} | {cell(reason)} |")
        if file_sum["collection_error"]["accelrt"] or file_sum["collection_error"]["native"]:
            uncollected.append(file)
        summary["files"].append(file_sum)
    lines += ["", "## Every test that did not pass on both", "",
              "Classes: *fails on both* = the test fails on PyTorch's own allocator too, with the same "
              "first line (a test-file / installed-version mismatch or the machine, not accelrt); "
              "*fails on both, differently* = it fails on both but not the same way (both first lines "
              "shown: read them, the accelrt one may be accelrt's); *fails only on accelrt (ours)* = "
              "accelrt's to fix; *expected on accelrt* = fails only on accelrt for a reason "
              "expected-failures.txt documents (native internals, a refused feature); *passes only on "
              "accelrt*; *not run on ...* = cut by the time budget or the process died.", "",
              "| test | on accelrt | on native | class | reason (accelrt's failure, else native's) |",
              "|---|---|---|---|---|"]
    lines += rows or ["| (none) | | | | |"]
    ours = classes["fails only on accelrt (ours)"]
    ran_acc = sum(v for k, v in classes.items() if k not in ("skipped", "not run on accelrt"))
    passed_acc = classes["pass on both"] + classes["passes only on accelrt"]
    rate = 100.0 * passed_acc / ran_acc if ran_acc else 0.0
    # The test files are not always the installed version's (SOURCE.txt): a test that fails on
    # PyTorch's own allocator tests the file's version, not the allocator. Among the tests that
    # pass on PyTorch's allocator, the share that passes on accelrt too (expected failures
    # count as failures here).
    native_ok = classes["pass on both"] + classes["fails only on accelrt (ours)"] + classes["expected on accelrt"]
    rate_native_ok = 100.0 * classes["pass on both"] / native_ok if native_ok else 0.0
    summary["classes"] = classes
    summary["pass_rate_percent"] = round(rate, 1)
    summary["pass_rate_of_native_passes_percent"] = round(rate_native_ok, 1)
    lines += ["", "## Summary", "", "| class | tests |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in classes.items()]
    lines += [f"| pass rate on accelrt (passed / ran there) | {rate:.1f}% |",
              f"| of the tests that pass on PyTorch's allocator, pass on accelrt too | "
              f"{classes['pass on both']} / {native_ok} = {rate_native_ok:.1f}% |",
              f"| files that did not collect (see the first table) | {len(uncollected)}"
              f"{': ' + ', '.join(uncollected) if uncollected else ''} |"]
    summary["uncollected_files"] = uncollected
    report.write_text("\n".join(lines) + "\n")
    (a.out / "torch-tests.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines[-(len(classes) + 6):]))
    return 0 if ours == 0 else 1


CLASSES = ("pass on both", "fails on both", "fails on both, differently", "fails only on accelrt (ours)", "expected on accelrt",
           "passes only on accelrt", "skipped", "not run on accelrt", "not run on native")


def ok(t) -> bool:
    return t is not None and t["outcome"] in ("passed", "xfail")


def bad(t) -> bool:
    return t is not None and t["outcome"] in ("failed", "xpass")


def classify(a, n, expected, acc_run, nat_run) -> tuple[str, str]:
    """One test's class from its outcome on accelrt (a) and on PyTorch's allocator (n)."""
    if a is None:
        why = "cut by the time budget" if acc_run["cut_by_budget"] else "not reached (process died?)"
        return "not run on accelrt", why
    if a["outcome"] == "skipped" or (n is not None and n["outcome"] == "skipped" and not bad(a)):
        return "skipped", a.get("reason", "") or (n or {}).get("reason", "")
    if ok(a):
        if ok(n):
            return "pass on both", ""
        if n is None:
            return "not run on native", "passed on accelrt"
        return "passes only on accelrt", n.get("reason", "")
    reason = a.get("reason", "")
    if bad(n):
        mine, theirs = first_line(reason), first_line(n.get("reason", ""))
        if mine != theirs:
            return "fails on both, differently", f"accelrt: {mine} / native: {theirs}"
        return "fails on both", reason
    if n is None:
        return "not run on native", reason
    why = explain(a["id"], reason, expected)
    if why is not None:
        return "expected on accelrt", why
    return "fails only on accelrt (ours)", reason


def reuse_results(folder: Path, present: list, runs: list) -> str | None:
    """Fill in native results from an earlier call's folder: per test, this call's result wins.
    PyTorch's allocator does not change with accelrt's build, so its outcomes from an earlier
    call on the same machine with the same test files stand."""
    taken = 0
    for file, _ in present:
        old = folder / f"{Path(file).stem}.native.jsonl"
        if not old.exists():
            continue
        prior = {}
        for line in old.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            prior[r["id"]] = r
        fresh = next((r for r in runs if r.get("file") == file and r.get("allocator") == "native"), None)
        if fresh is None:
            fresh = {"file": file, "allocator": "native", "rc": None, "cut_by_budget": False,
                     "seconds": 0.0, "tests": {}, "log": str(old.with_suffix(".log"))}
            runs.append(fresh)
        for tid, r in prior.items():
            if tid not in fresh["tests"]:
                fresh["tests"][tid] = r
                taken += 1
    if not taken:
        return None
    return (f"PyTorch's-allocator results: {taken} test(s) taken from an earlier call ({folder}), "
            "the rest from this one (PyTorch's allocator does not change with accelrt's build).")


def first_line(reason: str) -> str:
    """A failure's first line, without the numbers that differ between runs (addresses, sizes)."""
    import re

    line = next((l.strip() for l in reason.splitlines() if l.strip()), "")
    return re.sub(r"\b0x[0-9a-f]+\b|\b\d+(\.\d+)?\b", "N", line)[:200]


def collection_error(run) -> str | None:
    """The first collection error of a run, read from its pytest log (an import error in the
    test file itself fails every test of the file on both allocators)."""
    try:
        text = Path(run["log"]).read_text(errors="replace")
    except OSError:
        return None
    if "ERROR collecting" not in text and not (run["rc"] in (2, 4) and not run["tests"]):
        return None
    for line in text.splitlines():
        if line.startswith("E ") and ("Error" in line or "error" in line):
            return line[2:].strip()
    return f"pytest exit {run['rc']} before any test ran"


def report_collection(runs: list, source: str, report: Path) -> int:
    """--collect-only: per file and allocator, what pytest collected (its summary line) and the
    first collection error."""
    import re

    lines = ["# PyTorch's allocator tests: collection only", "", f"Test files: {source}", "",
             "| file | allocator | pytest says | first collection error |", "|---|---|---|---|"]
    bad = 0
    for r in runs:
        if r.get("missing"):
            lines.append(f"| {r['file']} | - | missing from .torch-tests | |")
            bad += 1
            continue
        text = Path(r["log"]).read_text(errors="replace")
        said = [m.group(0) for m in re.finditer(r"\d+(/\d+)? tests? collected[^\n]*|no tests ran[^\n]*", text)]
        err = collection_error(r)
        bad += err is not None
        lines.append(f"| {r['file']} | {r['allocator']} | {cell(said[-1] if said else 'nothing')} | "
                     f"{cell(err or '')} |")
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if bad else 0


def cell(text: str) -> str:
    return " ".join((text or "").split())[:300].replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
