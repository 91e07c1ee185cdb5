/* Guest workloads for the native-vs-compartment ratios: a CPU loop, a system-call loop,
 * fork+exec+wait and a TCP transfer between two copies. Each is timed with rdtsc; under QEMU -icount shift=0 that is virtual
 * time, 1 ns per instruction (idle periods skipped), deterministic. Prints one line per
 * workload: "l4bench: <name> total=<ticks> per_op=<ticks> ops=<n>". With an argument START it
 * first sleeps until the TSC reaches START, so that copies in several compartments (or several
 * copies in one Linux) start their workloads together (the consolidation benchmark).
 * With `l4.barrier=DEVICE` on the kernel command line each copy first reads one line from
 * DEVICE (e.g. /dev/ttyS0): guests whose TSCs do not share one origin (Linux/KVM, each VM has
 * its own TSC offset; scripts/bench-kvm.sh) are started together by whoever writes that line.
 *
 * The network phase comes last and needs a partner, named by `l4.net=` on the command line:
 *   l4.net=server          listen on TCP port 5001 and receive one transfer;
 *   l4.net=client:ADDRESS  send one transfer to ADDRESS:5001 (the compartments of a pair, each
 *                          on its own switch; the Linux/KVM guests of a pair);
 *   l4.net=loopback        `l4.copies=N` copies in one Linux, paired over 127.0.0.1: copy 2k-1
 *                          (the copy number is the second argument) receives on port 5000+k,
 *                          copy 2k sends to it.
 * The client sends an 8-byte length and then that many bytes (`l4.netbytes=`, default
 * NET_BYTES), the server answers with the 8 bytes it counted, the client closes its side, the
 * server then its own, and the client waits for that: when either reports, the other has all
 * it needs from it (kvmbench ends a Linux/KVM guest's QEMU when it and its partner are done).
 * Each side reports from the established connection on: the client "net_send" up to the answer
 * (every byte delivered), the server "net_recv" up to the client's close, ops in KiB. Without a partner it prints "l4bench: net n/a" instead. Last of all
 * "l4bench: done". */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
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

/* The value of kernel command-line option NAME ("l4.barrier=") in a static buffer, or NULL. */
static const char *option(const char *name) {
    static char cmdline[4096], value[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return NULL;
    size_t n = fread(cmdline, 1, sizeof cmdline - 1, f);
    fclose(f);
    cmdline[n] = 0;
    for (char *arg = strtok(cmdline, " \n"); arg; arg = strtok(NULL, " \n"))
        if (strncmp(arg, name, strlen(name)) == 0) {
            snprintf(value, sizeof value, "%s", arg + strlen(name));
            return value;
        }
    return NULL;
}

/* `l4.barrier=DEVICE`: wait for one line on DEVICE. Without the option nothing happens. */
static void barrier(void) {
    const char *device = option("l4.barrier=");
    if (!device)
        return;
    int fd = open(device, O_RDONLY | O_NOCTTY);
    if (fd < 0) {
        printf("l4bench: cannot open barrier %s\n", device);
        return;
    }
    char c;
    while (read(fd, &c, 1) == 1 && c != '\n')
        ;
    close(fd);
}

/* The bytes one transfer of the network phase moves (`l4.netbytes=` overrides it). */
#define NET_BYTES (8ull << 20)
#define NET_PORT 5001
#define NET_CHUNK 65536

static char net_buffer[NET_CHUNK];

/* Writes all LENGTH bytes of DATA to FD; 0 on success. */
static int send_all(int fd, const void *data, size_t length) {
    const char *p = data;
    while (length > 0) {
        ssize_t sent = write(fd, p, length);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0)
            return -1;
        p += sent;
        length -= (size_t)sent;
    }
    return 0;
}

/* Reads exactly LENGTH bytes from FD into DATA; 0 on success. */
static int receive_all(int fd, void *data, size_t length) {
    char *p = data;
    while (length > 0) {
        ssize_t got = read(fd, p, length);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        p += got;
        length -= (size_t)got;
    }
    return 0;
}

