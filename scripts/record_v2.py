"""Record a workload as a v2 trace (traces/FORMAT.md) on the GPU machine, with the run's own
peaks in its header, so `accelrt replay` can put its prediction next to reality.

usage: record_v2.py WORKLOAD OUT.trace.gz [--allocator pytorch|accelrt] [--seed N]
                    [--accelrt PATH_TO_accelrt_BINARY]

WORKLOAD is one of scripts/record_trace.py's (gpt2_generate, resnet50_varres, bert_varlen).
  --allocator pytorch  PyTorch's own allocator, configured by PYTORCH_CUDA_ALLOC_CONF (native
                       when unset): torch.cuda.memory._record_memory_history, _dump_snapshot.
  --allocator accelrt  accelrt through accelrt_torch.enable() (ACCELRT_ALLOC_CONF; accelrt's
                       defaults when unset): accelrt_torch.record_memory_history, dump_snapshot.
The real peaks are the run's torch.cuda.max_memory_reserved() / max_memory_allocated() (which
answer from accelrt once it is enabled). The snapshot is written next to OUT
(OUT without .gz/.trace, plus .snapshot.pickle), then converted with
`accelrt trace convert`, and the replay command that checks the prediction is printed.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workload")
    p.add_argument("out")
    p.add_argument("--allocator", choices=["pytorch", "accelrt"], default="pytorch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelrt", default=str(HERE.parent / ".gpu-bin" / "accelrt"))
    a = p.parse_args()

    import torch
    if a.allocator == "accelrt":
        import accelrt_torch
        accelrt_torch.enable()
    from record_trace import run  # the workloads

    torch.manual_seed(a.seed)
    if a.allocator == "accelrt":
        accelrt_torch.record_memory_history(True, max_entries=8_000_000)
    else:
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                                 max_entries=8_000_000)
    run(a.workload, random.Random(a.seed))
    torch.cuda.synchronize()
    peaks = {
        "real_peak_reserved": torch.cuda.max_memory_reserved(),
        "real_peak_allocated": torch.cuda.max_memory_allocated(),
    }
    out = Path(a.out)
    stem = out.name
    for suffix in (".gz", ".trace"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    snap = out.with_name(stem + ".snapshot.pickle")
    if a.allocator == "accelrt":
        accelrt_torch.dump_snapshot(str(snap))
        conf = os.environ.get("ACCELRT_ALLOC_CONF", "")
    else:
        torch.cuda.memory._dump_snapshot(str(snap))
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    cmd = [
        a.accelrt, "trace", "convert", str(snap), str(out),
        "--workload", f"{a.workload} (seed {a.seed})",
        "--real-peak-reserved", str(peaks["real_peak_reserved"]),
        "--real-peak-allocated", str(peaks["real_peak_allocated"]),
        "--recorded-on", torch.cuda.get_device_name(),
        "--recorded-with", f"PyTorch {torch.__version__}",
    ]
    print(json.dumps({"workload": a.workload, "allocator": a.allocator, "conf": conf, **peaks}))
    subprocess.run(cmd, check=True)
    # The recorded configuration: the header's `conf` (the converter derives it from the
    # snapshot's settings); replaying under it gives prediction_error.
    replay_conf = conf if a.allocator == "accelrt" else None
    check = [a.accelrt, "replay", str(out), "--json"]
    if replay_conf is not None:
        check += ["--alloc-conf", replay_conf]
    else:
        expandable = "expandable_segments:true" in conf.replace(" ", "").lower()
        check += ["--alloc-conf",
                  f"expandable_segments:{str(expandable).lower()},release_at_peak:false"]
    print("check the prediction with:", " ".join(f"'{c}'" if " " in c else c for c in check))


if __name__ == "__main__":
    main()
