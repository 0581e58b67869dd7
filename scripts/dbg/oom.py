import sys, torch
mode = sys.argv[1]
dev = torch.device("cuda", 0)
torch.ones(4, device=dev)
import accelrt_torch
print("enabled", accelrt_torch.is_enabled(), flush=True)
seen = []
if "obs" in mode:
    torch._C._cuda_attach_out_of_memory_observer(lambda *a: seen.append(a))
size = 1024 * 1024 * 1024 * 800000000 if "huge" in mode else (1 << 40)
try:
    torch.empty(size, dtype=torch.int8, device=dev)
except torch.OutOfMemoryError as e:
    print(mode, "OOM ok:", str(e)[:300], flush=True)
print(mode, "observer calls", len(seen), flush=True)
