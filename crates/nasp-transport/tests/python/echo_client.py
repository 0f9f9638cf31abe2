"""A Python grpcio client of nasp's echo service (nasp.echo.v1.Echo).

Run by crates/nasp-transport/tests/grpc_interop.rs. It needs only `grpcio`:
no generated stubs and no protobuf runtime, so the two messages are encoded
and decoded here by hand (proto3 wire format: varints and length-delimited
fields).

Prints one JSON object per answer on stdout, or a single
{"error": "<grpc status code name>", "details": "..."} when the call fails
(exit code 0 both ways, so the test reads what happened). Anything else
(bad arguments, a missing grpcio) exits non-zero with a traceback.
"""

import argparse
import json
import sys

import grpc


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


def encode_request(message, count):
    """EchoRequest { string message = 1; uint32 count = 2; }"""
    raw = message.encode("utf-8")
    out = b"\x0a" + varint(len(raw)) + raw
    if count:
        out += b"\x10" + varint(count)
    return out


def read_varint(buf, i):
    shift = 0
    n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def fields(buf):
    """Yields (field number, wire type, value) of a serialized message."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            size, i = read_varint(buf, i)
            value = bytes(buf[i : i + size])
            i += size
        elif wire == 1:
            value = bytes(buf[i : i + 8])
            i += 8
        elif wire == 5:
            value = bytes(buf[i : i + 4])
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number}")
        yield number, wire, value


def decode_response(buf):
    """EchoResponse { message = 1; served_by = 2; endpoint = 3; peer = 4;
    map<string, string> metadata = 5; uint32 index = 6; }"""
    out = {
        "message": "",
        "served_by": "",
        "endpoint": "",
        "peer": "",
        "metadata": {},
        "index": 0,
    }
    names = {1: "message", 2: "served_by", 3: "endpoint", 4: "peer"}
    for number, _wire, value in fields(buf):
        if number in names:
            out[names[number]] = value.decode("utf-8")
        elif number == 5:
            entry = {k: v.decode("utf-8") for k, _w, v in fields(value)}
            out["metadata"][entry.get(1, "")] = entry.get(2, "")
        elif number == 6:
            out["index"] = value
    return out


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, help="ip:port of the server")
    p.add_argument("--root", required=True, help="the mesh root, PEM")
    p.add_argument("--cert", help="the client's certificate chain, PEM")
    p.add_argument("--key", help="the client's private key, PEM")
    p.add_argument(
        "--server-name",
        required=True,
        help="the DNS name the server's certificate carries (TLS name check and SNI)",
    )
    p.add_argument("--message", default="hello")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="call EchoStream")
    args = p.parse_args()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.root),
        private_key=read(args.key) if args.key else None,
        certificate_chain=read(args.cert) if args.cert else None,
    )
    # grpcio checks the server's certificate against the target's host name
    # (DNS and IP SANs, never URI SANs): the override names the DNS SAN the
    # server's certificate carries, while we dial its loopback address.
    options = [("grpc.ssl_target_name_override", args.server_name)]
    metadata = [("x-interop-client", "grpcio " + grpc.__version__)]
    request = encode_request(args.message, args.count)
    with grpc.secure_channel(args.target, creds, options=options) as channel:
        try:
            if args.stream:
                call = channel.unary_stream(
                    "/nasp.echo.v1.Echo/EchoStream",
                    request_serializer=None,
                    response_deserializer=None,
                )
                for raw in call(request, timeout=10, metadata=metadata):
                    print(json.dumps(decode_response(raw)), flush=True)
            else:
                call = channel.unary_unary(
                    "/nasp.echo.v1.Echo/Echo",
                    request_serializer=None,
                    response_deserializer=None,
                )
                raw = call(request, timeout=10, metadata=metadata)
                print(json.dumps(decode_response(raw)), flush=True)
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "details": e.details()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
