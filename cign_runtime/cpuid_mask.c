/* LD_PRELOAD shim that makes an AVX-512 x86-64 CPU report the instruction set of an AVX2-only one.
 *
 * Libraries choose their kernels from the CPUID instruction (onnxruntime's MLAS, oneDNN and ATen in
 * torch, numpy). With Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, 0) every CPUID executed
 * by the process traps; the SIGSEGV handler below runs the real CPUID, clears the feature bits of
 * AVX-512, AVX-VNNI, AVX512-BF16 / FP16 and AMX, writes the result into the trapped registers and
 * skips the instruction. Kernels are then picked as on an AVX2 + FMA CPU (an AMD EPYC Zen 2/3, an
 * Intel Haswell-Skylake client). Intel's SDE does this by emulation; it cannot be installed here.
 * Built and loaded by cign_runtime.isa (``cign-bench --cpu-isa avx2``); CPUID faulting is reset on execve, and LD_PRELOAD carries
 * the shim into child processes.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* CPUID.(EAX=7, ECX=0): EBX avx512 f dq ifma pf er cd bw vl; ECX avx512 vbmi vbmi2 vnni bitalg
 * vpopcntdq; EDX avx512 4vnniw 4fmaps vp2intersect, amx-bf16, avx512-fp16, amx-tile, amx-int8. */
static const uint32_t LEAF7_EBX = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
static const uint32_t LEAF7_ECX = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
static const uint32_t LEAF7_EDX = BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
/* CPUID.(EAX=7, ECX=1): EAX avx-vnni, avx512-bf16, amx-fp16, avx-ifma; EDX avx-vnni-int8,
 * avx-ne-convert, amx-complex, avx-vnni-int16, avx10. */
static const uint32_t LEAF7_1_EAX = BIT(4) | BIT(5) | BIT(21) | BIT(23);
static const uint32_t LEAF7_1_EDX = BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19);

static void cpuid_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: default action (re-executes and dies) */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    cpuid_faulting(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    cpuid_faulting(1);
    if (leaf == 7 && sub == 0) {
        b &= ~LEAF7_EBX;
        c &= ~LEAF7_ECX;
        d &= ~LEAF7_EDX;
    } else if (leaf == 7 && sub == 1) {
        a &= ~LEAF7_1_EAX;
        d &= ~LEAF7_1_EDX;
    } else if (leaf == 0x24) { /* AVX10 converged vector ISA leaf */
        a = b = c = d = 0;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "cpuid_mask: CPUID faulting is not available on this CPU / kernel\n");
        _exit(70);
    }
}
