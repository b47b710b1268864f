#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ from frames of
docs/protocol.md (its worked example, byte for byte, and the frames around
it), encoded here by hand so that the seeds do not come from the code under
test. Run again after a protocol change; libFuzzer grows each corpus from
these (scripts/fuzz)."""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    """A varint (int), length-delimited (bytes/str) or nested (list of fields) field."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, list):
        value = b"".join(value)
    return varint(num << 3 | 2) + varint(len(value)) + value


def frame(body):
    return struct.pack(">I", len(body)) + body


def client(request_id, kind, fields):
    return frame((field(1, request_id) if request_id else b"") + field(kind, fields))


HELLO = client(1, 2, [field(1, 1), field(2, 1), field(3, "x")])
assert HELLO.hex() == "0000000b0801120708011001 1a0178".replace(" ", ""), HELLO.hex()
AUTH = client(2, 3, [field(1, "T"), field(2, "phone"), field(3, 41)])
ACK = client(0, 5, [field(1, 42)])
OPEN = client(3, 9, [field(1, "bob")])
SEND_TEXT = client(4, 4, [field(1, "6f1c"), field(2, 2), field(3, [field(1, "hi")])])
SEND_GROUP = client(5, 4, [field(1, "6f1d"), field(2, 1), field(3, [field(1, "hello all")])])
SEND_MEDIA = client(6, 4, [field(1, "6f1e"), field(2, 2),
                           field(3, [field(2, [field(1, 1), field(2, "https://m/x.jpg"),
                                               field(3, "image/jpeg"), field(4, 1234)])])])
SEND_EMPTY = client(7, 4, [field(1, "6f1f"), field(2, 2), field(3, [])])
PING = client(8, 6, [field(1, 1)])
SYNC = client(9, 7, [field(1, 0)])
HISTORY = client(10, 8, [field(1, 1), field(2, 0), field(3, 1), field(4, 50)])
GROUP = client(11, 10, [field(1, "team"), field(2, "bob"), field(2, "carol")])
ADD = client(12, 11, [field(1, 1), field(2, "dave")])
REMOVE = client(13, 12, [field(1, 1), field(2, "carol")])
LEAVE = client(14, 13, [field(1, 1)])
LIST = client(15, 14, [])
BLOCK = client(16, 15, [field(1, "bob")])
UNBLOCK = client(17, 16, [field(1, "bob")])
DEVICES = client(18, 17, [])
LOG_OUT = client(19, 18, [field(1, "laptop")])
REFRESH = client(20, 19, [field(1, "pr1.616c696365.70686f6e65." + "00" * 32)])
OVERSIZED = struct.pack(">I", 1 << 30)
GARBLED = frame(b"\x08\x05\x12\xff\xff")

AFTER_LOGIN = [ACK, OPEN, SEND_TEXT, SEND_GROUP, SEND_MEDIA, SEND_EMPTY, PING, SYNC,
               HISTORY, GROUP, ADD, REMOVE, LEAVE, LIST, BLOCK, UNBLOCK, DEVICES, REFRESH, LOG_OUT]
SESSION = b"".join(AFTER_LOGIN)


def server(request_id, kind, fields):
    return frame((field(1, request_id) if request_id else b"") + field(kind, fields))


HELLO_OK = server(1, 2, [field(1, 1), field(2, "parley/0.1.0"), field(3, 65536),
                         field(4, 30000), field(5, 90000)])
DELIVER = server(0, 5, [field(1, 42), field(2, [field(1, 977), field(2, 7), field(3, 12),
                                                field(4, "bob"), field(6, "x"),
                                                field(7, [field(1, "hi")])])])
ERROR = server(4, 12, [field(1, 3), field(2, "not a member")])


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for i, piece in enumerate([1, 4, 64, 127]):
    step = piece << 1
    write("frame_codec", f"client-{piece}", bytes([step]) + HELLO + AUTH + SESSION)
    write("frame_codec", f"server-{piece}", bytes([step | 1]) + HELLO_OK + DELIVER + ERROR)
write("frame_codec", "oversized", b"\x00" + OVERSIZED)
write("frame_codec", "garbled", b"\x02" + GARBLED)

write("connection", "worked-example", b"\x00" + HELLO + AUTH + ACK + OPEN + SEND_TEXT + PING)
write("connection", "session", b"\x01" + SESSION)
write("connection", "before-login", b"\x00" + SEND_TEXT + HELLO + HELLO)
write("connection", "oversized", b"\x01" + OVERSIZED)
write("connection", "garbled", b"\x01" + GARBLED + PING)

write("websocket", "messages", b"\x03" + SESSION)
write("websocket", "raw-login", b"\x01")
write("websocket", "raw-close", b"\x01\x88\x82\x00\x00\x00\x00\x03\xe8")

for who in range(4):
    write("requests", f"session-{who}", bytes([who]) + SESSION)

write("token", "garbled", b"\x00not.a.token")
now = 1795000000
for name, claims in {
    "valid": {"sub": "alice", "iss": "parley", "iat": now, "exp": 4102444800},
    "expired": {"sub": "alice", "iss": "parley", "iat": now - 7200, "exp": now - 3600},
    "future": {"sub": "alice", "iss": "parley", "iat": 4102444000, "exp": 4102444800},
    "foreign": {"sub": "alice", "iss": "other", "iat": now, "exp": 4102444800},
    "nbf": {"sub": "alice", "iss": "parley", "iat": now, "exp": 4102444800, "nbf": 4102444000},
    "device": {"sub": "alice", "iss": "parley", "iat": now, "exp": 4102444800, "dev": "phone",
               "iat_ms": now * 1000 + 5},
}.items():
    write("token", name, b"\x01" + json.dumps(claims).encode())

write("admin", "create-user", b"\x00" + field(1, "dave") + field(2, "Dave"))
write("admin", "bad-user", b"\x00" + field(1, "da ve/") + field(2, "x" * 300))
write("admin", "get-user", b"\x01" + field(1, "alice"))
write("admin", "token", b"\x02" + field(1, "alice") + field(2, 60))
write("admin", "group", b"\x03" + field(1, "alice") + field(2, "team") + field(3, "bob"))
write("admin", "add", b"\x04" + field(1, 1) + field(2, "bob"))
write("admin", "remove", b"\x05" + field(1, 1) + field(2, "carol"))
write("admin", "conversation", b"\x06" + field(1, 1))
write("admin", "list", b"\x07" + field(1, "alice"))
write("admin", "device-token", b"\x02" + field(1, "alice") + field(2, 60) + field(3, "phone"))
write("admin", "devices", b"\x08" + field(1, "alice"))
write("admin", "log-out", b"\x09" + field(1, "alice") + field(2, "phone"))
write("admin", "log-out-all", b"\x09" + field(1, "alice"))
write("admin", "session", b"\x0a" + field(1, "alice") + field(2, "phone") + field(3, 60))
