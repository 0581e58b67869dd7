import ctypes, sys, faulthandler
faulthandler.enable()
lib = ctypes.CDLL(sys.argv[1])
lib.accelrt_torch_alloc.restype = ctypes.c_void_p
lib.accelrt_torch_alloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
lib.accelrt_torch_last_error.restype = ctypes.c_char_p
print("init", lib.accelrt_torch_init(1), flush=True)
p = lib.accelrt_torch_alloc(1 << 20, 0, None)
print("1 MiB ->", hex(p or 0), flush=True)
q = lib.accelrt_torch_alloc(1 << 40, 0, None)
print("1 TiB ->", q, lib.accelrt_torch_last_error(), flush=True)
arr = (ctypes.c_int64 * 4)()
print("last_oom", lib.accelrt_torch_last_oom(arr), list(arr), flush=True)
