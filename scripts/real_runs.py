"""Real runs on the GPU machine: the same PyTorch work under PyTorch's native allocator,
PyTorch's expandable_segments:True and accelrt, one process per run, interleaved.

usage:
  real_runs.py one WORKLOAD CONFIG [--steps N] [--record PATH]   one run; prints one JSON line
  real_runs.py matrix OUTDIR [--reps 3] [--workloads a,b] [--configs a,b] [--variant NAME=LIB]
                                                                    the timing/memory matrix
  real_runs.py record OUTDIR [--parallel 1] [--workloads a,b] [--configs a,b]
                                                                    recordings for `accelrt replay`
  real_runs.py table OUTDIR                                         the summary tables again (every
                                                                    run's figures; issue 10's targets)
  real_runs.py self-test                                            the targets table on made-up runs

CONFIG: native | expandable | accelrt. A run reports peak reserved and peak allocated
(`torch.cuda.max_memory_*`, answered by accelrt when it is the allocator), the first step's
time and the sum of the steady-state steps (every step after the first two), each step ended
by a device synchronize (as `loss.item()` does in a training loop), every step's time
(`step_ms`) and its CPU time up to that synchronize (`issue_ms`, summed over the steady state
in `steady_issue_sum_ms`: a step whose issue time is near its whole time keeps the CPU busy or
waits inside, so every microsecond the allocator spends shows in it), for accelrt its driver
calls, those of the steady state (`steady_driver_calls`) and the time the steady state's
virtual-memory calls took (`steady_vm_call_ms`), and after every step (outside its time) where
reserved memory stood and, for accelrt, its moves, creations and driver calls so far
(`per_step`). `record` writes v2 traces: accelrt's own recorder (`accelrt_torch.record_trace`,
with completion markers) and, for PyTorch's allocators, a memory-history snapshot converted by
`accelrt trace convert` with the run's real peaks in the header.

Environment: ACCELRT_TORCH_LIB (libaccelrt_torch.so), ACCELRT_BIN (the accelrt CLI, for
`record`), PYTHONPATH with this repository's python/ folder.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = ["native", "expandable", "accelrt"]
# Other builds of libaccelrt_torch.so to run beside the default one (`matrix --variant
# NAME=PATH`): each is the configuration `accelrt@NAME`, interleaved with the others.
VARIANTS = {}
# Other allocator configurations of the default build (`matrix --variant-conf NAME=CONF`,
# ACCELRT_ALLOC_CONF syntax): each is the configuration `accelrt@NAME`. With a NAME that
# `--variant` gave, that build runs under CONF.
VARIANT_CONFS = {}
# `matrix --breakdown`: accelrt's runs record where reserved memory lay at each new peak
# (`accelrt_torch.record_peak_breakdown`; each new peak then costs a walk over the blocks,
# so the runs' times are not the plain ones) and the table adds where the overhead was.
BREAKDOWN = False
# The peak breakdown's parts besides allocated memory, as `peak_breakdown()` names them.
BREAKDOWN_PARTS = ["free_in_shared_pages", "free_in_used_chunks", "idle_chunks", "spare_chunks",
                   "free_in_segments", "other"]
# The issue-10 matrix: the three traced workloads and two dynamic-shape trainings.
MATRIX = ["gpt2_train", "resnet50_train", "gpt2_infer_varlen", "llama_varlen_train", "vit_varbatch_train"]
# Recorded for the replay's validation: the matrix plus dynamic inference and two streams.
RECORDED = MATRIX + ["gpt2_generate", "resnet50_varres", "bert_varlen", "twostream_train"]


# ---- workloads: each yields once set up, then once per step ------------------------------


def steps_of(work, n, rng):
    import torch

    dev = "cuda"
    if work == "gpt2_train":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        yield  # set up: the steps start here
        for _ in range(n):
            x = torch.randint(0, 50257, (8, 1024), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            yield
    elif work == "resnet50_train":
        import torchvision

        model = torchvision.models.resnet50().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        yield  # set up: the steps start here
        for _ in range(n):
            x = torch.randn(64, 3, 224, 224, device=dev)
            y = torch.randint(0, 1000, (64,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            yield
    elif work == "gpt2_infer_varlen":
        from transformers import GPT2Config, GPT2Model

        model = GPT2Model(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)).to(dev).eval().half()
        yield  # set up: the steps start here
        with torch.no_grad():
            for _ in range(n):
                b, s = rng.choice([1, 2, 4, 8, 16]), rng.randint(8, 1024)
                model(input_ids=torch.randint(0, 50257, (b, s), device=dev))
                yield
    elif work == "llama_varlen_train":
        # A Llama-style decoder (~110M parameters) trained on sequence lengths drawn from
        # 128..1024: activations change size every step.
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                          num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)
        model = LlamaForCausalLM(cfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        yield  # set up: the steps start here
        for _ in range(n):
            s = rng.choice([128, 256, 384, 512, 640, 768, 896, 1024])
            x = torch.randint(0, 32000, (8, s), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            yield
    elif work == "vit_varbatch_train":
        # ViT-B/16 with AMP, batch size drawn from 16..48 every step.
        import torchvision

        model = torchvision.models.vit_b_16().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        yield  # set up: the steps start here
        for _ in range(n):
            b = rng.choice([16, 24, 32, 40, 48])
            x = torch.randn(b, 3, 224, 224, device=dev)
            y = torch.randint(0, 1000, (b,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            yield
    elif work == "twostream_train":
        # Inputs made on a side stream and consumed on the main one (`record_stream`), as data
        # loaders that prefetch to the GPU do; an MLP trained on batches of varying size.
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        model = torch.nn.Sequential(
            torch.nn.Linear(2048, 8192), torch.nn.GELU(), torch.nn.Linear(8192, 8192), torch.nn.GELU(),
            torch.nn.Linear(8192, 1000)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        yield  # set up: the steps start here
        for _ in range(n):
            b = rng.choice([512, 1024, 2048, 4096])
            with torch.cuda.stream(side):
                x = torch.randn(b, 2048, device=dev)
                y = torch.randint(0, 1000, (b,), device=dev)
            main.wait_stream(side)
            x.record_stream(main)
            y.record_stream(main)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del x, y
            yield
    elif work in ("gpt2_generate", "resnet50_varres", "bert_varlen"):
        sys.path.insert(0, str(HERE))
        from record_trace import run

        yield  # set up inside run(): one step
        run(work, rng)
        yield
    else:
        raise SystemExit(f"unknown workload {work!r}: one of {RECORDED}")


DEFAULT_STEPS = {"gpt2_infer_varlen": 80, "gpt2_generate": 1, "resnet50_varres": 1, "bert_varlen": 1}


# ---- one run ------------------------------------------------------------------------------


def driver_calls(stats):
    return {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("driver_calls.")}


def one(work, config, steps, record, emit=None):
    if config == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    import torch

    at = None
    if config == "accelrt" or config.startswith("accelrt@"):
        import accelrt_torch as at

        name = config.partition("@")[2]
        if name in VARIANT_CONFS:
            os.environ["ACCELRT_ALLOC_CONF"] = VARIANT_CONFS[name]
        at.enable(VARIANTS.get(name))
        if BREAKDOWN:
            at.record_peak_breakdown(True)
        if record:
            at.record_trace(record, workload=work)
    elif record:
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=20_000_000)
    torch.manual_seed(0)
    rng = random.Random(0)
    times = []
    steps = steps_of(work, steps, rng)
    next(steps)  # imports, the model, the optimizer: not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steady_from = None  # accelrt's driver calls when the steady state began (after two steps)
    per_step = []  # after each step: where reserved memory stood, and accelrt's moves so far
    issue = []  # each step's CPU time up to its synchronize: how long queueing its work took
    for _ in steps:
        issue.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        after = {"peak_reserved": torch.cuda.max_memory_reserved(),
                 "reserved": torch.cuda.memory_reserved(),
                 "peak_allocated": torch.cuda.max_memory_allocated()}
        if at is not None:
            st = at.memory_stats()
            after.update({"moves": st.get("num_page_steals"), "pages_moved": st.get("num_pages_remapped"),
                          "deferred": st.get("num_moves_deferred"),
                          "exempt": st.get("num_moves_exempt"),
                          "creates": st.get("driver_calls.create"), "calls": st.get("driver_calls.total"),
                          "vm_ms": round(st.get("vm_call_us", 0) / 1e3, 3)})
            if len(times) == 2:
                steady_from = driver_calls(st)
                steady_from["vm_call_us"] = st.get("vm_call_us", 0)
        per_step.append(after)
        t1 = time.perf_counter()  # the stats calls are no step's time
        t0 = t1
    out = {
        "workload": work,
        "config": config,
        "steps": len(times),
        "first_step_ms": times[0],
        "steady_sum_ms": sum(times[2:]) if len(times) > 2 else None,
        "step_ms": [round(t, 3) for t in times],
        "issue_ms": [round(t, 3) for t in issue],
        "steady_issue_sum_ms": sum(issue[2:]) if len(issue) > 2 else None,
        "per_step": per_step,
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
    }
    if at is not None:
        stats = at.memory_stats()
        out["driver_calls"] = driver_calls(stats)
        out["vm_call_us"] = stats.get("vm_call_us")
        if steady_from is not None:
            # The steady state's own calls, and the time they took: what its step times pay for.
            out["steady_driver_calls"] = {k: v - steady_from.get(k, 0) for k, v in out["driver_calls"].items()}
            if out["vm_call_us"] is not None:
                out["steady_vm_call_ms"] = (out["vm_call_us"] - steady_from["vm_call_us"]) / 1e3
        out["moves"] = {k: stats.get(k) for k in ("num_page_steals", "num_pages_remapped", "num_moves_deferred", "num_moves_exempt", "move_time_drawn_peak_us")}
        if BREAKDOWN:
            out["peak_breakdown"] = at.peak_breakdown()
        if record:
            at.stop_trace()
    else:
        stats = torch.cuda.memory_stats()
        out["num_device_alloc"] = stats.get("num_device_alloc")
        if record:
            snap = record + ".snapshot.pickle"
            torch.cuda.memory._dump_snapshot(snap)
            out["snapshot"] = snap
    if emit is not None:
        emit(out)
    else:
        print("RESULT " + json.dumps(out), flush=True)


# ---- the matrix -----------------------------------------------------------------------------


def launch(work, config, steps, record=None, timeout=600):
    cmd = [sys.executable, str(Path(__file__)), "one", work, config, "--steps", str(steps)]
    if record:
        cmd += ["--record", record]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"workload": work, "config": config, "error": (p.stderr or p.stdout)[-2000:]}


def preload():
    """Import what the workloads need once, in the parent, without touching CUDA: each run is
    a child forked from here (its own process, its own CUDA context and allocator), which
    saves every run the seconds these imports take."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM  # noqa: F401
    import accelrt_torch  # noqa: F401  (loads the library; CUDA stays untouched)
    assert not torch.cuda.is_initialized(), "the parent must not initialise CUDA before forking"


