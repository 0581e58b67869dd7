"""Record a PyTorch workload's allocator trace in accelrt's v1 format (traces/FORMAT.md).

Runs on the GPU machine (python3 with torch, torchvision, transformers; random weights, no
downloads). usage: record_trace.py WORKLOAD OUT.trace [SEED]
Workloads with dynamic shapes (what fragments a caching allocator most):
  gpt2_generate   GPT-2 124M fp16 autoregressive generation with a KV cache: 24 requests,
                  batch 1-8, prompt 16-512 tokens, 16-128 new tokens each
  resnet50_varres ResNet-50 fp16 inference: 40 batches of 1-32 images at 128-384 px
  bert_varlen     BERT-base fp16 inference: 60 batches of 1-64 sequences of 8-512 tokens
The header records PyTorch's own peaks for the same run (native allocator, or whatever
PYTORCH_CUDA_ALLOC_CONF says).
"""
import os
import random
import sys

import torch


def run(work, rng):
    dev = "cuda"
    if work == "gpt2_generate":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)).to(dev).half().eval()
        with torch.no_grad():
            for _ in range(24):
                b, prompt, new = rng.choice([1, 2, 4, 8]), rng.randint(16, 512), rng.randint(16, 128)
                ids = torch.randint(0, 50257, (b, prompt), device=dev)
                out = model(input_ids=ids, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                for _ in range(new):
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    nxt = out.logits[:, -1:].argmax(-1)
    elif work == "resnet50_varres":
        import torchvision
        model = torchvision.models.resnet50().to(dev).half().eval()
        with torch.no_grad():
            for _ in range(40):
                b, px = rng.randint(1, 32), rng.choice(range(128, 385, 32))
                model(torch.randn(b, 3, px, px, device=dev, dtype=torch.half))
    elif work == "bert_varlen":
        from transformers import BertConfig, BertModel
        model = BertModel(BertConfig()).to(dev).half().eval()
        with torch.no_grad():
            for _ in range(60):
                b, s = rng.randint(1, 64), rng.randint(8, 512)
                model(input_ids=torch.randint(0, 30522, (b, s), device=dev))
    else:
        raise SystemExit(f"unknown workload {work}")
    torch.cuda.synchronize()


def main():
    work, out = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.manual_seed(seed)
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=8_000_000)
    run(work, random.Random(seed))
    snap = torch.cuda.memory._snapshot()
    ids, streams, lines = {}, {}, []
    live = peak_live = reserved = peak_reserved = 0
    for e in snap["device_traces"][0]:
        action = e["action"]
        if action == "alloc":
            stream = streams.setdefault(e.get("stream", 0), len(streams))
            ids[e["addr"]] = len(lines)
            lines.append(f"a {ids[e['addr']]} {e['size']} {stream}")
            live += e["size"]
            peak_live = max(peak_live, live)
        elif action == "free_requested" and e["addr"] in ids:
            lines.append(f"f {ids.pop(e['addr'])}")
            live -= e["size"]
        elif action in ("segment_alloc", "segment_map"):
            reserved += e["size"]
            peak_reserved = max(peak_reserved, reserved)
        elif action in ("segment_free", "segment_unmap"):
            reserved -= e["size"]
    # Ids must be unique among live allocations and never reused: renumber by first use.
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "native")
    with open(out, "w") as f:
        f.write(f"# allocator trace v1: '{work}' (seed {seed}) recorded from PyTorch {torch.__version__} on {torch.cuda.get_device_name()}\n")
        f.write(f"# torch peak_allocated={peak_live} peak_reserved={peak_reserved} conf={conf}\n")
        f.write("\n".join(lines) + "\n")
    ratio = peak_reserved / max(1, peak_live)
    print(f"[{work}][{conf}] events={len(lines)} peak_allocated={peak_live} peak_reserved={peak_reserved} ratio={ratio:.3f} max_reserved={torch.cuda.max_memory_reserved()}")


if __name__ == "__main__":
    main()
