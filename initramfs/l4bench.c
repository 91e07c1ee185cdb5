/* Guest workloads for the native-vs-compartment ratios: a CPU loop, a system-call loop and
 * fork+exec+wait. Each is timed with rdtsc; under QEMU -icount shift=0 that is virtual
 * time, 1 ns per instruction (idle periods skipped), deterministic. Prints one line per
 * workload: "l4bench: <name> total=<ticks> per_op=<ticks> ops=<n>". With an argument START it
 * first sleeps until the TSC reaches START, so that copies in several compartments (or several
 * copies in one Linux) start their workloads together (the consolidation benchmark). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static void report(const char *name, uint64_t ticks, uint64_t ops) {
    printf("l4bench: %s total=%llu per_op=%llu ops=%llu\n", name, (unsigned long long)ticks,
           (unsigned long long)(ticks / ops), (unsigned long long)ops);
}

int main(int argc, char **argv) {
    const uint64_t cpu_ops = 20000000, sys_ops = 100000, fork_ops = 100;
    uint64_t start = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
    while (rdtsc() < start)
        usleep(1000);
    volatile uint64_t sink;
    uint64_t x = 88172645463325252ull, t;

    t = rdtsc();
    for (uint64_t i = 0; i < cpu_ops; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    sink = x;
    report("cpu", rdtsc() - t, cpu_ops);

    t = rdtsc();
    for (uint64_t i = 0; i < sys_ops; i++)
        syscall(SYS_getppid);
    report("syscall", rdtsc() - t, sys_ops);

    t = rdtsc();
    for (uint64_t i = 0; i < fork_ops; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            execl("/bin/true", "true", (char *)0);
            _exit(127);
        }
        int status = 0;
        if (pid < 0 || waitpid(pid, &status, 0) != pid || status != 0) {
            printf("l4bench: fork+exec failed\n");
            return 1;
        }
    }
    report("fork_exec", rdtsc() - t, fork_ops);
    (void)sink;
    return 0;
}
