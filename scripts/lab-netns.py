#!/usr/bin/env python3
"""The hosts of scripts/lab-netns: small servers and clients, run inside its namespaces.

Every loop here is bounded in count and time. Output lines start with the host's name so that
the narration reads as one story.

  server   NAME --tcp 8080,22 --udp 5353   echo servers (a line "whoami" is answered with NAME)
  internet NAME --tcp 80                   tells each client the address it sees
  client   NAME ACTION [...]               lb | reset | keepalive | silent | udp | nat | outbound
"""

import argparse
import errno
import socket
import sys
import threading
import time

T0 = time.monotonic()


def say(name, msg):
    sys.stdout.write(f"[{name:>9}] {msg}\n")
    sys.stdout.flush()


def ep(addr):
    return f"{addr[0]}:{addr[1]}"


def serve_tcp_conn(name, conn, peer, port):
    conn.settimeout(60)
    opened = time.monotonic()
    try:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            if data.strip() == b"whoami":
                conn.sendall(name.encode() + b"\n")
            else:
                conn.sendall(data)
    except ConnectionResetError:
        say(name, f"{ep(peer)} -> :{port}: recv() failed with ECONNRESET after "
                  f"{time.monotonic() - opened:.1f}s (the load balancer reset the idle connection)")
    except socket.timeout:
        say(name, f"{ep(peer)} -> :{port}: idle for 60s, closing")
    except OSError as e:
        say(name, f"{ep(peer)} -> :{port}: {e}")
    finally:
        conn.close()


def tcp_listener(name, port, handler):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=handler, args=(name, conn, peer, port), daemon=True).start()


def udp_echo(name, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(2048)
        say(name, f"UDP {ep(peer)} -> :{port} {data!r}")
        s.sendto(name.encode() + b":" + data, peer)


def tell_peer(name, conn, peer, port):
    say(name, f"connection to :{port} from {ep(peer)}")
    try:
        conn.sendall(f"you are {ep(peer)}\n".encode())
        conn.recv(64)
    except OSError:
        pass
    finally:
        conn.close()


def run_servers(name, tcp, udp, handler, lifetime):
    for p in tcp:
        threading.Thread(target=tcp_listener, args=(name, p, handler), daemon=True).start()
    for p in udp:
        threading.Thread(target=udp_echo, args=(name, p), daemon=True).start()
    # Bounded: the lab tears us down long before, but never run forever.
    time.sleep(lifetime)


def connect(addr, port, timeout=3.0, keepalive=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if keepalive:
        idle, intvl = keepalive
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
    s.settimeout(timeout)
    s.connect((addr, port))
    return s


def echo(s, payload):
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def client(a):
    name, vip = a.name, a.vip
    if a.action == "lb":
        seen = {}
        ok = 0
        for i in range(a.count):
            s = connect(vip, 80)
            who = echo(s, b"whoami\n").strip().decode()
            payload = f"connection {i}: {'x' * (i * 37)}\n".encode()
            if echo(s, payload) == payload:
                ok += 1
            s.close()
            seen[who] = seen.get(who, 0) + 1
        say(name, f"{a.count} connections to {vip}:80: {ok} echoed intact; by backend: {seen}")
    elif a.action == "reset":
        s = connect(vip, 80)
        echo(s, b"hello\n")
        s.settimeout(a.wait)
        say(name, f"connected to {vip}:80 (rule with tcp_reset), echo ok; now idle, blocked in recv()")
        t = time.monotonic()
        try:
            data = s.recv(100)
            say(name, f"recv() returned {data!r} after {time.monotonic() - t:.1f}s (unexpected)")
        except ConnectionResetError:
            say(name, f"recv() failed with ECONNRESET after {time.monotonic() - t:.1f}s idle: "
                      "reset on idle, as configured")
        except socket.timeout:
            say(name, f"no reset within {a.wait}s (unexpected)")
    elif a.action == "keepalive":
        s = connect(vip, 80, keepalive=(a.idle, a.intvl))
        echo(s, b"hello\n")
        say(name, f"connected to {vip}:80 with SO_KEEPALIVE (TCP_KEEPIDLE={a.idle}s "
                  f"TCP_KEEPINTVL={a.intvl}s); idle for {a.wait}s")
        time.sleep(a.wait)
        try:
            got = echo(s, b"still there?\n")
            say(name, f"after {a.wait}s idle (keepalives only) the echo came back: {got!r}")
        except OSError as e:
            say(name, f"after {a.wait}s: {e} (unexpected)")
    elif a.action == "silent":
        s = connect(vip, a.port)
        echo(s, b"hello\n")
        say(name, f"connected to {vip}:{a.port} (silent rule), echo ok; idle for {a.wait}s")
        time.sleep(a.wait)
        # Give up quickly instead of after ~15 minutes of retransmissions.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(a.answer * 1000))
        s.settimeout(a.answer + 1)
        t = time.monotonic()
        try:
            s.sendall(b"anyone?\n")
            data = s.recv(100)
            say(name, f"late send answered with {data!r} (unexpected)")
        except socket.timeout:
            say(name, f"late send: no answer in {time.monotonic() - t:.1f}s "
                      "(the flow expired silently; the retransmissions go nowhere)")
        except OSError as e:
            code = errno.errorcode.get(e.errno, e.errno)
            say(name, f"late send: no answer, gave up after {time.monotonic() - t:.1f}s "
                      f"({code}: the flow expired silently)")
    elif a.action == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"query", (vip, 53))
        data, peer = s.recvfrom(2048)
        say(name, f"UDP {vip}:53 answered {data!r} from {ep(peer)}")
    elif a.action == "nat":
        s = connect(vip, a.port)
        who = echo(s, b"whoami\n").strip().decode()
        say(name, f"{vip}:{a.port} (inbound NAT) reached {who}")
    elif a.action == "outbound":
        s = connect(a.remote, 80, timeout=4)
        line = s.recv(100).decode().strip()
        say(name, f"connected to {a.remote}:80 from {ep(s.getsockname())}; the internet says: {line}")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("server")
    sv.add_argument("name")
    sv.add_argument("--tcp", default="")
    sv.add_argument("--udp", default="")
    sv.add_argument("--lifetime", type=float, default=600)
    it = sub.add_parser("internet")
    it.add_argument("name")
    it.add_argument("--tcp", default="80")
    it.add_argument("--lifetime", type=float, default=600)
    cl = sub.add_parser("client")
    cl.add_argument("name")
    cl.add_argument("action")
    cl.add_argument("--vip", default="198.18.0.100")
    cl.add_argument("--port", type=int, default=80)
    cl.add_argument("--count", type=int, default=10)
    cl.add_argument("--wait", type=float, default=8)
    cl.add_argument("--idle", type=int, default=1)
    cl.add_argument("--intvl", type=int, default=1)
    cl.add_argument("--answer", type=float, default=3)
    cl.add_argument("--remote", default="198.19.0.50")
    a = p.parse_args()
    ports = lambda s: [int(x) for x in s.split(",") if x]
    if a.cmd == "server":
        run_servers(a.name, ports(a.tcp), ports(a.udp), serve_tcp_conn, a.lifetime)
    elif a.cmd == "internet":
        run_servers(a.name, ports(a.tcp), [], tell_peer, a.lifetime)
    else:
        try:
            return client(a)
        except OSError as e:
            say(a.name, f"{a.action}: {e}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