def forked(work, config, steps, timeout=300):
    """One run in a child process forked from the preloaded parent."""
    import signal
    import traceback

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one run, its result down the pipe
        os.close(rfd)
        try:
            one(work, config, steps, None, emit=lambda d: os.write(wfd, json.dumps(d).encode()))
        except BaseException:
            os.write(wfd, json.dumps({"workload": work, "config": config,
                                      "error": traceback.format_exc()[-2000:]}).encode())
        os._exit(0)
    os.close(wfd)
    deadline = time.time() + timeout
    chunks = []
    os.set_blocking(rfd, False)
    while True:
        try:
            b = os.read(rfd, 65536)
            if b:
                chunks.append(b)
            else:
                break
        except BlockingIOError:
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    os.close(rfd)
    os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"workload": work, "config": config, "error": "no result (timeout or crash)"}


def matrix(outdir, reps, works, steps, configs):
    outdir.mkdir(parents=True, exist_ok=True)
    preload()
    log = open(outdir / "matrix.jsonl", "a")
    n = len(configs)
    for rep in range(reps):
        for i, work in enumerate(works):
            # Rotate the order of the configurations from one repetition to the next.
            order = configs[(rep + i) % n:] + configs[:(rep + i) % n]
            for config in order:
                r = forked(work, config, steps or DEFAULT_STEPS.get(work, 12))
                r["rep"] = rep
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(json.dumps(r)[:300], flush=True)
    log.close()
    table(outdir)


