/*
 * smclient: a cheap socketmap load client for the benchmarks (compiled at run time by
 * bench/client.py; a Python fallback with the same output lives there too).
 *
 *   smclient HOST PORT KEYFILE CONNS DEPTH SECONDS MAX_REQUESTS ONCE TIMEOUT
 *
 * KEYFILE holds one request payload per line ("postfix example.com"); each is sent as a
 * netstring. All CONNS connections are opened first; then each sends DEPTH requests and
 * sends the next one whenever a reply arrives (DEPTH 1 is how Postfix asks: one request at a
 * time per connection). Connection i walks the keys from offset i * KEYS / CONNS, wrapping;
 * with ONCE = 1 the connections share one cursor instead and every key is asked exactly once.
 * New requests stop after SECONDS or MAX_REQUESTS (0: no limit); the run ends once every
 * request sent is answered, or TIMEOUT seconds after the start, whichever is first.
 *
 * Prints one JSON object: counts of replies by kind, elapsed wall time, the client's own CPU
 * time, and latency percentiles in microseconds (from the send of a request to its reply).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_LATENCIES 20000000u

struct conn {
    int fd;
    int dead;
    char *buf;
    size_t len, cap;
    uint64_t *sent; /* ring of send times, DEPTH slots */
    unsigned head, count;
    size_t cursor;
};

static char **keys;      /* framed requests */
static size_t *key_lens;
static size_t nkeys, shared_cursor;
static int depth, once;
static uint64_t issued, max_requests, answered;
static uint64_t n_ok, n_notfound, n_temp, n_other, n_errors, n_lost;
static uint32_t *lat;
static size_t nlat;
static int stopping;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void load_keys(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    size_t cap = 1024;
    keys = malloc(cap * sizeof *keys);
    key_lens = malloc(cap * sizeof *key_lens);
    char *line = NULL;
    size_t n = 0;
    ssize_t got;
    while ((got = getline(&line, &n, f)) > 0) {
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        if (nkeys == cap) {
            cap *= 2;
            keys = realloc(keys, cap * sizeof *keys);
            key_lens = realloc(key_lens, cap * sizeof *key_lens);
        }
        char *framed = malloc((size_t)got + 32);
        key_lens[nkeys] = (size_t)sprintf(framed, "%zd:%s,", got, line);
        keys[nkeys++] = framed;
    }
    free(line);
    fclose(f);
    if (!nkeys) {
        fprintf(stderr, "smclient: no keys in %s\n", path);
        exit(2);
    }
}

/* Send the next request on c, if the limits allow; returns 1 if one was sent. */
static int send_next(struct conn *c) {
    if (stopping || c->dead) return 0;
    if (max_requests && issued >= max_requests) return 0;
    size_t k;
    if (once) {
        if (shared_cursor >= nkeys) return 0;
        k = shared_cursor++;
    } else {
        k = c->cursor++ % nkeys;
    }
    /* Requests are tiny: a blocking-free send of the whole frame succeeds on loopback. */
    ssize_t w = send(c->fd, keys[k], key_lens[k], MSG_NOSIGNAL);
    if (w != (ssize_t)key_lens[k]) {
        n_errors++;
        c->dead = 1;
        return 0;
    }
    c->sent[(c->head + c->count) % (unsigned)depth] = now_ns();
    c->count++;
    issued++;
    return 1;
}

