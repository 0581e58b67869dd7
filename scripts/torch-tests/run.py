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

Writes OUT/torch-tests.md (counts per file and allocator, and every accelrt failure with its
reason and what the same test did on PyTorch's allocator), OUT/torch-tests.json, the raw
per-test results and pytest logs. A failure is "expected" when expected-failures.txt
explains it, "also on native" when the test fails on PyTorch's allocator too, else "fail".
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


def run_pytest(tests: Path, file: str, words: list[str], allocator: str, out: Path, budget: float) -> dict:
    tag = f"{Path(file).stem}.{allocator}"
    results = out / f"{tag}.jsonl"
    log = out / f"{tag}.log"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(tests / file), "-p", "accelrt_plugin", "-q", "-rN",
           "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    expr = keyword_expr(words)
    if expr:
        cmd += ["-k", expr]
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tests", type=Path, default=Path(".torch-tests"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=120, help="seconds per file and allocator")
    p.add_argument("--allocators", default="native,accelrt")
    a = p.parse_args()
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
    for file, words in read_selection():
        if not (tests / file).exists():
            runs.append({"file": file, "missing": True})
            continue
        for allocator in a.allocators.split(","):
            r = run_pytest(tests, file, words, allocator, a.out, a.budget)
            runs.append(r)
            print(f"torch-tests: {file} on {allocator}: {counts(r)}"
                  f"{' (cut by the time budget)' if r['cut_by_budget'] else ''} in {r['seconds']} s",
                  flush=True)

    lines = ["# PyTorch's allocator tests on accelrt", "", f"Test files: {source}", "",
             "| file | allocator | passed | failed | skipped | pytest exit | cut by budget | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {"source": source, "files": []}
    for r in runs:
        if r.get("missing"):
            lines.append(f"| {r['file']} | - | missing from .torch-tests | | | | | |")
            continue
        c = counts(r)
        lines.append(f"| {r['file']} | {r['allocator']} | {c['passed']} | {c['failed']} | "
                     f"{c['skipped']} | {r['rc']} | {'yes' if r['cut_by_budget'] else 'no'} | {r['seconds']} |")
    lines += ["", "## Every test that did not pass on accelrt", "",
              "| test | on accelrt | on native | class | reason |", "|---|---|---|---|---|"]
    totals = {"passed": 0, "failed": 0, "expected": 0, "also_native": 0, "skipped": 0}
    by_file: dict[str, dict] = {}
    for r in runs:
        if not r.get("missing"):
            by_file.setdefault(r["file"], {})[r["allocator"]] = r
    for file, pair in by_file.items():
        acc, nat = pair.get("accelrt"), pair.get("native")
        if acc is None:
            continue
        file_sum = {"file": file, "accelrt": counts(acc), "native": counts(nat) if nat else None,
                    "failures": []}
        for tid, t in sorted(acc["tests"].items()):
            outcome = t["outcome"]
            if outcome in ("passed", "xfail"):
                totals["passed"] += 1
                continue
            if outcome == "skipped":
                totals["skipped"] += 1
                continue
            native = nat["tests"].get(tid, {}).get("outcome", "not run") if nat else "not run"
            reason = explain(tid, t.get("reason", ""), expected)
            if reason is not None:
                cls = "expected"
            elif native not in ("passed", "xfail"):
                cls, reason = "also on native", t.get("reason", "")
            else:
                cls, reason = "fail", t.get("reason", "")
            totals[{"expected": "expected", "also on native": "also_native", "fail": "failed"}[cls]] += 1
            first = " ".join(reason.split())[:300].replace("|", "\\|")
            lines.append(f"| `{tid}` | {outcome} | {native} | {cls} | {first} |")
            file_sum["failures"].append({"id": tid, "accelrt": outcome, "native": native,
                                         "class": cls, "reason": reason})
        summary["files"].append(file_sum)
    ran = totals["passed"] + totals["failed"] + totals["expected"] + totals["also_native"]
    rate = 100.0 * totals["passed"] / ran if ran else 0.0
    summary["totals"] = totals
    summary["pass_rate_percent"] = round(rate, 1)
    lines += ["", f"Totals on accelrt: {totals['passed']} passed, {totals['failed']} failed, "
              f"{totals['expected']} expected failures, {totals['also_native']} failing on native "
              f"too, {totals['skipped']} skipped: {rate:.1f}% of the tests that ran pass."]
    report.write_text("\n".join(lines) + "\n")
    (a.out / "torch-tests.json").write_text(json.dumps(summary, indent=1))
    print(lines[-1])
    return 0 if totals["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
