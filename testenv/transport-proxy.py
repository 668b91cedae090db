#!/usr/bin/env python3
"""The search cluster's transport links, through loopback proxies that can cut
one node off from the others (a network partition), for testenv.

Usage: transport-proxy.py CONTROL_FILE LISTEN:TARGET:PIDFILE...

Node i publishes LISTEN_i as its transport address, so every connection
between two nodes passes through the proxy of the node it goes to. The proxy
tells which node opened a connection by finding the peer's socket among the
node processes' open files (/proc). CONTROL_FILE holds the index of the node
that is cut off (or nothing): its connections in both directions are closed
and new ones refused until the file is emptied. Clients that are not nodes
(curl, tests) are never cut.
"""
import asyncio
import os
import sys


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


class Proxy:
    def __init__(self, control, routes):
        self.control = control
        self.routes = routes  # [(listen, target, pidfile)]
        self.isolated = read_isolated(control)
        self.links = set()  # (from_node, to_node, writers)

    def cut(self, a, b):
        return self.isolated is not None and a != b and self.isolated in (a, b)

    async def serve(self, node, reader, writer):
        listen, target, _ = self.routes[node]
        peer_port = writer.get_extra_info("peername")[1]
        origin = owner_node(socket_inode(peer_port, listen), [r[2] for r in self.routes])
        if self.cut(origin, node):
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        link = (origin, node, writer, up_writer)
        self.links.add(link)

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
            self.links.discard(link)
            writer.close()
            up_writer.close()

    async def watch(self):
        while True:
            isolated = read_isolated(self.control)
            if isolated != self.isolated:
                self.isolated = isolated
                print(f"transport-proxy: isolated node: {isolated}", flush=True)
                for origin, node, w1, w2 in list(self.links):
                    if self.cut(origin, node):
                        w1.transport.abort()
                        w2.transport.abort()
            await asyncio.sleep(0.05)

    async def run(self):
        for node, (listen, _, _) in enumerate(self.routes):
            await asyncio.start_server(
                lambda r, w, node=node: self.serve(node, r, w), "127.0.0.1", listen, reuse_address=True
            )
        print("transport-proxy: listening on", [r[0] for r in self.routes], flush=True)
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
