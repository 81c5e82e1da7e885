#!/usr/bin/env python3
"""The hosts of scripts/lab-cluster, run inside its namespaces; every loop is bounded.

  server NAME --port 8080 --lifetime S      echo server ("whoami" answered with NAME)
  client --vip ADDR --connections C ...     C long-lived connections, each sending a line every
                                            --interval and expecting it back; writes JSON
  report --result JSON --phases FILE        per-phase figures and the final line
"""

import argparse
import errno
import os
import json
import selectors
import socket
import sys
import time


def say(msg):
    sys.stdout.write(f"[  cluster] {msg}\n")
    sys.stdout.flush()


def server(a):
    sel = selectors.DefaultSelector()
    # One dual-stack socket: IPv4 and IPv6 clients alike.
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", a.port))
    ls.listen(1024)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, None)
    end = time.monotonic() + a.lifetime
    bufs = {}
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.5):
            if key.data is None:
                try:
                    c, _ = ls.accept()
                except OSError:
                    continue
                c.setblocking(False)
                bufs[c] = b""
                sel.register(c, selectors.EVENT_READ, "conn")
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                bufs.pop(c, None)
                c.close()
                continue
            buf = bufs[c] + data
            *lines, bufs[c] = buf.split(b"\n")
            out = b"".join(
                (a.name.encode() if ln == b"whoami" else ln) + b"\n" for ln in lines
            )
            try:
                c.sendall(out)
            except OSError:
                pass


class Conn:
    def __init__(self, i, sock, now):
        self.i = i
        self.sock = sock
        self.buf = b""
        self.backend = None
        self.opened = now
        self.echoes = []
        self.sent = 0
        self.answered = 0
        self.next_send = now
        self.died = None
        self.why = None


def client(a):
    sel = selectors.DefaultSelector()
    conns = []
    t_end = time.time() + a.duration
    # Open the connections, paced.
    for i in range(a.connections):
        s = socket.socket(socket.AF_INET6 if ":" in a.vip else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((a.vip, a.port))
            s.sendall(b"whoami\n")
        except OSError as e:
            say(f"connection {i}: could not open: {e}")
            s.close()
            continue
        s.setblocking(False)
        c = Conn(i, s, time.time())
        c.next_send = time.time() + a.interval * (i % 10) / 10
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)
        time.sleep(1.0 / a.open_rate)
    say(f"{len(conns)} of {a.connections} connections open")
    if a.ready:
        open(a.ready, "w").write(f"{len(conns)}\n")

    def die(c, why, now):
        if c.died is None:
            c.died, c.why = now, why
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()

    while time.time() < t_end and not (a.stop and os.path.exists(a.stop)):
        now = time.time()
        for c in conns:
            if c.died is not None:
                continue
            if now >= c.next_send:
                c.next_send = now + a.interval
                try:
                    c.sock.send(f"p{c.sent}\n".encode())
                    c.sent += 1
                except BlockingIOError:
                    pass
                except OSError as e:
                    die(c, errno.errorcode.get(e.errno, str(e)), now)
                    continue
            last = c.echoes[-1] if c.echoes else c.opened
            if now - last > a.stall_limit:
                die(c, f"no answer for {a.stall_limit:.0f}s", now)
        for key, _ in sel.select(timeout=0.01):
            c = key.data
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                die(c, errno.errorcode.get(e.errno, str(e)), time.time())
                continue
            if not data:
                die(c, "closed by the peer", time.time())
                continue
            *lines, c.buf = (c.buf + data).split(b"\n")
            t = time.time()
            for ln in lines:
                if c.backend is None:
                    c.backend = ln.decode(errors="replace")
                else:
                    c.answered += 1
                c.echoes.append(t)
    alive = sum(1 for c in conns if c.died is None)
    say(f"done: {alive} of {len(conns)} connections alive")
    json.dump(
        [
            {
                "i": c.i,
                "backend": c.backend,
                "opened": c.opened,
                "died": c.died,
                "why": c.why,
                "sent": c.sent,
                "answered": c.answered,
                "echoes": [round(x, 4) for x in c.echoes],
            }
            for c in conns
        ],
        open(a.out, "w"),
    )


