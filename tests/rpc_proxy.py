"""A stand-in for an rpc-server of another fork commit: a TCP proxy in front of a real rpc-server that
renumbers tensor types in the client's requests, as a server whose ggml enum numbers the types differently
would read them.

ggml RPC requests are ``| cmd (1 byte) | size (uint64) | payload |`` (fork 69d8e4be4,
ggml/src/ggml-rpc/ggml-rpc.cpp, send_rpc_cmd); a tensor travels as a packed ``rpc_tensor`` of 296 bytes
whose ``type`` (uint32) sits at byte 8. The commands that carry tensors, and where (RPC_CMD_* numbers):
SET_TENSOR 6, SET_TENSOR_HASH 7, GET_TENSOR 8, INIT_TENSOR 12 at 0; COPY_TENSOR 9 at 0 and 296;
GET_ALLOC_SIZE 13 at 4 + k*296 (k < 11); GRAPH_COMPUTE 10 after | device u32 | n_nodes u32 | nodes u64 * n |
n_tensors u32 |. Replies are passed through unchanged.
"""
from __future__ import annotations

import socket
import struct
import threading

TENSOR = 296
TYPE_AT = 8


def _tensor_offsets(cmd: int, payload: bytes) -> list[int]:
    if cmd in (6, 7, 8, 12):
        return [0]
    if cmd == 9:
        return [0, TENSOR]
    if cmd == 13:
        return [4 + k * TENSOR for k in range(11) if 4 + (k + 1) * TENSOR <= len(payload)]
    if cmd == 10 and len(payload) >= 8:
        n_nodes = struct.unpack_from("<I", payload, 4)[0]
        at = 8 + 8 * n_nodes
        n_tensors = struct.unpack_from("<I", payload, at)[0]
        return [at + 4 + k * TENSOR for k in range(n_tensors)]
    return []


def rewrite(cmd: int, payload: bytes, type_map: dict[int, int]) -> bytes:
    """The payload with every tensor type renumbered through ``type_map`` (types not in it unchanged)."""
    buf = bytearray(payload)
    for off in _tensor_offsets(cmd, payload):
        if off + TYPE_AT + 4 <= len(buf):
            t = struct.unpack_from("<I", buf, off + TYPE_AT)[0]
            if t in type_map:
                struct.pack_into("<I", buf, off + TYPE_AT, type_map[t])
    return bytes(buf)


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError
        out += chunk
    return out


class ShiftingProxy:
    """Listen on 127.0.0.1 (a free port) and forward every connection to ``upstream`` ('host:port'),
    renumbering tensor types with ``type_map``. ``endpoint`` is what to pass to --rpc."""

    def __init__(self, upstream: str, type_map: dict[int, int]):
        self.upstream = upstream
        self.type_map = dict(type_map)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.rewritten = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            host, _, port = self.upstream.rpartition(":")
            server = socket.create_connection((host, int(port)))
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client), daemon=True).start()

    def _requests(self, client, server):
        try:
            while True:
                cmd = _recv(client, 1)[0]
                size = struct.unpack("<Q", _recv(client, 8))[0]
                payload = _recv(client, size)
                new = rewrite(cmd, payload, self.type_map)
                self.rewritten += new != payload
                server.sendall(bytes([cmd]) + struct.pack("<Q", size) + new)
        except (ConnectionError, OSError):
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _replies(self, server, client):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()