/* Consume the complete netstrings in c->buf; returns how many. */
static int parse_replies(struct conn *c, uint64_t t) {
    size_t pos = 0;
    int done = 0;
    while (pos < c->len) {
        size_t i = pos, size = 0;
        while (i < c->len && c->buf[i] >= '0' && c->buf[i] <= '9') size = size * 10 + (size_t)(c->buf[i++] - '0');
        if (i >= c->len) break;
        if (c->buf[i] != ':' || i == pos) {
            n_errors++;
            c->dead = 1;
            return done;
        }
        size_t end = i + 1 + size;
        if (end >= c->len) break;
        const char *p = c->buf + i + 1;
        if (size >= 3 && memcmp(p, "OK ", 3) == 0) n_ok++;
        else if (size >= 8 && memcmp(p, "NOTFOUND", 8) == 0) n_notfound++;
        else if (size >= 4 && memcmp(p, "TEMP", 4) == 0) n_temp++;
        else n_other++;
        if (c->count) {
            uint64_t d = t - c->sent[c->head];
            c->head = (c->head + 1) % (unsigned)depth;
            c->count--;
            if (nlat < MAX_LATENCIES) lat[nlat++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
        }
        answered++;
        done++;
        pos = end + 1;
    }
    if (pos) {
        memmove(c->buf, c->buf + pos, c->len - pos);
        c->len -= pos;
    }
    return done;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct(double q) {
    if (!nlat) return 0;
    size_t i = (size_t)(q * (double)(nlat - 1) + 0.5);
    return lat[i] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: smclient HOST PORT KEYFILE CONNS DEPTH SECONDS MAX_REQUESTS ONCE TIMEOUT\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    load_keys(argv[3]);
    int nconns = atoi(argv[4]);
    depth = atoi(argv[5]);
    double seconds = atof(argv[6]);
    max_requests = strtoull(argv[7], NULL, 10);
    once = atoi(argv[8]);
    double timeout = atof(argv[9]);
    if (nconns < 1 || depth < 1) {
        fprintf(stderr, "smclient: CONNS and DEPTH must be >= 1\n");
        return 2;
    }
    size_t want = max_requests && max_requests < MAX_LATENCIES ? max_requests : MAX_LATENCIES;
    lat = malloc(want * sizeof *lat);
    if (!lat) die("malloc");

    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "smclient: bad IPv4 address %s\n", host);
        return 2;
    }
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (c->fd < 0) die("socket");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
        c->cap = 65536;
        c->buf = malloc(c->cap);
        c->sent = calloc((size_t)depth, sizeof *c->sent);
        c->cursor = (size_t)i * nkeys / (size_t)nconns;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    }

    double cpu0 = cpu_seconds();
    uint64_t t0 = now_ns();
    uint64_t stop_at = t0 + (uint64_t)(seconds * 1e9);
    uint64_t give_up = t0 + (uint64_t)(timeout * 1e9);
    for (int d = 0; d < depth; d++)
        for (int i = 0; i < nconns; i++) send_next(&conns[i]);

    struct epoll_event events[256];
    int live = nconns;
    while (live > 0) {
        uint64_t t = now_ns();
        if (!stopping && t >= stop_at) stopping = 1;
        if (t >= give_up) break;
        if (answered + n_lost >= issued && (stopping || (max_requests && issued >= max_requests) ||
                                   (once && shared_cursor >= nkeys)))
            break;
        int n = epoll_wait(ep, events, 256, 100);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        t = now_ns();
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (c->len == c->cap) {
                c->cap *= 2;
                c->buf = realloc(c->buf, c->cap);
            }
            ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r > 0) {
                c->len += (size_t)r;
                int got = parse_replies(c, t);
                if (t >= stop_at) stopping = 1;
                for (int g = 0; g < got; g++) send_next(c);
            }
            if (r <= 0 || c->dead) { /* closed by the server, or a malformed reply */
                if (r <= 0) n_errors++;
                n_lost += c->count;
                c->count = 0;
                c->dead = 1;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                live--;
            }
        }
    }
    uint64_t t1 = now_ns();
    double cpu = cpu_seconds() - cpu0;
    uint64_t unanswered = issued - answered;  /* lost ones included */
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    printf("{\"requests\": %llu, \"answered\": %llu, \"unanswered\": %llu, \"elapsed\": %.6f,"
           " \"client_cpu\": %.6f, \"ok\": %llu, \"notfound\": %llu, \"temp\": %llu,"
           " \"other\": %llu, \"errors\": %llu, \"p50_us\": %.1f, \"p90_us\": %.1f,"
           " \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f}\n",
           (unsigned long long)issued, (unsigned long long)answered,
           (unsigned long long)unanswered, (t1 - t0) / 1e9, cpu, (unsigned long long)n_ok,
           (unsigned long long)n_notfound, (unsigned long long)n_temp,
           (unsigned long long)n_other, (unsigned long long)n_errors, pct(0.50), pct(0.90),
           pct(0.99), pct(0.999), nlat ? lat[nlat - 1] / 1000.0 : 0.0);
    for (int i = 0; i < nconns; i++) close(conns[i].fd);
    return 0;
}