def report(a):
    conns = [c for path in a.result for c in json.load(open(path))]
    label = "outbound " if a.outbound else ""
    phases = []
    for ln in open(a.phases):
        name, t = ln.split()
        phases.append((name, float(t)))
    ends = [t for _, t in phases[1:]] + [float("inf")]
    interval = a.interval
    total = len(conns)
    figures = {}
    for (name, start), end in zip(phases, ends):
        lost = [c for c in conns if c["died"] is not None and start <= c["died"] < end]
        # The longest silence of a connection alive at the phase's start that spans it.
        worst = 0.0
        for c in conns:
            if c["opened"] > start or (c["died"] is not None and c["died"] < start):
                continue
            before = [t for t in c["echoes"] if t <= start]
            after = [t for t in c["echoes"] if start < t < end]
            if not after:
                continue
            last = before[-1] if before else c["opened"]
            worst = max(worst, after[0] - last)
        failover_ms = max(0.0, worst - interval) * 1000
        whys = sorted({c["why"] for c in lost})
        figures[name] = (len(lost), failover_ms)
        say(
            f"{label}phase {name:<10} lost={len(lost):<4} longest_silence_ms={failover_ms:7.0f}"
            + (f"  ({', '.join(whys)})" if whys else "")
        )
    if a.outbound:
        lost = sum(1 for c in conns if c["died"] is not None)
        say(f"outbound (SNAT, per-node addresses): connections={total} lost={lost}")
        return
    backends = {}
    for c in conns:
        backends[c["backend"]] = backends.get(c["backend"], 0) + 1
    say(f"connections by backend: {dict(sorted(backends.items(), key=lambda x: str(x[0])))}")
    lost_loss = figures.get("node_loss", (0, 0))[0] + figures.get("node_back", (0, 0))[0]
    lost_add = figures.get("node_add", (0, 0))[0]
    failover = figures.get("node_loss", (0, 0.0))[1]
    print(
        f"cluster: nodes={a.nodes} connections={total} lost_on_node_loss={lost_loss} "
        f"lost_on_node_add={lost_add} failover_ms={failover:.0f}"
    )


def compare(a):
    """Connections listed by several nodes (it moved between them): the backend must agree."""
    seen = {}
    for path in a.flows:
        for f in json.load(open(path))["flows"]:
            seen.setdefault(f["client"], {})[path] = f["translated_destination"]
    shared = {c: v for c, v in seen.items() if len(v) > 1}
    disagree = [c for c, v in shared.items() if len(set(v.values())) > 1]
    say(
        f"same backend on every node: connections listed by 2+ nodes={len(shared)} "
        f"disagree={len(disagree)}"
    )
    for c in disagree[:5]:
        say(f"  {c}: {shared[c]}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("name")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--lifetime", type=float, default=300)
    c = sub.add_parser("client")
    c.add_argument("--vip", required=True)
    c.add_argument("--port", type=int, default=80)
    c.add_argument("--connections", type=int, default=100)
    c.add_argument("--interval", type=float, default=0.2)
    c.add_argument("--duration", type=float, default=60)
    c.add_argument("--open-rate", type=float, default=100)
    c.add_argument("--stall-limit", type=float, default=15)
    c.add_argument("--ready")
    c.add_argument("--stop")
    c.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--result", required=True, nargs="+")
    r.add_argument("--outbound", action="store_true")
    r.add_argument("--phases", required=True)
    r.add_argument("--interval", type=float, default=0.2)
    r.add_argument("--nodes", type=int, default=4)
    m = sub.add_parser("compare")
    m.add_argument("flows", nargs="+")
    a = ap.parse_args()
    a.duration = min(a.duration, 600) if a.cmd == "client" else 0
    {"server": server, "client": client, "report": report, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    main()
