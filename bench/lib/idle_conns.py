#!/usr/bin/env python3
"""Open N keep-alive connections to 127.0.0.1:PORT, make one request on each (so each is a
real, used HTTP/1.1 keep-alive connection), then hold them idle.

`idle_conns.py PORT N HOST` prints `READY <open> <failed>` once all are established and
answered, then waits until stdin closes (or HOLD seconds pass), then closes them.
"""
import asyncio
import sys

PORT, N, HOST = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
HOLD = 120
BATCH = 200


async def one(conns):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), 10)
        w.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await asyncio.wait_for(r.readexactly(length), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            w.close()
            return False
        conns.append((r, w))
        return True
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False


async def main():
    conns = []
    failed = 0
    for i in range(0, N, BATCH):
        res = await asyncio.gather(*(one(conns) for _ in range(min(BATCH, N - i))))
        failed += res.count(False)
    print(f"READY {len(conns)} {failed}", flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    await asyncio.wait([stdin_closed], timeout=HOLD)
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