def spread(xs, fmt):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def table(outdir):
    rows = [json.loads(l) for l in open(outdir / "matrix.jsonl")]
    works = []
    for r in rows:
        if r["workload"] not in works:
            works.append(r["workload"])
    gib = lambda b: f"{b / 2**30:.3f}"
    print("\nworkload | config | runs | peak reserved GiB median (min-max) | reserved/allocated | "
          "first step ms | steady-state sum ms (CPU issue sum) | driver calls (all / in the steady state; their virtual-memory calls' time) | moves (deferred) | move budget drawn ms")
    configs = []
    for r in rows:
        if r["config"] not in configs:
            configs.append(r["config"])
    configs.sort(key=lambda c: (CONFIGS.index(c) if c in CONFIGS else len(CONFIGS), c))
    for w in works:
        for c in configs:
            rs = [r for r in rows if r["workload"] == w and r["config"] == c and "error" not in r]
            errs = [r for r in rows if r["workload"] == w and r["config"] == c and "error" in r]
            if not rs:
                print(f"{w} | {c} | 0 | FAILED: {errs[0]['error'][-200:] if errs else '-'}")
                continue
            ratio = [r["peak_reserved"] / r["peak_allocated"] for r in rs]
            calls = [r.get("driver_calls", {}).get("total") for r in rs]
            steady_calls = [r["steady_driver_calls"]["total"] for r in rs if "steady_driver_calls" in r]
            issue = [r["steady_issue_sum_ms"] for r in rs if r.get("steady_issue_sum_ms") is not None]
            steady_vm = [r["steady_vm_call_ms"] for r in rs if r.get("steady_vm_call_ms") is not None]
            moves = [r.get("moves") or {} for r in rs]
            steals = [m.get("num_page_steals") for m in moves]
            deferred = sum(m.get("num_moves_deferred") or 0 for m in moves)
            drawn = [(m.get("move_time_drawn_peak_us") or 0) / 1000 for m in moves if "move_time_drawn_peak_us" in m]
            print(f"{w} | {c} | {len(rs)} | {spread([r['peak_reserved'] for r in rs], gib)} | "
                  f"{spread(ratio, lambda x: f'{x:.4f}')} | {spread([r['first_step_ms'] for r in rs], lambda x: f'{x:.0f}')} | "
                  f"{spread([r['steady_sum_ms'] for r in rs], lambda x: f'{x:.0f}')}"
                  f"{' (' + spread(issue, lambda x: f'{x:.0f}') + ')' if issue else ''} | {spread(calls, lambda x: f'{x:.0f}')}"
                  f"{' / ' + spread(steady_calls, lambda x: f'{x:.0f}') if steady_calls else ''}"
                  f"{'; ' + spread(steady_vm, lambda x: f'{x:.1f}') + ' ms' if steady_vm else ''} | "
                  f"{spread(steals, lambda x: f'{x:.0f}') + f' ({deferred})' if any(moves) else '-'} | "
                  f"{spread(drawn, lambda x: f'{x:.1f}')}")
    lines = targets(rows, works, configs)
    if lines:
        print("\n" + "\n".join(lines))
    breakdowns = [r for r in rows if r.get("peak_breakdown") and "error" not in r]
    if breakdowns:
        # Where the overhead over allocated lay at the last new peak: each part as a
        # percentage of allocated then, median (min-max) over the runs.
        print("\nworkload | config | runs | at the last new peak: reserved / allocated | "
              + " | ".join(p.replace("_", " ") + " %" for p in BREAKDOWN_PARTS))
        for w in works:
            for c in configs:
                bs = [r["peak_breakdown"] for r in breakdowns if r["workload"] == w and r["config"] == c]
                if not bs:
                    continue
                part = lambda b, k: 100 * b.get(k, 0) / max(b["allocated"], 1)
                print(f"{w} | {c} | {len(bs)} | "
                      f"{spread([b['reserved'] / max(b['allocated'], 1) for b in bs], lambda x: f'{x:.4f}')} | "
                      + " | ".join(spread([part(b, k) for b in bs], lambda x: f'{x:.2f}') for k in BREAKDOWN_PARTS))


