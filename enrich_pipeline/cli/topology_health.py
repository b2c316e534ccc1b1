"""Whether each process of the production topology answers (``enrich-dagster up``, ``status``):
the code server gRPC's health check, the webserver ``/server_info``, the daemon its threads'
heartbeats as the webserver reports them. Each says no (or "unknown"), never hangs, when
nothing answers."""

from __future__ import annotations

import json
import socket
import urllib.request

_DAEMON_HEALTH = (
    '{"query": "{ instance { daemonHealth { allDaemonStatuses { required healthy } } } }"}'
)


def port_in_use(host: str, port: int) -> bool:
    """Whether something holds ``host:port`` already (a listener there would answer the health
    checks in place of the process about to start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def code_server_healthy(host: str, port: int, timeout: float = 2.0) -> bool:
    """gRPC's health check, as ``dagster api grpc-health-check`` asks it (service
    ``DagsterApi`` SERVING once the definitions are loaded)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="DagsterApi"), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def webserver_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def daemon_healthy(url: str, timeout: float = 5.0) -> bool | None:
    """Whether every required daemon thread beats, as the webserver's Daemons page says; None
    when the webserver does not answer."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=_DAEMON_HEALTH.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = json.load(resp)
        statuses = body["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bool(statuses) and all(s["healthy"] for s in statuses if s["required"])
