/* kvmbench: the L1 side of the Linux/KVM baseline (scripts/bench-kvm.sh). Runs inside the L1
 * Linux (which runs under QEMU TCG, -icount shift=0, so its TSC counts instructions of the
 * whole emulated machine) and starts N guests under KVM at once, each a QEMU process whose
 * serial console is a pair of pipes to this program. It relays every guest line to its own
 * stdout as "[gI] LINE" and stamps the events with its TSC:
 *
 *   kvmbench: launch tsc=T free_kib=K                 before the first QEMU starts
 *   kvmbench: gI at /init tsc=T                       guest I printed "l4linux: reached /init"
 *   kvmbench: all at /init tsc=T
 *   kvmbench: memory booted free_kib=K                L1's free memory, SETTLE seconds later,
 *   kvmbench: gI memory booted anon_kib=K ram_rss_kib=K   and each QEMU's
 *   kvmbench: barrier tsc=T                           then "go" is written to every console
 *   kvmbench: gI done tsc=T                           guest I printed "l4bench: done" (its
 *                                                     QEMU is ended then, or when its partner
 *                                                     is: nothing more to measure)
 *   kvmbench: gI stalled ...                          no line from an unfinished guest for STALL s
 *   kvmbench: gI exit status=S tsc=T
 *   kvmbench: done failed=F stalled=S
 *
 * The barrier: the guests boot with `l4.barrier=/dev/ttyS0` (initramfs/l4bench.c), so each
 * waits for one line on its console before it starts its workloads; a VM's TSC has its own
 * offset, so the native way (one l4.start= TSC for all) does not work across VMs. The guests'
 * own TSC deltas (the workloads' totals) are still instructions of the emulated machine. The
 * SETTLE seconds between the last /init and the barrier let the guests' boot finish its
 * background work (the PS/2 mouse probe), as the native runs' and the compartments' l4.start=
 * (3 G instructions, about 2.5 s after /init) does.
 *
 * Memory: anon_kib is the QEMU process's anonymous memory outside its guest-RAM mapping (the
 * anonymous mapping of the guest's RAM size), ram_rss_kib that mapping's resident size.
 *
 * Usage: kvmbench [-s SETTLE] [-t STALL] N RAM_MIB QEMU ARGS...   ("{i}" in an argument
 * becomes the guest number, and more: see substitute(); SETTLE 2.5 s, STALL 60 s of L1 time)
 * | kvmbench tsc */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_GUESTS 16
#define LINE_MAX_ 4096

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* L1's monotonic time in seconds (virtual time under icount). */
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

struct guest {
    pid_t pid;
    int in, out;      /* the guest console's input (we write) and output (we read) */
    char line[LINE_MAX_];
    size_t len;
    int at_init, done;
    double last;      /* when its last line came */
};

static struct guest guests[MAX_GUESTS];
static int count;
static unsigned long ram_kib;
static double all_at_init = -1; /* when the last guest reached /init */

/* A field of /proc/meminfo in KiB (-1 if absent). */
static long meminfo(const char *field) {
    FILE *f = fopen("/proc/meminfo", "r");
    char name[64];
    long value, found = -1;
    if (!f)
        return -1;
    while (fscanf(f, "%63s %ld kB\n", name, &value) == 2)
        if (strncmp(name, field, strlen(field)) == 0 && name[strlen(field)] == ':')
            found = value;
    fclose(f);
    return found;
}

/* Free memory in KiB: MemFree plus the free pages on the per-CPU lists (/proc/zoneinfo's
 * pagesets "count:"), which MemFree leaves out and which vary by megabytes from one moment to
 * the next. */
static long free_kib(void) {
    FILE *f = fopen("/proc/zoneinfo", "r");
    char text[256];
    long pages = 0, count;
    if (!f)
        return -1;
    while (fgets(text, sizeof text, f))
        if (sscanf(text, " count: %ld", &count) == 1)
            pages += count;
    fclose(f);
    return meminfo("MemFree") + pages * 4;
}

/* Sums /proc/PID/smaps: the anonymous memory of everything but the guest RAM (heap, stacks,
 * copied-on-write data: what the process costs beyond the files it maps, which the L1
 * initramfs holds anyway), and the guest RAM's resident size. The guest RAM is the anonymous
 * mapping whose size is the RAM size (up to 8 MiB more: QEMU aligns it). */