/* The server side: one connection on ADDRESS:PORT, its bytes counted and confirmed. */
static int net_server(in_addr_t address, int port) {
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons(port)};
    at.sin_addr.s_addr = address;
    /* A client that never comes (or stops) ends the phase with an error after two minutes. */
    struct timeval patience = {.tv_sec = 120};
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(listener, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    if (listener < 0 || bind(listener, (struct sockaddr *)&at, sizeof at) || listen(listener, 1)) {
        printf("l4bench: net server: cannot listen on port %d: %s\n", port, strerror(errno));
        return 1;
    }
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) {
        printf("l4bench: net server: accept: %s\n", strerror(errno));
        return 1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    uint64_t t = rdtsc(), want, got = 0;
    if (receive_all(fd, &want, sizeof want)) {
        printf("l4bench: net server: no length\n");
        return 1;
    }
    while (got < want) {
        size_t ask = want - got < NET_CHUNK ? (size_t)(want - got) : NET_CHUNK;
        ssize_t n = read(fd, net_buffer, ask);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            printf("l4bench: net server: the transfer ended after %llu of %llu bytes\n",
                   (unsigned long long)got, (unsigned long long)want);
            return 1;
        }
        got += (uint64_t)n;
    }
    /* The answer, then the client's close: it has the answer, nothing is in flight. */
    if (send_all(fd, &got, sizeof got) || read(fd, net_buffer, 1) != 0) {
        printf("l4bench: net server: no close after the answer\n");
        return 1;
    }
    uint64_t ticks = rdtsc() - t;
    /* Our close returns once the client has acknowledged it (a guest that reboots right
     * after it could take the last frame with it). */
    struct linger linger = {.l_onoff = 1, .l_linger = 10};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, sizeof linger);
    close(fd);
    report("net_recv", ticks, got >> 10);
    close(listener);
    return 0;
}

/* The client side: BYTES to ADDRESS:PORT, retrying the connection until the server listens. */
static int net_client(in_addr_t address, int port, uint64_t bytes) {
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons(port)};
    at.sin_addr.s_addr = address;
    struct timeval patience = {.tv_sec = 120};
    int fd = -1;
    for (int attempt = 0; fd < 0; attempt++) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&at, sizeof at) == 0)
            break;
        int error = errno;
        if (fd >= 0)
            close(fd);
        fd = -1;
        /* Up to about a minute: the server may still be in its fork+exec phase. */
        if (attempt == 60000 ||
            (error != ECONNREFUSED && error != ENETUNREACH && error != EHOSTUNREACH &&
             error != ETIMEDOUT)) {
            printf("l4bench: net client: cannot connect to %s:%d: %s\n", inet_ntoa(at.sin_addr),
                   port, strerror(error));
            return 1;
        }
        usleep(1000);
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    memset(net_buffer, 0x5a, sizeof net_buffer);
    uint64_t t = rdtsc(), sent = 0, answer = 0;
    if (send_all(fd, &bytes, sizeof bytes))
        goto broken;
    while (sent < bytes) {
        size_t length = bytes - sent < NET_CHUNK ? (size_t)(bytes - sent) : NET_CHUNK;
        if (send_all(fd, net_buffer, length))
            goto broken;
        sent += length;
    }
    if (receive_all(fd, &answer, sizeof answer) || answer != bytes)
        goto broken;
    uint64_t ticks = rdtsc() - t;
    /* Our close, then the server's: it has seen ours, nothing of ours is in flight. */
    if (shutdown(fd, SHUT_WR) || read(fd, net_buffer, 1) != 0)
        goto broken;
    close(fd);
    report("net_send", ticks, bytes >> 10);
    return 0;
broken:
    printf("l4bench: net client: the transfer broke after %llu bytes (answer %llu)\n",
           (unsigned long long)sent, (unsigned long long)answer);
    return 1;
}

/* The network phase, as `l4.net=` says; COPY is this copy's number in `l4.copies=`. */
static int net_phase(int copy) {
    const char *net = option("l4.net="), *option_bytes = option("l4.netbytes=");
    uint64_t bytes = option_bytes ? strtoull(option_bytes, NULL, 0) : NET_BYTES;
    if (net && strcmp(net, "server") == 0)
        return net_server(htonl(INADDR_ANY), NET_PORT);
    if (net && strncmp(net, "client:", 7) == 0) {
        in_addr_t peer = inet_addr(net + 7);
        if (peer == INADDR_NONE) {
            printf("l4bench: l4.net=%s: not an IPv4 address\n", net);
            return 1;
        }
        return net_client(peer, NET_PORT, bytes);
    }
    if (net && strcmp(net, "loopback") == 0) {
        const char *text = option("l4.copies=");
        int copies = text ? atoi(text) : 1, port = 5000 + (copy + 1) / 2;
        if (copy % 2 == 1 && copy < copies)
            return net_server(htonl(INADDR_LOOPBACK), port);
        if (copy % 2 == 0)
            return net_client(htonl(INADDR_LOOPBACK), port, bytes);
    } else if (net) {
        printf("l4bench: l4.net=%s: want server, client:ADDRESS or loopback\n", net);
        return 1;
    }
    printf("l4bench: net n/a (no partner)\n");
    return 0;
}

int main(int argc, char **argv) {
    const uint64_t cpu_ops = 20000000, sys_ops = 100000, fork_ops = 100;
    uint64_t start = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
    int copy = argc > 2 ? atoi(argv[2]) : 1;
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
    fflush(stdout);
    if (net_phase(copy))
        return 1;
    printf("l4bench: done\n");
    return 0;
}
