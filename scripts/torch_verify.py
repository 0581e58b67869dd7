#!/usr/bin/env python3
"""PyTorch on accelrt, verified on real training (run by scripts/torch-verify.sh on the GPU).

Subcommands (each run is its own process, so every allocator starts from nothing):

  train    --model gpt2|resnet50 --allocator native|accelrt --steps N --tag T --out FILE
           Train for N steps with a fixed seed and deterministic settings; append one JSON
           line (losses, step times, peak reserved/allocated) to FILE.
  features --out FILE --snapshot PATH
           accelrt only: torch.cuda.memory_stats() through the shim, CUDA graph capture and
           replay against eager, torch.cuda.MemPool, a forced out-of-memory (memory
           fraction) raising torch.OutOfMemoryError and the process going on after
           empty_cache(), record_stream, ACCELRT_ALLOC_CONF, and a memory snapshot read back
           by PyTorch's memory visualiser code. Writes a JSON object to FILE.
  plain-oom --out FILE
           accelrt without the C++ shim (torch.cuda.memory.CUDAPluggableAllocator with the two
           required functions): what PyTorch does with a NULL from the allocator.
  summary  DIR
           The comparison table from DIR/runs.jsonl and DIR/features.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

SEED = 1234
# accelrt runs by tag: the allocator configuration each uses (None: accelrt's defaults).
# "default" is what accelrt_torch.enable() uses (accelrt's defaults); "steal" sets
# release_at_peak:true explicitly (the default too: idle pages move at the peak, behind
# completed fences, never waiting); "plain" uses plain segments.
ALLOC_CONFS = {"default": None, "steal": "release_at_peak:true", "plain": "expandable_segments:false"}


# ---- training --------------------------------------------------------------------------------


def deterministic(torch):
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def gpt2_124m(torch, math_attention=False):
    nn, F = torch.nn, torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Attention(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.h = h
            self.c_attn = nn.Linear(d, 3 * d)
            self.c_proj = nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
            if math_attention:
                # Deterministic backward (the fused kernels' backward is not, with warn_only).
                with sdpa_kernel(SDPBackend.MATH):
                    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(d), Attention(d, h)
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab=50257, ctx=1024, layers=12, heads=12, d=768):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for blk in self.blocks:
                x = blk(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def train(args):
    accelrt = None
    status = None
    if args.allocator == "accelrt":
        import accelrt_torch as accelrt

        status = accelrt.enable(alloc_conf=ALLOC_CONFS.get(args.tag))
    import torch

    deterministic(torch)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(SEED)
    if args.model in ("gpt2", "gpt2-math"):
        model = gpt2_124m(torch, math_attention=args.model == "gpt2-math").to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
        batches = [
            torch.randint(0, 50257, (8, 1025), generator=gen) for _ in range(args.steps)
        ]

        def step(i):
            data = batches[i].to(dev, non_blocking=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(data[:, :-1].contiguous(), data[:, 1:].contiguous())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    else:
        import torchvision

        model = torchvision.models.resnet50(weights=None).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        batches = [
            (torch.randn(64, 3, 224, 224, generator=gen), torch.randint(0, 1000, (64,), generator=gen))
            for _ in range(args.steps)
        ]
        loss_fn = torch.nn.CrossEntropyLoss()

        def step(i):
            x, y = (t.to(dev) for t in batches[i])
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    losses, times = [], []
    torch.cuda.synchronize()
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(i)
        losses.append(loss.item())  # synchronizes
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    result = {
        "model": args.model,
        "allocator": args.allocator,
        "tag": args.tag,
        "alloc_conf": status["alloc_conf"] if status else None,
        "steps": args.steps,
        "losses": losses,
        "step_s": times,
        "median_step_ms": 1e3 * statistics.median(times[5:] if len(times) > 6 else times),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
    }
    if accelrt is None:
        result["peak_reserved"] = torch.cuda.max_memory_reserved()
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
        s = torch.cuda.memory_stats()
        result["num_device_alloc"] = s.get("num_device_alloc")
    else:
        s = accelrt.memory_stats()
        result["peak_reserved"] = s["reserved_bytes.all.peak"]
        result["peak_allocated"] = s["allocated_bytes.all.peak"]
        result["num_device_alloc"] = s["num_device_alloc"]
        result["num_page_steals"] = s["num_page_steals"]
        result["accelrt_status"] = status
        if status["mode"] == "full":
            # The same figure through PyTorch's own function (the shim's getDeviceStats).
            result["torch_max_memory_reserved"] = torch.cuda.max_memory_reserved()
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(
        f"{args.model} {args.allocator}/{args.tag}: losses {losses[0]:.6f} .. {losses[-1]:.6f}, "
        f"median step {result['median_step_ms']:.2f} ms, peak reserved "
        f"{result['peak_reserved'] / 2**30:.3f} GiB, peak allocated {result['peak_allocated'] / 2**30:.3f} GiB"
    )


# ---- features --------------------------------------------------------------------------------


def check(results, name, fn):
    """Run one feature check; record ok/detail or the error (the next check still runs)."""
    t0 = time.perf_counter()
    try:
        detail = fn()
        results[name] = {"ok": True, "detail": detail}
    except Exception as e:
        results[name] = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}"[:3000],
            "traceback": traceback.format_exc()[-3000:],
        }
    results[name]["seconds"] = round(time.perf_counter() - t0, 3)
    print(f"[{'ok' if results[name]['ok'] else 'FAIL'}] {name}: {results[name].get('detail', results[name].get('error'))}")


def features(args):
    os.environ["ACCELRT_ALLOC_CONF"] = "max_split_size_mb:256"
    import accelrt_torch as accelrt

    results = {}
    t0 = time.perf_counter()
    status = accelrt.enable()
    results["enable"] = {"ok": status["mode"] == "full", "detail": status, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[{'ok' if results['enable']['ok'] else 'FAIL'}] enable: {status}")
    import torch

    deterministic(torch)
    dev = torch.device("cuda")
    results["torch"] = torch.__version__

    def stats_through_torch():
        x = torch.empty(300 << 20, dtype=torch.uint8, device=dev)
        ours, theirs = accelrt.memory_stats(), torch.cuda.memory_stats()
        keys = ["allocated_bytes.all.current", "reserved_bytes.all.current", "reserved_bytes.all.peak", "num_ooms"]
        same = {k: (ours[k], theirs.get(k)) for k in keys}
        assert all(a == b for a, b in same.values()), f"accelrt vs torch.cuda.memory_stats(): {same}"
        assert torch.cuda.memory_allocated() >= 300 << 20
        del x
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
        return same

    def alloc_conf():
        s = accelrt.memory_snapshot()["allocator_settings"]
        assert s.get("max_split_size") == 256 << 20, s
        return s

    def graphs():
        torch.manual_seed(SEED)
        model = torch.nn.Sequential(
            torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)
        ).to(dev)
        static_x = torch.randn(64, 1024, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(s):
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            static_y = model(static_x)
        pool = g.pool()
        segs = [
            seg for seg in accelrt.memory_snapshot()["segments"]
            if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pool)
        ]
        assert segs, f"no segment of the graph's pool {pool} in accelrt's snapshot"
        diffs = []
        for trial in range(3):
            static_x.copy_(torch.randn(64, 1024, device=dev))
            g.replay()
            torch.cuda.synchronize()
            with torch.no_grad():
                eager = model(static_x)
            diffs.append((static_y - eager).abs().max().item())
            assert torch.equal(static_y, eager), f"replay {trial} differs from eager by {diffs[-1]}"
        del static_y, g
        torch.cuda.synchronize()
        left = [
            seg for seg in accelrt.memory_snapshot()["segments"]
            if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pool)
        ]
        # What stays in the pool once the graph is gone: blocks still allocated (PyTorch
        # keeps its cuBLAS workspace for the capture stream, allocated during the capture).
        live = [b["size"] for seg in left for b in seg["blocks"] if b["state"] != "inactive"]
        assert all(any(b["state"] != "inactive" for b in seg["blocks"]) for seg in left), (
            "a segment of the released pool holds only free blocks and was not given back"
        )
        return {
            "pool": list(pool),
            "pool_segments": len(segs),
            "pool_segments_after_release": len(left),
            "live_blocks_after_release": live,
            "max_abs_diff_replay_vs_eager": max(diffs),
        }

    def mempool():
        pool = torch.cuda.MemPool()
        with torch.cuda.use_mem_pool(pool):
            t = torch.empty(10 << 20, dtype=torch.uint8, device=dev)
        outside = torch.empty(10 << 20, dtype=torch.uint8, device=dev)
        segs = [
            seg for seg in accelrt.memory_snapshot()["segments"]
            if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pool.id)
        ]
        inside = [
            b for seg in segs for b in seg["blocks"]
            if b["address"] == t.data_ptr() and b["state"] == "active_allocated"
        ]
        assert inside, f"the tensor allocated under use_mem_pool is not in pool {pool.id}"
        assert not any(
            b["address"] == outside.data_ptr() for seg in segs for b in seg["blocks"]
        ), "a tensor allocated outside use_mem_pool landed in the pool"
        uses = pool.use_count()
        del t, outside, pool
        torch.cuda.synchronize()
        return {"pool_segments": len(segs), "use_count": uses}

    def record_stream():
        side = torch.cuda.Stream()
        x = torch.ones(1 << 20, device=dev)
        with torch.cuda.stream(side):
            y = x * 2
        x.record_stream(side)
        del x
        torch.cuda.synchronize()
        return {"sum": y.sum().item()}

    def oom():
        observed = []
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:
            attach(lambda device, alloc, device_alloc, device_free: observed.append((device, alloc, device_alloc, device_free)))
        total = torch.cuda.get_device_properties(0).total_memory
        before = accelrt.memory_stats()["num_ooms"]
        torch.cuda.set_per_process_memory_fraction(0.05)
        message = None
        try:
            torch.empty(int(total * 0.2), dtype=torch.uint8, device=dev)
        except torch.OutOfMemoryError as e:
            message = str(e)
        assert message is not None, "no torch.OutOfMemoryError at 20% of the device with a 5% fraction"
        assert "accelrt" in message and "out of memory" in message, message
        assert accelrt.memory_stats()["num_ooms"] == before + 1
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
        z = torch.ones(1 << 28, device=dev)  # 1 GiB: the process goes on
        value = z.sum().item()
        del z
        assert value == float(1 << 28)
        return {
            "message": message[:600],
            "observer_calls": observed[:2],
            "observer_attached": attach is not None,
            "after_empty_cache_sum": value,
        }

    def snapshot():
        accelrt.record_memory_history(True, 100_000)
        xs = [torch.empty(n, dtype=torch.uint8, device=dev) for n in (1 << 10, 3 << 20, 50 << 20)]
        del xs[1]
        accelrt.dump_snapshot(args.snapshot)
        accelrt.record_memory_history(False)
        with open(args.snapshot, "rb") as f:
            snap = pickle.load(f)
        from torch.cuda import _memory_viz

        summary = _memory_viz.segsum(snap)
        html = _memory_viz.trace_plot(snap)
        actions = {}
        for e in snap["device_traces"][0]:
            actions[e["action"]] = actions.get(e["action"], 0) + 1
        assert actions.get("alloc", 0) >= 3 and actions.get("free_requested", 0) >= 1, actions
        return {
            "bytes": os.path.getsize(args.snapshot),
            "segments": len(snap["segments"]),
            "actions": actions,
            "segsum_lines": summary.count("\n"),
            "trace_plot_html_bytes": len(html),
        }

    check(results, "torch.cuda.memory_stats", stats_through_torch)
    check(results, "ACCELRT_ALLOC_CONF", alloc_conf)
    check(results, "cuda_graph_capture_replay", graphs)
    check(results, "mempool", mempool)
    check(results, "record_stream", record_stream)
    check(results, "oom", oom)
    check(results, "snapshot", snapshot)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))


def plain_oom(args):
    os.environ["ACCELRT_ALLOC_CONF"] = "per_process_memory_fraction:0.05"
    import accelrt_torch as accelrt

    status = accelrt.enable(shim=False)
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    result = {"status": status}
    small = torch.ones(1 << 20, device="cuda")
    result["small_sum"] = small.sum().item()
    try:
        t = torch.empty(int(total * 0.2), dtype=torch.uint8, device="cuda")
        result["outcome"] = f"no exception: data_ptr={t.data_ptr():#x}"
    except Exception as e:
        result["outcome"] = f"{type(e).__name__}: {str(e)[:400]}"
    result["last_error"] = accelrt.last_error()[:400]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


# ---- summary ---------------------------------------------------------------------------------


def summary(args):
    out = Path(args.dir)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    try:
        feats = json.loads((out / "features.json").read_text())
    except (OSError, ValueError):
        feats = {}
    gib = 2**30
    rows, verdicts = [], []

    def maxdiff(x, y):
        return max(abs(p - q) for p, q in zip(x["losses"], y["losses"]))

    for model in ("gpt2", "gpt2-math", "resnet50"):
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        natives = [r for r in mine if r["allocator"] == "native"]
        accels = [r for r in mine if r["allocator"] == "accelrt"]
        if not natives or not accels:
            verdicts.append(f"{model}: missing runs (have {[(r['allocator'], r['tag']) for r in mine]})")
            continue
        a = natives[0]
        spread = max((maxdiff(a, r) for r in natives[1:]), default=0.0)
        native_ms = statistics.mean(r["median_step_ms"] for r in natives)
        nat_reserved = min(r["peak_reserved"] for r in natives)
        for r in natives + accels:
            conf = r.get("alloc_conf") or ""
            rows.append(
                (
                    model,
                    f"{r['allocator']} {r['tag']}" + (f" ({conf})" if conf else ""),
                    f"{r['peak_reserved'] / gib:.3f}",
                    f"{r['peak_allocated'] / gib:.3f}",
                    f"{r['peak_reserved'] / max(r['peak_allocated'], 1):.4f}",
                    f"{r['median_step_ms']:.2f}",
                    f"{100 * (r['median_step_ms'] / native_ms - 1):+.2f}%",
                    str(r.get("num_device_alloc")),
                    str(r.get("num_page_steals", "")),
                    "yes" if r["losses"] == a["losses"] else f"no (max diff {maxdiff(a, r):.3g})",
                )
            )
        for acc in accels:
            d_acc = maxdiff(a, acc)
            identical = acc["losses"] == a["losses"]
            ratio = acc["median_step_ms"] / native_ms - 1
            if identical:
                losses = "identical step for step (PASS)"
            elif spread == 0:
                losses = f"differ from native, whose runs agree exactly (max {d_acc:.3g}: FAIL)"
            else:
                # Non-deterministic kernels (here cuDNN attention's backward under
                # warn_only): compare with how far two native runs drift apart.
                losses = (
                    f"max |accelrt - native a| = {d_acc:.3g} vs native b - native a {spread:.3g} "
                    f"({d_acc / spread:.2f}x the native run-to-run spread: "
                    f"{'within it' if d_acc <= spread else 'outside it'})"
                )
            verdicts.append(
                f"{model} accelrt {acc['tag']}: losses {losses}; peak reserved "
                f"{acc['peak_reserved'] / gib:.3f} GiB vs native {nat_reserved / gib:.3f} GiB "
                f"({100 * (acc['peak_reserved'] / nat_reserved - 1):+.1f}%, "
                f"{'PASS' if acc['peak_reserved'] < nat_reserved else 'FAIL'}); median step "
                f"{acc['median_step_ms']:.2f} ms vs native {native_ms:.2f} ms ({100 * ratio:+.2f}%, "
                f"{'within 2%' if abs(ratio) <= 0.02 else 'NOT within 2%'})"
            )
            if acc.get("torch_max_memory_reserved") is not None:
                verdicts.append(
                    f"{model} accelrt {acc['tag']}: torch.cuda.max_memory_reserved() = "
                    f"{acc['torch_max_memory_reserved']} B (accelrt_torch: {acc['peak_reserved']} B)"
                )
    head = ("model", "allocator run", "peak reserved GiB", "peak allocated GiB", "reserved/allocated",
            "median step ms", "vs native mean", "device allocs", "page steals", "losses = native a")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    first = runs[0] if runs else {}
    print(f"\nPyTorch on accelrt: {first.get('device', '?')}, torch {first.get('torch', '?')}, "
          f"{first.get('steps', '?')} steps per run, median step time over steps 6..N")
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    for v in verdicts:
        print("- " + v)
    for name, res in feats.items():
        if isinstance(res, dict) and "ok" in res:
            detail = res.get("detail") if res["ok"] else res.get("error")
            print(f"- feature {name}: {'PASS' if res['ok'] else 'FAIL'}: {json.dumps(detail, default=str)[:400]}")
    plain = out / "plain_oom.json"
    if plain.exists():
        p = json.loads(plain.read_text())
        print(f"- without the C++ shim (alloc/free only), an allocation accelrt refuses gives PyTorch: {p.get('outcome')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", choices=["gpt2", "gpt2-math", "resnet50"], required=True)
    t.add_argument("--allocator", choices=["native", "accelrt"], required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--tag", default="a")
    t.add_argument("--out", required=True)
    f = sub.add_parser("features")
    f.add_argument("--out", required=True)
    f.add_argument("--snapshot", required=True)
    p = sub.add_parser("plain-oom")
    p.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("dir")
    args = ap.parse_args()
    {"train": train, "features": features, "plain-oom": plain_oom, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    main()
