// The floor of a TCP health check on this machine (figure 9): a bare loop that makes the
// same checks as dynagate's checker — same pace, same system calls, nothing else — so the
// figure can tell the checker's own cost from the kernel's cost of a TCP handshake.
//
//   tcp_check_floor HOST FIRST_PORT NPORTS RATE SECONDS half|full
//
// RATE checks a second in 5 ms steps over NPORTS ports from FIRST_PORT, for SECONDS. Like
// the checker: non-blocking sockets kept and reused (`connect(AF_UNSPEC)` after each check),
// each bound once to a source port of its own; "half" holds back the handshake's last ACK
// (TCP_DEFER_ACCEPT on the connecting socket) so the check ends right after the SYN-ACK;
// a check is a connect, a second connect that reports the outcome (EISCONN when the
// SYN-ACK came during the first, as on loopback), else epoll until writable; then the
// reset. Prints one JSON line: checks/s, CPU of this process (% of one core), counts.
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static int new_socket(int half) {
  int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  if (s < 0) return -1;
  if (half) setsockopt(s, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof one);
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in any = {.sin_family = AF_INET};
  bind(s, (struct sockaddr *)&any, sizeof any);  // a source port of its own, kept
  return s;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s HOST FIRST_PORT NPORTS RATE SECONDS half|full\n", argv[0]);
    return 2;
  }
  struct sockaddr_in to = {.sin_family = AF_INET};
  if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
    fprintf(stderr, "bad host %s\n", argv[1]);
    return 2;
  }
  int first = atoi(argv[2]), nports = atoi(argv[3]), rate = atoi(argv[4]);
  double secs = atof(argv[5]);
  int half = strcmp(argv[6], "half") == 0;
  if (nports < 1 || rate < 200 || secs <= 0) {
    fprintf(stderr, "bad arguments\n");
    return 2;
  }
  enum { POOL = 4096 };
  int pool[POOL], free_n = 0;
  for (int i = 0; i < POOL; i++) {
    int s = new_socket(half);
    if (s < 0) { perror("socket"); return 1; }
    pool[free_n++] = s;
  }
  int ep = epoll_create1(0);
  struct sockaddr unspec;
  memset(&unspec, 0, sizeof unspec);
  unspec.sa_family = AF_UNSPEC;
  struct epoll_event evs[256];
  long done = 0, inline_n = 0, via_epoll = 0, failed = 0, k = 0;
  double c0 = cpu_seconds(), t0 = now(), next = t0;
  int per_step = rate / 200;
  while (now() - t0 < secs) {
    for (int j = 0; j < per_step && free_n; j++, k++) {
      int s = pool[--free_n];
      to.sin_port = htons(first + k % nports);
      int r = connect(s, (struct sockaddr *)&to, sizeof to);
      if (r < 0 && errno == EINPROGRESS) {
        r = connect(s, (struct sockaddr *)&to, sizeof to);
        if (r < 0 && errno == EISCONN) r = 0;
      }
      if (r == 0) {
        inline_n++, done++;
        connect(s, &unspec, sizeof unspec);
        pool[free_n++] = s;
      } else if (errno == EALREADY || errno == EINPROGRESS) {
        struct epoll_event e = {.events = EPOLLOUT, .data.fd = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
      } else {
        failed++;
        connect(s, &unspec, sizeof unspec);
        pool[free_n++] = s;
      }
    }
    next += 0.005;
    for (;;) {
      double left = next - now();
      if (left <= 0) break;
      int n = epoll_wait(ep, evs, 256, (int)(left * 1000) + 1);
      for (int i = 0; i < n; i++) {
        int s = evs[i].data.fd;
        int r = connect(s, (struct sockaddr *)&to, sizeof to);
        epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
        if (r == 0 || errno == EISCONN) via_epoll++, done++;
        else failed++;
        connect(s, &unspec, sizeof unspec);
        pool[free_n++] = s;
      }
    }
  }
  double t1 = now(), c1 = cpu_seconds();
  printf("{\"checks_per_s\": %.1f, \"cpu_pct\": %.3f, \"us_per_check\": %.3f, \"inline\": %ld, "
         "\"via_epoll\": %ld, \"failed\": %ld, \"secs\": %.3f}\n",
         done / (t1 - t0), 100 * (c1 - c0) / (t1 - t0), done ? 1e6 * (c1 - c0) / done : 0.0,
         inline_n, via_epoll, failed, t1 - t0);
  return 0;
}