def targets(rows, works, configs):
    """Issue 10's targets against PyTorch in the same call, for every configuration that is
    not PyTorch's: peak reserved / allocated at most 1.02 in every run; median peak reserved
    against expandable_segments' (at least 4% less on GPT-2 training and inference); the
    median steady-state sum inside native's range (min-max); the median first step at or
    below native's median. The table's lines (none when the call did not run PyTorch native)."""
    ok = lambda r: "error" not in r
    med = lambda xs: statistics.median(xs) if xs else None
    pct = lambda a, b: f"{100 * (a - b) / b:+.1f}%" if a is not None and b else "-"
    if not any(r["config"] == "native" for r in rows if ok(r)):
        return []
    lines = ["workload | config | reserved/allocated <= 1.02 (runs) | peak reserved vs expandable, vs "
             "native (medians) | steady-state median in native's range | first step vs native (medians)"]
    for w in works:
        of = lambda c: [r for r in rows if r["workload"] == w and r["config"] == c and ok(r)]
        native, expandable = of("native"), of("expandable")
        if not native:
            continue
        n_steady = [r["steady_sum_ms"] for r in native]
        n_first = med([r["first_step_ms"] for r in native])
        n_res = med([r["peak_reserved"] for r in native])
        e_res = med([r["peak_reserved"] for r in expandable])
        for c in configs:
            rs = of(c)
            if c in ("native", "expandable") or not rs:
                continue
            within = sum(r["peak_reserved"] <= 1.02 * r["peak_allocated"] for r in rs)
            res = med([r["peak_reserved"] for r in rs])
            steady = med([r["steady_sum_ms"] for r in rs])
            lo, hi = min(n_steady), max(n_steady)
            inside = "yes" if lo <= steady <= hi else ("below" if steady < lo else "no, above")
            first = med([r["first_step_ms"] for r in rs])
            lines.append(f"{w} | {c} | {within} of {len(rs)} | {pct(res, e_res)}, {pct(res, n_res)} | "
                         f"{inside} ({steady:.0f} against {lo:.0f}-{hi:.0f}) | {pct(first, n_first)}")
    return lines


