// Diagnostic (LD_PRELOAD): on SIGSEGV print the faulting address, the instruction's library+symbol and every
// stack word that points into code (a crude backtrace that needs no unwinder), then die as before.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static void where(const char* tag, uintptr_t a) {
  Dl_info i;
  char buf[512];
  if (dladdr((void*)a, &i) && i.dli_fname) {
    snprintf(buf, sizeof buf, "%s %#lx %s (%s+%#lx)\n", tag, (unsigned long)a, i.dli_fname,
             i.dli_sname ? i.dli_sname : "?", (unsigned long)(a - (uintptr_t)(i.dli_saddr ? i.dli_saddr : i.dli_fbase)));
    write(2, buf, strlen(buf));
  }
}

static void on_segv(int sig, siginfo_t* si, void* ctx) {
  ucontext_t* uc = (ucontext_t*)ctx;
  char buf[128];
  snprintf(buf, sizeof buf, "SEGV_WHERE signal %d at address %p\n", sig, si->si_addr);
  write(2, buf, strlen(buf));
  where("SEGV_WHERE pc", (uintptr_t)uc->uc_mcontext.gregs[REG_RIP]);
  uintptr_t* sp = (uintptr_t*)uc->uc_mcontext.gregs[REG_RSP];
  for (int k = 0; k < 2048; ++k) where("SEGV_WHERE stack", sp[k]);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, 0);
}
