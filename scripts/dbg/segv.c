// LD_PRELOAD helper for the GPU machine (no gdb there): on SIGSEGV print the native stack,
// each frame as object file + offset (feed the offsets to `addr2line -f -C -e FILE`), then die
// as before. Build there: gcc -shared -fPIC -O1 -o /tmp/segv.so scripts/dbg/segv.c; run
// without python -X faulthandler (it replaces this handler): LD_PRELOAD=/tmp/segv.so CMD.
// Found the shim's static-libstdc++ crash on every out-of-memory error (BENCHMARKS.md).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void handler(int sig, siginfo_t *si, void *ctx) {
  (void)ctx;
  void *frames[64];
  int n = backtrace(frames, 64);
  char line[512];
  int len = snprintf(line, sizeof line, "SIGSEGV at %p, %d frames:\n", si->si_addr, n);
  write(2, line, len);
  for (int i = 0; i < n; i++) {
    Dl_info info;
    if (dladdr(frames[i], &info) && info.dli_fname) {
      len = snprintf(line, sizeof line, "  #%d %s+0x%lx (%s)\n", i, info.dli_fname,
                     (unsigned long)((char *)frames[i] - (char *)info.dli_fbase),
                     info.dli_sname ? info.dli_sname : "?");
    } else {
      len = snprintf(line, sizeof line, "  #%d %p\n", i, frames[i]);
    }
    write(2, line, len);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
}
