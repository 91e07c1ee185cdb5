/*
 * l4ctl: the compartment's hypercalls from the guest's user space (the interface is
 * l4linux-glue/src/hypercall.rs: VMMCALL, number in RAX, arguments in RBX and RCX).
 *
 *   l4ctl poweroff [STATUS]   end the compartment with STATUS (0..255, default 0)
 *   l4ctl reboot              end the compartment as rebooted
 *   l4ctl log TEXT...         print TEXT as one line on the L4 console
 *   l4ctl fill SEED MB        fill MB MiB of memory with the secret pattern of SEED and keep
 *                             it (waits until killed; the isolation test's secret)
 *   l4ctl scan SEED           print how often the VMM finds that pattern in this compartment's
 *                             guest-physical memory (the pattern itself never enters it)
 *   l4ctl flood IFACE N       send N broadcast frames of 1514 bytes on IFACE as fast as it can
 *                             (AF_PACKET; the switch's hostile-flood test)
 *   l4ctl tsc                 print the time stamp counter (works natively too: under QEMU
 *                             -icount shift=0 it counts instructions since the machine's reset,
 *                             in a compartment as well, whose TSC is the machine's)
 *   l4ctl sysmon mark|report  L4Linux mode: the syscall monitor starts counting anew / prints
 *                             its counts since the mark and its trace ring
 *   l4ctl getppid N           mark, call getppid N times, report (the monitor's count test)
 *   l4ctl ud2                 execute ud2 with SIGILL at its default (the shell reports
 *                             "Illegal instruction": a #UD that is not a system call reached
 *                             the guest kernel's own handler)
 *   l4ctl msr-rewrite         read EFER and LSTAR through /dev/cpu/0/msr and write them back,
 *                             EFER with SCE set (a guest kernel that rewrites its syscall MSRs)
 *
 * Outside a compartment VMMCALL raises #UD: l4ctl then exits with status 3, so that callers
 * fall back to the native way (/init runs `poweroff -f` then).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define L4_HC_POWER_OFF 0x4c340001UL
#define L4_HC_REBOOT 0x4c340002UL
#define L4_HC_LOG 0x4c340003UL
#define L4_HC_SCAN 0x4c340004UL
#define L4_HC_MONITOR_MARK 0x4c340005UL
#define L4_HC_MONITOR_REPORT 0x4c340006UL
#define L4_HC_LOG_MAX 256

/* The secret pattern of a seed: four words of SplitMix64 (as secret_pattern() in
 * l4linux-glue/src/hypercall.rs). */
static void secret_pattern(unsigned long long seed, unsigned long long out[4])
{
    unsigned long long state = seed;
    for (int i = 0; i < 4; i++) {
        state += 0x9e3779b97f4a7c15ULL;
        unsigned long long z = state;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        out[i] = z ^ (z >> 31);
    }
}

static long hypercall(unsigned long nr, unsigned long a1, unsigned long a2)
{
    long result;
    __asm__ volatile("vmmcall" : "=a"(result) : "a"(nr), "b"(a1), "c"(a2) : "memory");
    return result;
}

static void not_in_a_compartment(int sig)
{
    (void)sig;
    static const char message[] = "l4ctl: not in an L4 compartment (VMMCALL is undefined)\n";
    if (write(2, message, sizeof message - 1) < 0) {
        /* nothing more to say */
    }
    _exit(3);
}

static int usage(void)
{
    fprintf(stderr, "usage: l4ctl poweroff [STATUS] | reboot | log TEXT... | fill SEED MB | scan SEED | flood IFACE N | tsc | sysmon mark|report | getppid N | ud2 | msr-rewrite\n");
    return 2;
}

