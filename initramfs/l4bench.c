/* Guest workloads for the native-vs-compartment ratios: a CPU loop, a system-call loop and
 * fork+exec+wait. Each is timed with rdtsc; under QEMU -icount shift=0 that is virtual
 * time, 1 ns per instruction (idle periods skipped), deterministic. Prints one line per
 * workload: "l4bench: <name> total=<ticks> per_op=<ticks> ops=<n>". With an argument START it
 * first sleeps until the TSC reaches START, so that copies in several compartments (or several
 * copies in one Linux) start their workloads together (the consolidation benchmark).
 * With `l4.barrier=DEVICE` on the kernel command line each copy first reads one line from
 * DEVICE (e.g. /dev/ttyS0): guests whose TSCs do not share one origin (Linux/KVM, each VM has
 * its own TSC offset; scripts/bench-kvm.sh) are started together by whoever writes that line. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* `l4.barrier=DEVICE`: wait for one line on DEVICE. Without the option nothing happens. */
static void barrier(void) {
    char cmdline[4096] = "", *arg;
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return;
    size_t n = fread(cmdline, 1, sizeof cmdline - 1, f);
    fclose(f);
    cmdline[n] = 0;
    for (arg = strtok(cmdline, " \n"); arg; arg = strtok(NULL, " \n"))
        if (strncmp(arg, "l4.barrier=", 11) == 0)
            break;
    if (!arg)
        return;
    int fd = open(arg + 11, O_RDONLY | O_NOCTTY);
    if (fd < 0) {
        printf("l4bench: cannot open barrier %s\n", arg + 11);
        return;
    }
    char c;
    while (read(fd, &c, 1) == 1 && c != '\n')
        ;
    close(fd);
}

int main(int argc, char **argv) {
    const uint64_t cpu_ops = 20000000, sys_ops = 100000, fork_ops = 100;
    uint64_t start = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
    barrier();
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
