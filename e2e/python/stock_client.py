#!/usr/bin/env python3
"""A stock Python grpcio client with no channel options, for the e2e suite.

grpcio 1.57 and later send the Unix socket path, percent-encoded, as the
HTTP/2 :authority; servers must cope with that. Compiles the protos with
grpc_tools, calls a few read-only RPCs and exits 0 only if all succeed.

Usage: stock_client.py --proto-dir DIR (driver|gateway) SOCKET
"""

import argparse
import os
import sys
import tempfile


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("target", choices=["driver", "gateway"])
    parser.add_argument("socket")
    args = parser.parse_args()

    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="stock-client-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for name in sorted(os.listdir(args.proto_dir)):
        if not name.endswith(".proto"):
            continue
        if protoc.main(["protoc", f"-I{args.proto_dir}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", os.path.join(args.proto_dir, name)]) != 0:
            sys.exit(f"stock_client: protoc failed on {name}")
    sys.path.insert(0, out)

    import grpc

    # Deliberately no options: this is what a user's script does.
    channel = grpc.insecure_channel("unix:" + args.socket)
    try:
        if args.target == "driver":
            import compute_driver_pb2 as pb
            import compute_driver_pb2_grpc as rpc
            stub = rpc.ComputeDriverStub(channel)
            caps = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
            listed = stub.ListSandboxes(pb.ListSandboxesRequest(), timeout=10)
            print(f"driver {caps.driver_name}: {len(listed.sandboxes)} sandboxes")
        else:
            import gateway_pb2 as pb
            import gateway_pb2_grpc as rpc
            stub = rpc.GatewayStub(channel)
            info = stub.GetGatewayInfo(pb.GetGatewayInfoRequest(), timeout=10)
            listed = stub.ListSandboxes(pb.ListSandboxesRequest(), timeout=10)
            print(f"gateway {info.version}: {len(info.drivers)} drivers, {len(listed.sandboxes)} sandboxes")
    except grpc.RpcError as error:
        print(f"stock_client: {error.code()}: {error.details()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
