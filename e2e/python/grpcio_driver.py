#!/usr/bin/env python3
"""A compute driver written with stock Python grpcio, for the e2e suite.

It is a foreign peer on purpose: nothing here comes from the Rust workspace
except the .proto files, compiled at start-up with grpc_tools. It behaves
the way grpcio servers do, which is what the gateway must cope with:

* a server stream sends its response headers only with its first message,
  so a WatchSandboxes with nothing to report stays silent (no headers) until
  a sandbox changes;
* sandboxes live in memory and become Ready shortly after creation.

With --contract 1.x it also speaks the negotiated 1.x contract: it sends
extension metadata and an admission policy, refuses gateway metadata of
another major version with FAILED_PRECONDITION, and stamps conditions in
both time encodings. It still answers gateways that send no metadata.

Usage: grpcio_driver.py --socket PATH --proto-dir DIR [--name NAME]
                        [--contract v0.0.111|1.x]
"""

import argparse
import datetime
import os
import queue
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures


def compile_protos(proto_dir, out_dir):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for name in ("options.proto", "extension.proto", "sandbox.proto", "compute_driver.proto"):
        code = protoc.main([
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(proto_dir, name),
        ])
        if code != 0:
            sys.exit(f"grpcio_driver: protoc failed on {name} (exit {code})")
    sys.path.insert(0, out_dir)


NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# A Kubernetes quantity that is not negative: "500m", "2", "1.5Gi", "1e3".
QUANTITY_RE = re.compile(r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")

CONTRACT_CAPABILITY = "openshell.compute.contract"
# The default admission policy of 1.x peers, byte for byte.
ADMISSION_POLICY = ('v1:{"allow_driver_config":false,"resource_admission":{"enabled":true,'
                    '"required_labels":{"openshell.ai/sandbox-attachable":"true",'
                    '"openshell.ai/sandbox-attachable-workspace":"${workspace}"}}}')


def rfc3339(at):
    text = datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--name", default="grpcio-driver")
    parser.add_argument("--ready-after", type=float, default=0.2,
                        help="seconds from create to Ready")
    parser.add_argument("--contract", choices=("v0.0.111", "1.x"), default="v0.0.111",
                        help="the contract generation to speak")
    args = parser.parse_args()

    out_dir = tempfile.mkdtemp(prefix="grpcio-driver-stubs-")
    compile_protos(args.proto_dir, out_dir)

    import grpc
    import compute_driver_pb2 as pb
    import compute_driver_pb2_grpc as pb_grpc

    lock = threading.Lock()
    sandboxes = {}  # id -> DriverSandbox
    watchers = []   # queues of WatchSandboxesEvent

    one_x = args.contract == "1.x"

    def condition(status, reason, message):
        # Whole milliseconds, so both encodings name the same instant.
        at = round(time.time(), 3)
        c = pb.DriverCondition(type="Ready", status=status, reason=reason,
                               message=message, last_transition_time=rfc3339(at))
        if one_x:
            millis = int(round(at * 1000))
            c.transition_time.seconds = millis // 1000
            c.transition_time.nanos = (millis % 1000) * 1_000_000
        return c

    def publish(event):
        for q in list(watchers):
            q.put(event)

    def set_state(sandbox_id, status, reason, message):
        with lock:
            sandbox = sandboxes.get(sandbox_id)
            if sandbox is None:
                return
            del sandbox.status.conditions[:]
            sandbox.status.conditions.append(condition(status, reason, message))
            snapshot = pb.DriverSandbox()
            snapshot.CopyFrom(sandbox)
        publish(pb.WatchSandboxesEvent(sandbox=pb.WatchSandboxesSandboxEvent(sandbox=snapshot)))

    def find(context, sandbox_id, sandbox_name):
        with lock:
            if sandbox_id and sandbox_id in sandboxes:
                return sandboxes[sandbox_id]
            for s in sandboxes.values():
                if sandbox_name and s.name == sandbox_name:
                    return s
        return None

    def later(delay, fn, *a):
        t = threading.Timer(delay, fn, a)
        t.daemon = True
        t.start()

    class Driver(pb_grpc.ComputeDriverServicer):
        def GetCapabilities(self, request, context):
            response = pb.GetCapabilitiesResponse(driver_name=args.name, driver_version="0.1-py",
                                                  default_image="python:none",
                                                  gateway_manages_lifecycle=False)
            if not one_x:
                return response
            if request.HasField("gateway"):
                gateway = request.gateway
                if not gateway.HasField("protocol_version"):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  "gateway metadata has no protocol version")
                major = gateway.protocol_version.major
                if major != 1:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"gateway speaks protocol {major}.{gateway.protocol_version.minor}, "
                                  "this driver speaks 1.0: major versions must match")
                missing = [c for c in gateway.required_capabilities if c != CONTRACT_CAPABILITY]
                if missing:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"gateway requires capabilities this driver lacks: {missing}")
            ext = response.extension
            ext.protocol_version.major = 1
            ext.protocol_version.minor = 0
            ext.implementation_name = "openshell-e2e/grpcio-driver"
            ext.implementation_version = "0.1-py"
            ext.supported_capabilities.append(CONTRACT_CAPABILITY)
            ext.required_capabilities.append(CONTRACT_CAPABILITY)
            response.resource_admission_policy = ADMISSION_POLICY
            return response

        def ValidateSandboxCreate(self, request, context):
            self._validate(request, context)
            return pb.ValidateSandboxCreateResponse()

        def _validate(self, request, context):
            if not request.HasField("sandbox"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sandbox is required")
            sandbox = request.sandbox
            if not ID_RE.match(sandbox.id):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "sandbox.id must match [A-Za-z0-9._-]{1,128}")
            if not sandbox.HasField("spec"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sandbox.spec is required")
            if not NAME_RE.match(sandbox.name):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "sandbox.name must be a DNS label ([a-z0-9-], at most 63)")
            resources = sandbox.spec.template.resources
            for field in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
                value = getattr(resources, field)
                if value and not QUANTITY_RE.match(value):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"template.resources.{field} {value!r} is not a non-negative quantity")
            if sandbox.spec.resource_requirements.HasField("gpu"):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this driver has no GPUs")

        def CreateSandbox(self, request, context):
            self._validate(request, context)
            sandbox = pb.DriverSandbox()
            sandbox.CopyFrom(request.sandbox)
            sandbox.spec.sandbox_token = ""
            with lock:
                if sandbox.id in sandboxes or any(s.name == sandbox.name for s in sandboxes.values()):
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"sandbox {sandbox.name} exists")
                sandbox.status.instance_id = "py-" + sandbox.id
                sandbox.status.conditions.append(condition("False", "Starting", "starting"))
                sandboxes[sandbox.id] = sandbox
            later(args.ready_after, set_state, sandbox.id, "True", "Running", "running")
            return pb.CreateSandboxResponse()

        def GetSandbox(self, request, context):
            sandbox = find(context, request.sandbox_id, request.sandbox_name)
            if sandbox is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such sandbox")
            return pb.GetSandboxResponse(sandbox=sandbox)

        def ListSandboxes(self, request, context):
            with lock:
                return pb.ListSandboxesResponse(sandboxes=list(sandboxes.values()))

        def StopSandbox(self, request, context):
            sandbox = find(context, request.sandbox_id, request.sandbox_name)
            if sandbox is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such sandbox")
            set_state(sandbox.id, "False", "Stopped", "stopped")
            return pb.StopSandboxResponse()

        def StartSandbox(self, request, context):
            sandbox = find(context, request.sandbox_id, request.sandbox_name)
            if sandbox is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such sandbox")
            later(args.ready_after, set_state, sandbox.id, "True", "Running", "running")
            return pb.StartSandboxResponse()

        def DeleteSandbox(self, request, context):
            sandbox = find(context, request.sandbox_id, request.sandbox_name)
            if sandbox is None:
                return pb.DeleteSandboxResponse(deleted=False)
            with lock:
                sandboxes.pop(sandbox.id, None)
            publish(pb.WatchSandboxesEvent(deleted=pb.WatchSandboxesDeletedEvent(sandbox_id=sandbox.id)))
            return pb.DeleteSandboxResponse(deleted=True)

        def WatchSandboxes(self, request, context):
            q = queue.Queue()
            with lock:
                snapshot = [pb.DriverSandbox.FromString(s.SerializeToString())
                            for s in sandboxes.values()]
                watchers.append(q)
            try:
                for s in snapshot:
                    yield pb.WatchSandboxesEvent(sandbox=pb.WatchSandboxesSandboxEvent(sandbox=s))
                # Nothing is sent (not even headers) until an event arrives.
                while context.is_active():
                    try:
                        yield q.get(timeout=0.5)
                    except queue.Empty:
                        continue
            finally:
                with lock:
                    if q in watchers:
                        watchers.remove(q)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_ComputeDriverServicer_to_server(Driver(), server)
    if server.add_insecure_port("unix:" + args.socket) == 0:
        sys.exit(f"grpcio_driver: cannot bind unix:{args.socket}")
    server.start()
    print(f"grpcio_driver: serving on {args.socket}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(grace=1).wait()
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    main()
