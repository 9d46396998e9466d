#!/usr/bin/env python3
"""Streaming origin for figure 7: `sink.py PORT BIGFILE`.

GET /         -> small body
GET /big      -> BIGFILE via sendfile(2) (a sparse file: served from the page cache)
PUT|POST any  -> reads the whole body (Content-Length or chunked) into one reused 1 MiB
                 buffer, then answers 200 with the byte count. Keep-alive; one thread per
                 connection.
"""
import os
import socket
import sys
import threading

BUF = 1 << 20


def read_head(sock, pending):
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        pending += chunk
    head, rest = pending.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return (method, path, headers), rest


def drain(sock, n, rest, buf):
    """Consume n body bytes (rest first); return leftover bytes past the body."""
    take = min(n, len(rest))
    n -= take
    rest = rest[take:]
    view = memoryview(buf)
    while n > 0:
        got = sock.recv_into(view, min(n, BUF))
        if not got:
            raise ConnectionError("eof in body")
        n -= got
    return rest


def read_chunked(sock, rest, buf):
    total = 0
    while True:
        while b"\r\n" not in rest:
            rest += sock.recv(65536)
        line, rest = rest.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while b"\r\n" not in rest:       # trailers: assume none
                rest += sock.recv(65536)
            return total, rest.split(b"\r\n", 1)[1]
        rest = drain(sock, size + 2, rest, buf)
        total += size


def serve(sock, bigfile):
    buf = bytearray(BUF)
    pending = b""
    try:
        while True:
            req, pending = read_head(sock, pending)
            if req is None:
                return
            method, path, h = req
            if method in ("PUT", "POST"):
                if h.get("transfer-encoding", "").lower() == "chunked":
                    n, pending = read_chunked(sock, pending, buf)
                else:
                    n = int(h.get("content-length", "0"))
                    pending = drain(sock, n, pending, buf)
                body = f'{{"received":{n}}}\n'.encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
            elif path.startswith("/big"):
                size = os.path.getsize(bigfile)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                with open(bigfile, "rb") as f:
                    sock.sendfile(f)
            else:
                body = b"hello from origin\n"
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
    except (ConnectionError, OSError):
        pass
    finally:
        sock.close()


def main():
    port, bigfile = int(sys.argv[1]), sys.argv[2]
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    while True:
        s, _ = ls.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(s, bigfile), daemon=True).start()


if __name__ == "__main__":
    main()