static void smaps(pid_t pid, long *anon_kib, long *ram_rss_kib) {
    char path[64], text[512];
    snprintf(path, sizeof path, "/proc/%d/smaps", (int)pid);
    FILE *f = fopen(path, "r");
    *anon_kib = *ram_rss_kib = -1;
    if (!f)
        return;
    *anon_kib = *ram_rss_kib = 0;
    int is_ram = 0;
    while (fgets(text, sizeof text, f)) {
        unsigned long start, end, value;
        char name[256] = "";
        /* A mapping's first line starts with its (lower-case hex) address, a field's with
         * its capitalised name. */
        if (((text[0] >= '0' && text[0] <= '9') || (text[0] >= 'a' && text[0] <= 'f')) &&
            sscanf(text, "%lx-%lx %*s %*s %*s %*s %255s", &start, &end, name) >= 2) {
            unsigned long kib = (end - start) >> 10;
            is_ram = name[0] == 0 && kib >= ram_kib && kib <= ram_kib + 8192;
        } else if (sscanf(text, "Anonymous: %lu kB", &value) == 1) {
            if (!is_ram)
                *anon_kib += value;
        } else if (sscanf(text, "Rss: %lu kB", &value) == 1) {
            if (is_ram)
                *ram_rss_kib += value;
        }
    }
    fclose(f);
}

/* All guests settled at /init: memory, then the barrier line to every console. */
static void barrier(void) {
    printf("kvmbench: memory booted free_kib=%ld memavailable_kib=%ld\n", free_kib(),
           meminfo("MemAvailable"));
    for (int i = 0; i < count; i++) {
        long anon, ram;
        smaps(guests[i].pid, &anon, &ram);
        printf("kvmbench: g%d memory booted anon_kib=%ld ram_rss_kib=%ld\n", i + 1, anon, ram);
    }
    fflush(stdout);
    for (int i = 0; i < count; i++)
        if (write(guests[i].in, "go\n", 3) != 3)
            printf("kvmbench: g%d: cannot write the barrier line\n", i + 1);
    printf("kvmbench: barrier tsc=%llu\n", (unsigned long long)rdtsc());
}

/* One complete line of guest i. */
static void line(int i, char *text) {
    struct guest *g = &guests[i];
    uint64_t tsc = rdtsc();
    g->last = now_s();
    printf("[g%d] %s\n", i + 1, text);
    if (!g->at_init && strstr(text, "l4linux: reached /init")) {
        g->at_init = 1;
        printf("kvmbench: g%d at /init tsc=%llu\n", i + 1, (unsigned long long)tsc);
        int all = 1;
        for (int k = 0; k < count; k++)
            all &= guests[k].at_init;
        if (all) {
            printf("kvmbench: all at /init tsc=%llu\n", (unsigned long long)tsc);
            all_at_init = g->last;
        }
    }
    if (!g->done && strstr(text, "l4bench: done")) {
        /* After its last workload: end its QEMU (as a native copy exits) rather than wait for
         * the guest's reboot, which under nested KVM now and then never comes (a lost timer).
         * Not before its partner in the network phase (guests 2k-1 and 2k) is done too: the
         * last frames of a transfer may still be in its QEMU. */
        g->done = 1;
        printf("kvmbench: g%d done tsc=%llu\n", i + 1, (unsigned long long)tsc);
        int partner = i % 2 ? i - 1 : i + 1;
        if (partner >= count || guests[partner].done) {
            kill(g->pid, SIGTERM);
            if (partner < count && guests[partner].out >= 0)
                kill(guests[partner].pid, SIGTERM);
        }
    }
    fflush(stdout);
}

/* ARGUMENT for guest NUMBER (1, 2, ...): "{i}" becomes the number, "{port}" 5100 + the number,
 * "{partner_port}" that of its partner (guests 2k-1 and 2k are partners), "{A|B}" A for the
 * first of a pair (odd numbers), B for the second; other text stays. */
static char *substitute(const char *argument, int number) {
    char *out = malloc(strlen(argument) * 4 + 64), *o = out;
    int partner = number % 2 ? number + 1 : number - 1;
    for (const char *s = argument; *s;) {
        const char *end = *s == '{' ? strchr(s, '}') : NULL;
        const char *bar = end ? memchr(s, '|', (size_t)(end - s)) : NULL;
        if (end && strncmp(s, "{i}", 3) == 0)
            o += sprintf(o, "%d", number);
        else if (end && strncmp(s, "{port}", 6) == 0)
            o += sprintf(o, "%d", 5100 + number);
        else if (end && strncmp(s, "{partner_port}", 14) == 0)
            o += sprintf(o, "%d", 5100 + partner);
        else if (bar && number % 2)
            o += sprintf(o, "%.*s", (int)(bar - s - 1), s + 1);
        else if (bar)
            o += sprintf(o, "%.*s", (int)(end - bar - 1), bar + 1);
        else {
            *o++ = *s++;
            continue;
        }
        s = end + 1;
    }
    *o = 0;
    return out;
}

