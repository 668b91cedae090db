#!/usr/bin/env python3
"""The search cluster's transport links, through loopback proxies that can cut
one node off from the others (a network partition), for testenv.

Usage: transport-proxy.py CONTROL_FILE LISTEN:TARGET:PIDFILE...

Node i publishes LISTEN_i as its transport address, so every connection
between two nodes passes through the proxy of the node it goes to. The proxy
tells which node opened a connection by finding the peer's socket among the
node processes' open files (/proc). CONTROL_FILE holds the index of the node
that is cut off (or nothing): its connections in both directions are closed
and new ones refused until the file is emptied.

While a partition is active the proxy fails closed: a connection it cannot
attribute to a node is closed (at the partition's start) or refused (after),
since it could be the cut-off node's, and keeping it would leave a one-way
link that a real partition does not have. Every decision is logged with the
connection's attribution (open, close, keep, cut, refuse).
"""
import asyncio
import os
import sys
import time


def read_isolated(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def socket_inode(peer_port, listen_port):
    """The inode of the connecting socket (local port peer_port, remote port listen_port)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, inode = fields[1], fields[2], fields[9]
                    if int(local.rsplit(":", 1)[1], 16) == peer_port and int(remote.rsplit(":", 1)[1], 16) == listen_port:
                        return inode
        except OSError:
            pass
    return None


def owner_node(inode, pidfiles):
    """Which node process holds socket `inode`, if any."""
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for node, pidfile in enumerate(pidfiles):
        try:
            with open(pidfile) as f:
                pid = f.read().strip()
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") == wanted:
                        return node
                except OSError:
                    continue
        except OSError:
            continue
    return None


def log(message):
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    print(f"[{stamp},{int(now * 1000) % 1000:03d}] transport-proxy: {message}", flush=True)


def node_name(node):
    return "unattributed" if node is None else f"opensearch-{node}"


class Proxy:
    def __init__(self, control, routes):
        self.control = control
        self.routes = routes  # [(listen, target, pidfile)]
        self.isolated = read_isolated(control)
        self.links = set()  # (origin node or None, target node, peer port, client writer, upstream writer)

    def cut(self, origin, node):
        """True when a link origin -> node must not exist now. Fails closed:
        while a partition is active, a link not known to be between two
        nodes on the same side is cut."""
        if self.isolated is None:
            return False
        if origin is None:
            return True
        return origin != node and self.isolated in (origin, node)

    async def attribute(self, peer_port, listen):
        """The node that opened the connection from peer_port and, when none
        is found, why; a few tries, since a node's fd table may be read
        while it changes."""
        pidfiles = [r[2] for r in self.routes]
        for _ in range(5):
            inode = socket_inode(peer_port, listen)
            origin = owner_node(inode, pidfiles)
            if origin is not None:
                return origin, ""
            await asyncio.sleep(0.01)
        why = "its socket is gone from /proc/net/tcp" if inode is None else f"no node holds socket {inode}"
        return None, f" ({why})"

    def describe(self, origin, node, peer_port):
        return f"{node_name(origin)} -> {node_name(node)} (peer port {peer_port})"

    async def serve(self, node, reader, writer):
        listen, target, _ = self.routes[node]
        peer_port = writer.get_extra_info("peername")[1]
        origin, why = await self.attribute(peer_port, listen)
        what = self.describe(origin, node, peer_port) + why
        if self.cut(origin, node):
            log(f"refuse {what}: opensearch-{self.isolated} is cut off")
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError as e:
            log(f"refuse {what}: {node_name(node)} does not answer ({e})")
            writer.transport.abort()
            return
        # the partition may have begun while the link was being set up
        if self.cut(origin, node):
            log(f"refuse {what}: opensearch-{self.isolated} is cut off")
            writer.transport.abort()
            up_writer.transport.abort()
            return
        link = (origin, node, peer_port, writer, up_writer)
        self.links.add(link)
        log(f"open {what}")

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            if link in self.links:
                self.links.discard(link)
                log(f"close {what}")
            writer.close()
            up_writer.close()

    async def watch(self):
        while True:
            isolated = read_isolated(self.control)
            if isolated != self.isolated:
                self.isolated = isolated
                side = f"opensearch-{isolated} is cut off" if isolated is not None else "healed"
                log(f"partition: {side}; {len(self.links)} open links")
                for link in list(self.links):
                    origin, node, peer_port, client, upstream = link
                    what = self.describe(origin, node, peer_port)
                    if self.cut(origin, node):
                        self.links.discard(link)
                        log(f"cut {what}")
                        client.transport.abort()
                        upstream.transport.abort()
                    else:
                        log(f"keep {what}")
            await asyncio.sleep(0.05)

    async def run(self):
        for node, (listen, _, _) in enumerate(self.routes):
            await asyncio.start_server(
                lambda r, w, node=node: self.serve(node, r, w), "127.0.0.1", listen, reuse_address=True
            )
        log(f"listening on {[r[0] for r in self.routes]}; cut off: {node_name(self.isolated) if self.isolated is not None else 'none'}")
        await self.watch()


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: transport-proxy.py CONTROL_FILE LISTEN:TARGET:PIDFILE...")
    routes = []
    for spec in sys.argv[2:]:
        listen, target, pidfile = spec.split(":", 2)
        routes.append((int(listen), int(target), pidfile))
    asyncio.run(Proxy(sys.argv[1], routes).run())


if __name__ == "__main__":
    main()