int main(int argc, char **argv)
{
    signal(SIGILL, not_in_a_compartment);
    if (argc < 2)
        return usage();
    if (strcmp(argv[1], "poweroff") == 0) {
        unsigned long status = argc > 2 ? strtoul(argv[2], NULL, 0) : 0;
        if (status > 255)
            return usage();
        sync();
        hypercall(L4_HC_POWER_OFF, status, 0);
    } else if (strcmp(argv[1], "reboot") == 0) {
        sync();
        hypercall(L4_HC_REBOOT, 0, 0);
    } else if (strcmp(argv[1], "fill") == 0 && argc > 3) {
        unsigned long long pattern[4];
        secret_pattern(strtoull(argv[2], NULL, 0), pattern);
        size_t words = (size_t)strtoul(argv[3], NULL, 0) << 17;
        unsigned long long *memory = malloc(words * 8);
        if (memory == NULL) {
            fprintf(stderr, "l4ctl: no memory to fill\n");
            return 1;
        }
        for (size_t i = 0; i < words; i++)
            memory[i] = pattern[i % 4];
        printf("filled %s MiB\n", argv[3]);
        fflush(stdout);
        for (;;)
            pause();
    } else if (strcmp(argv[1], "scan") == 0 && argc > 2) {
        long r = hypercall(L4_HC_SCAN, strtoull(argv[2], NULL, 0), 0);
        if (r >= 0) {
            printf("found %ld\n", r);
            return 0;
        }
    } else if (strcmp(argv[1], "flood") == 0 && argc > 3) {
        int s = socket(AF_PACKET, SOCK_RAW, htons(0x88b5));
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strncpy(ifr.ifr_name, argv[2], IFNAMSIZ - 1);
        if (s < 0 || ioctl(s, SIOCGIFINDEX, &ifr) < 0) {
            perror("l4ctl: flood");
            return 1;
        }
        struct sockaddr_ll to;
        memset(&to, 0, sizeof to);
        to.sll_family = AF_PACKET;
        to.sll_ifindex = ifr.ifr_ifindex;
        to.sll_halen = 6;
        memset(to.sll_addr, 0xff, 6);
        unsigned char frame[1514];
        memset(frame, 0xff, 6);                       /* broadcast */
        memset(frame + 6, 0x02, 6);                   /* a locally administered source */
        frame[12] = 0x88;                             /* the local experimental EtherType */
        frame[13] = 0xb5;
        memset(frame + 14, 0x5a, sizeof frame - 14);
        unsigned long n = strtoul(argv[3], NULL, 0), sent = 0;
        for (unsigned long i = 0; i < n; i++)
            if (sendto(s, frame, sizeof frame, 0, (struct sockaddr *)&to, sizeof to) == (ssize_t)sizeof frame)
                sent++;
        printf("flooded %lu frames\n", sent);
        return sent == n ? 0 : 1;
    } else if (strcmp(argv[1], "sysmon") == 0 && argc > 2) {
        unsigned long nr = strcmp(argv[2], "mark") == 0     ? L4_HC_MONITOR_MARK
                           : strcmp(argv[2], "report") == 0 ? L4_HC_MONITOR_REPORT
                                                            : 0;
        if (nr == 0)
            return usage();
        if (hypercall(nr, 0, 0) == 0)
            return 0;
    } else if (strcmp(argv[1], "getppid") == 0 && argc > 2) {
        unsigned long n = strtoul(argv[2], NULL, 0);
        long marked = hypercall(L4_HC_MONITOR_MARK, 0, 0);
        long ppid = 0;
        for (unsigned long i = 0; i < n; i++)
            ppid = syscall(SYS_getppid);
        long reported = hypercall(L4_HC_MONITOR_REPORT, 0, 0);
        printf("getppid %lu times: %ld\n", n, ppid);
        if (marked == 0 && reported == 0)
            return 0;
    } else if (strcmp(argv[1], "ud2") == 0) {
        signal(SIGILL, SIG_DFL);
        __asm__ volatile("ud2");
        printf("l4ctl: ud2 did not trap\n");
        return 1;
    } else if (strcmp(argv[1], "msr-rewrite") == 0) {
        int fd = open("/dev/cpu/0/msr", O_RDWR);
        uint64_t efer = 0, lstar = 0;
        if (fd < 0 || pread(fd, &efer, 8, 0xc0000080) != 8 || pread(fd, &lstar, 8, 0xc0000082) != 8) {
            perror("l4ctl: msr-rewrite: reading /dev/cpu/0/msr");
            return 1;
        }
        uint64_t sce = efer | 1;
        if (pwrite(fd, &sce, 8, 0xc0000080) != 8 || pwrite(fd, &lstar, 8, 0xc0000082) != 8) {
            perror("l4ctl: msr-rewrite: writing /dev/cpu/0/msr");
            return 1;
        }
        uint64_t after = 0;
        if (pread(fd, &after, 8, 0xc0000080) != 8)
            return 1;
        printf("EFER %#llx (SCE=%llu) and LSTAR %#llx written back; EFER reads %#llx\n",
               (unsigned long long)efer, (unsigned long long)(efer & 1), (unsigned long long)lstar,
               (unsigned long long)after);
        return 0;
    } else if (strcmp(argv[1], "tsc") == 0) {
        unsigned int lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        printf("%llu\n", ((unsigned long long)hi << 32) | lo);
        return 0;
    } else if (strcmp(argv[1], "log") == 0) {
        char line[L4_HC_LOG_MAX];
        size_t used = 0;
        for (int i = 2; i < argc; i++) {
            int n = snprintf(line + used, sizeof line - used, "%s%s", i > 2 ? " " : "", argv[i]);
            if (n < 0 || (size_t)n >= sizeof line - used) {
                used = sizeof line - 1;
                break;
            }
            used += (size_t)n;
        }
        long r = hypercall(L4_HC_LOG, (unsigned long)line, used);
        return r == 0 ? 0 : 1;
    } else {
        return usage();
    }
    fprintf(stderr, "l4ctl: the VMM refused %s\n", argv[1]);
    return 1;
}