int main(int argc, char **argv) {
    double settle = 2.5, stall = 60;
    int option;
    if (argc > 1 && strcmp(argv[1], "tsc") == 0) {
        printf("%llu\n", (unsigned long long)rdtsc());
        return 0;
    }
    while ((option = getopt(argc, argv, "+s:t:")) != -1) {
        if (option == 's')
            settle = atof(optarg);
        else if (option == 't')
            stall = atof(optarg);
        else
            return 2;
    }
    argc -= optind;
    argv += optind;
    if (argc < 3 || atoi(argv[0]) < 1 || atoi(argv[0]) > MAX_GUESTS) {
        fprintf(stderr,
                "usage: kvmbench [-s SETTLE] [-t STALL] N RAM_MIB QEMU ARGS... | kvmbench tsc\n");
        return 2;
    }
    count = atoi(argv[0]);
    ram_kib = strtoul(argv[1], NULL, 0) << 10;
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    long free_ = free_kib(), available = meminfo("MemAvailable");
    printf("kvmbench: launch tsc=%llu free_kib=%ld memavailable_kib=%ld\n",
           (unsigned long long)rdtsc(), free_, available);
    for (int i = 0; i < count; i++) {
        int to[2], from[2];
        if (pipe(to) || pipe(from)) {
            perror("kvmbench: pipe");
            return 1;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("kvmbench: fork");
            return 1;
        }
        if (pid == 0) {
            char **args = calloc(argc, sizeof *args);
            for (int a = 2; a < argc; a++)
                args[a - 2] = substitute(argv[a], i + 1);
            dup2(to[0], 0);
            dup2(from[1], 1);
            dup2(from[1], 2);
            for (int fd = 3; fd < 256; fd++)
                close(fd);
            execvp(args[0], args);
            perror("kvmbench: exec");
            _exit(127);
        }
        close(to[0]);
        close(from[1]);
        guests[i] = (struct guest){.pid = pid, .in = to[1], .out = from[0], .last = now_s()};
    }
    int open_ = count, failed = 0, stalled = 0, barrier_sent = 0;
    while (open_ > 0) {
        struct pollfd fds[MAX_GUESTS];
        int index[MAX_GUESTS], n = 0;
        for (int i = 0; i < count; i++)
            if (guests[i].out >= 0) {
                fds[n] = (struct pollfd){.fd = guests[i].out, .events = POLLIN};
                index[n++] = i;
            }
        /* Wake up for the barrier, and once a second to look for stalled guests. */
        int timeout_ms = 1000;
        if (all_at_init >= 0 && !barrier_sent) {
            double left = all_at_init + settle - now_s();
            timeout_ms = left <= 0 ? 0 : left < 1 ? (int)(left * 1000) + 1 : 1000;
        }
        if (poll(fds, n, timeout_ms) < 0) {
            if (errno == EINTR)
                continue;
            perror("kvmbench: poll");
            return 1;
        }
        double now = now_s();
        if (all_at_init >= 0 && !barrier_sent && now >= all_at_init + settle) {
            barrier_sent = 1;
            barrier();
            for (int i = 0; i < count; i++)
                guests[i].last = now;
        }
        for (int i = 0; i < count && !stalled; i++)
            if (guests[i].out >= 0 && !guests[i].done && (all_at_init < 0 || barrier_sent) &&
                now - guests[i].last > stall) {
                stalled = 1;
                printf("kvmbench: g%d stalled: no output for %.0f s (%s); ending all guests\n",
                       i + 1, stall, guests[i].at_init ? "after /init" : "before /init");
                for (int k = 0; k < count; k++)
                    if (guests[k].out >= 0)
                        kill(guests[k].pid, SIGKILL);
            }
        for (int k = 0; k < n; k++) {
            if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            struct guest *g = &guests[index[k]];
            char buffer[4096];
            ssize_t got = read(g->out, buffer, sizeof buffer);
            if (got <= 0) {
                if (g->len) {
                    g->line[g->len] = 0;
                    line(index[k], g->line);
                    g->len = 0;
                }
                close(g->out);
                close(g->in);
                g->out = -1;
                open_--;
                int status = 0;
                waitpid(g->pid, &status, 0);
                int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                /* A guest fails when its QEMU failed or it ended before its last workload. */
                failed += code != 0 || !g->done;
                printf("kvmbench: g%d exit status=%d tsc=%llu\n", index[k] + 1, code,
                       (unsigned long long)rdtsc());
                continue;
            }
            for (ssize_t b = 0; b < got; b++) {
                char c = buffer[b];
                if (c == '\r')
                    continue;
                if (c == '\n' || g->len == LINE_MAX_ - 1) {
                    g->line[g->len] = 0;
                    line(index[k], g->line);
                    g->len = 0;
                    if (c == '\n')
                        continue;
                }
                g->line[g->len++] = c;
            }
        }
    }
    printf("kvmbench: done failed=%d stalled=%d\n", failed, stalled);
    return failed ? 1 : 0;
}