def self_test():
    """`targets` on made-up runs whose verdicts are known (CI runs it: no GPU needed)."""
    def run(w, c, reserved, steady, first):
        return {"workload": w, "config": c, "peak_reserved": reserved, "peak_allocated": 100.0,
                "steady_sum_ms": steady, "first_step_ms": first}
    rows = [run("a", "native", 112, s, f) for s, f in [(100, 500), (110, 520), (120, 540)]]
    rows += [run("a", "expandable", 107, 110, 530)]
    rows += [run("a", "accelrt", r, s, f) for r, s, f in [(101.5, 105, 560), (101.8, 106, 570), (102.5, 107, 580)]]
    rows += [run("b", "native", 120, s, 100) for s in (50, 60)]
    rows += [run("b", "accelrt@x", 101, 45, 90), run("b", "accelrt@y", 103, 70, 110),
             {"workload": "b", "config": "accelrt@y", "error": "killed"}]
    got = targets(rows, ["a", "b"], ["native", "expandable", "accelrt", "accelrt@x", "accelrt@y"])
    want = [
        "a | accelrt | 2 of 3 | -4.9%, -9.1% | yes (106 against 100-120) | +9.6%",
        "b | accelrt@x | 1 of 1 | -, -15.8% | below (45 against 50-60) | -10.0%",
        "b | accelrt@y | 0 of 1 | -, -14.2% | no, above (70 against 50-60) | +10.0%",
    ]
    assert got[1:] == want, "\n".join(["targets() printed:"] + got + ["expected:"] + want)
    assert targets([r for r in rows if r["config"] != "native"], ["a", "b"], ["accelrt"]) == []
    print("real_runs.py self-test: the targets table gives the expected verdicts")


# ---- recordings -----------------------------------------------------------------------------


def record(outdir, works, parallel, configs=CONFIGS):
    from concurrent.futures import ThreadPoolExecutor

    outdir.mkdir(parents=True, exist_ok=True)
    accelrt = os.environ.get("ACCELRT_BIN", str(HERE.parent / ".gpu-bin" / "accelrt"))
    conf = {"native": "expandable_segments:false,release_at_peak:false",
            "expandable": "expandable_segments:true,release_at_peak:false"}
    jobs = [(w, c) for w in works for c in configs]

    def job(wc):
        w, c = wc
        steps = DEFAULT_STEPS.get(w, 6)
        if c == "accelrt":
            path = str(outdir / f"{w}.accelrt.trace.gz")
            r = launch(w, c, steps, record=path)
            r["trace"] = path
            return r
        base = str(outdir / f"{w}.pytorch-{c}")
        r = launch(w, c, steps, record=base)
        if "error" in r:
            return r
        out = base + ".trace.gz"
        cmd = [accelrt, "trace", "convert", r["snapshot"], out, "--workload", w,
               "--allocator", f"pytorch-{c}", "--conf", conf[c],
               "--real-peak-reserved", str(r["peak_reserved"]), "--real-peak-allocated", str(r["peak_allocated"])]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            r["error"] = "convert: " + p.stderr[-1000:]
        else:
            r["trace"] = out
            os.remove(r["snapshot"])
        return r

    with ThreadPoolExecutor(parallel) as ex, open(outdir / "recorded.jsonl", "a") as log:
        for r in ex.map(job, jobs):
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(json.dumps(r)[:300], flush=True)


def known_configs(parser, text):
    """`--configs a,b`: the configurations named, each one of CONFIGS."""
    configs = [c for c in text.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"--configs: unknown configuration {c!r} (known: {', '.join(CONFIGS)})")
    return configs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("one")
    o.add_argument("workload")
    o.add_argument("config", choices=CONFIGS)
    o.add_argument("--steps", type=int, default=12)
    o.add_argument("--record")
    m = sub.add_parser("matrix")
    m.add_argument("outdir", type=Path)
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--steps", type=int)
    m.add_argument("--workloads", default=",".join(MATRIX))
    m.add_argument("--configs", default=",".join(CONFIGS), help="a subset of " + ",".join(CONFIGS))
    m.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="another libaccelrt_torch.so, run as configuration accelrt@NAME")
    m.add_argument("--variant-conf", action="append", default=[], metavar="NAME=CONF",
                   help="the default build under another ACCELRT_ALLOC_CONF, run as accelrt@NAME "
                        "(a NAME that --variant gives: that build under CONF)")
    m.add_argument("--breakdown", action="store_true",
                   help="accelrt's runs record where reserved memory lay at each new peak (costs time "
                        "at each new peak) and the table adds it")
    r = sub.add_parser("record")
    r.add_argument("outdir", type=Path)
    r.add_argument("--parallel", type=int, default=1,
                   help="processes at once on the GPU (1: as users run; more change the runs' timing)")
    r.add_argument("--workloads", default=",".join(RECORDED))
    r.add_argument("--configs", default=",".join(CONFIGS), help="a subset of " + ",".join(CONFIGS))
    t = sub.add_parser("table")
    t.add_argument("outdir", type=Path)
    sub.add_parser("self-test", help="check the targets table on made-up runs (no GPU needed)")
    a = p.parse_args()
    if a.cmd == "self-test":
        self_test()
        return
    if a.cmd == "one":
        one(a.workload, a.config, a.steps, a.record)
    elif a.cmd == "matrix":
        global BREAKDOWN
        BREAKDOWN = a.breakdown
        configs = known_configs(p, a.configs)
        for v in a.variant:
            name, sep, path = v.partition("=")
            if not sep or not name or not Path(path).is_file():
                p.error(f"--variant {v!r}: NAME=PATH to a libaccelrt_torch.so that exists")
            VARIANTS[name] = path
            configs.append("accelrt@" + name)
        for v in a.variant_conf:
            name, sep, conf = v.partition("=")
            if not sep or not name or name in VARIANT_CONFS:
                p.error(f"--variant-conf {v!r}: NAME=CONF, each NAME once")
            VARIANT_CONFS[name] = conf
            if name not in VARIANTS:  # else: that build under this configuration
                configs.append("accelrt@" + name)
        matrix(a.outdir, a.reps, a.workloads.split(","), a.steps, configs)
    elif a.cmd == "record":
        record(a.outdir, a.workloads.split(","), a.parallel, known_configs(p, a.configs))
    else:
        table(a.outdir)


if __name__ == "__main__":
    main()
