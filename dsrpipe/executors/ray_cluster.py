"""Joining a Ray cluster, the ray executor's connection (dsrpipe.executors.ray submits the jobs).

Every address is checked before Ray is given it (`connect`): `auto` is read as Ray reads it
(RAY_ADDRESS, else the cluster `ray start` last started here); host:port must accept a
connection, then answer as a Ray cluster with a node on this machine within ANSWER_TIMEOUT,
asked in a process of its own (dsrpipe.executors.ray_probe). Ray itself would wait at length, in
C++, for an address that does not answer as Ray, and retry for ever. An address on loopback
(127.0.0.0/8, ::1, a name for them) is joined on loopback: Ray would resolve it to the host's
address, connect there and listen there.

Without --address dsrpipe starts a local Ray of its own (dsrpipe.executors.ray_head: in a
process and a process group of its own, every listener on 127.0.0.1, no dashboard, its files in
a private folder that goes with it) and joins it. `ray` is imported on use: without the extra,
--executor ray is one line naming the pip command.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..stopping import SIGNALS
from .base import connection_refused, missing_extra
from .processes import die_with_parent, group_members
from .ray_head import LOCAL_ENV

NAMESPACE = "dsrpipe"
ANSWER_TIMEOUT = 15.0  # seconds an address has to answer as a Ray cluster (docs/cluster.md)
ANSWER_ENV = "DSRPIPE_RAY_ANSWER_TIMEOUT"  # seconds, instead of ANSWER_TIMEOUT
START_TIMEOUT = 180.0  # seconds a local Ray may take to start
STOP_TIMEOUT = 30.0  # seconds a local Ray's head may take to stop everything it started
TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or in ~/.ray/auth_token, or in "
    "a file named by RAY_AUTH_TOKEN_PATH)"
)


def import_ray():
    """The ray module; without the extra, the one line naming its pip command."""
    try:
        import ray  # the optional extra: imported on use
    except ImportError:
        raise missing_extra("ray") from None
    return ray


def ray_started() -> bool:
    """Whether this process has joined a Ray cluster (without importing ray to ask)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# -- addresses ------------------------------------------------------------------------------------
def answer_timeout() -> float:
    text = os.environ.get(ANSWER_ENV)
    if text is None:
        return ANSWER_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UserError(f"{ANSWER_ENV}={text}: expected a number of seconds, more than 0")
    return seconds


def _auto_address() -> str:
    """`--address auto`: the cluster Ray itself would join, RAY_ADDRESS or else the one that
    `ray start` last started on this machine (its current-cluster file)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "auto":
        return address
    from ray._private.utils import read_ray_address  # where Ray keeps the file is Ray's to say

    address = read_ray_address()
    if not address:
        raise UserError(
            "--address auto: no Ray cluster to join here (RAY_ADDRESS is not set and no `ray start` "
            "recorded one on this machine): start one, or give its address as host:port"
        )
    return address


def _loopback_ip(host: str) -> str | None:
    """The loopback IP that `host` names (127.0.0.0/8 or ::1, however spelled: 127.1, localhost,
    a name that resolves to them only), else None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # the shorthand spellings that the C library takes: 127.1, 0x7f.1
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            try:
                found = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)}
            except (OSError, ValueError):
                return None
            if not found or not all(ip.is_loopback for ip in found):
                return None
            ip = min(found, key=lambda ip: (ip.version, ip))  # 127.0.0.1 before ::1
    return str(ip) if ip.is_loopback else None


def resolve(address: str) -> tuple[str, bool]:
    """(host:port to give Ray, whether it is on loopback) for an --address; UserError if it is
    none. A loopback host is given as its IP (gRPC takes 127.1 for no address at all)."""
    given = address
    if address == "auto":
        address = _auto_address()
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if "://" in address or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--address {given}: expected host:port of the Ray cluster's head (its GCS), or auto"
            + (f" (it named {address})" if given != address else "")
        )
    ip = _loopback_ip(host)
    if ip is None:
        if given == "auto":  # `auto` means this machine's cluster; one elsewhere is named, not guessed
            raise UserError(
                f"--address auto: the Ray cluster it finds, at {address}, is not on this machine's "
                "loopback; give that address itself if it is the one meant"
            )
        return f"{host}:{port}", False
    return (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"), True


def _reachable(address: str) -> None:
    refused = connection_refused(address)
    if refused is not None:
        raise UserError(f"cannot reach the Ray cluster at {address}: {refused.strerror or refused}")


def probe(address: str) -> None:
    """`address` answers as a Ray cluster, with a node on this machine, within answer_timeout();
    or a one-line UserError saying what is wrong. Asked in a child process, killed at the
    deadline (see dsrpipe.executors.ray_probe)."""
    seconds = answer_timeout()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dsrpipe.executors.ray_probe", address, str(max(1, round(seconds)))],
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=seconds,
            preexec_fn=die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"nothing at {address} answered as a Ray cluster within {seconds:g} s: give the address of a "
            f"Ray head's GCS (host:port; {ANSWER_ENV} sets the wait)"
        ) from None
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if answer.get("error") == "token" or (not answer and "AuthenticationToken" in result.stderr):
        # without a token, Ray's client crashes (abort) where it would say so
        raise UserError(
            f"cannot join the Ray cluster at {address}: it asks for its authentication token, which this "
            f"process does not have (or has another); {TOKEN_HELP}"
        )
    if not answer:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no answer")
        raise UserError(f"cannot ask {address} whether it is a Ray cluster: {last.strip()[:300]}")
    if "error" in answer:
        raise UserError(
            f"{address} does not answer as a Ray cluster: {' '.join(answer['message'].split())[:300]}"
        )
    if answer.get("local") is False:
        raise UserError(
            f"no node of the Ray cluster at {address} runs on this machine: dsrpipe joins a cluster "
            f"from one of its nodes (start one here: ray start --address {address})"
        )


def _on_loopback() -> None:
    """Join a cluster on loopback on loopback. Ray takes 127.0.0.1 for "this host" and resolves
    it to the host's address, unless its cluster mode is off (LOCAL_ENV), which it reads when it
    is imported: set for Ray processes to come, and, if ray is imported already, set in it."""
    os.environ.update(LOCAL_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def _handlers_kept():
    """Around ray.init, which replaces the SIGTERM handler with its own twice (Python's, which
    exits with status 15; then its C++ one, which prints a stack dump first): SIGTERM and SIGINT
    are held meanwhile (the init is short: its address has answered the probe), and dsrpipe's
    handlers are back before they are let through. One that Ray's handler took anyway (sent to
    another thread) is raised again, for dsrpipe's."""
    if threading.current_thread() is not threading.main_thread():  # only it has signal handlers
        yield
        return
    kept = {sig: signal.getsignal(sig) for sig in SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    taken = None
    try:
        yield
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:
            raise
        taken = signal.SIGTERM
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    if taken is not None:
        signal.raise_signal(taken)


def connect(address: str | None) -> str | None:
    """Join the cluster at `address` (host:port of its GCS, or `auto`) and return its address as
    joined; without one, start a local Ray of this process's own and join it (None). Every
    address is checked first (see the module's docstring), and nothing waits on it unbounded."""
    if address is None:
        if ray_started():  # a caller of the API that joined a cluster already
            return import_ray().get_runtime_context().gcs_address
        start_local()
        return None
    address, loopback = resolve(address)
    _reachable(address)
    if ray_started():  # a caller of the API that joined a cluster already
        joined = import_ray().get_runtime_context().gcs_address
        if address != joined:
            raise UserError(
                f"--address {address}: this process has joined the Ray cluster at {joined} already"
            )
        return joined
    if loopback:
        _on_loopback()
    probe(address)
    ray = import_ray()
    try:
        with _handlers_kept():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        raise UserError(
            f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}"
        ) from None
    return address


# -- a local Ray of this process's own ---------------------------------------------------------------
class LocalHead:
    """The head of a local Ray (dsrpipe.executors.ray_head), started; `address` its GCS."""

    def __init__(self, cpus: int | None, gpus: int | None):
        # 0700: Ray makes its own folders in it 0777 (shared), which no one else may then reach.
        self.folder = Path(tempfile.mkdtemp(prefix="dsrpipe-ray-"))
        self.log = self.folder / "head.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsrpipe.executors.ray_head"]
                + ["-" if n is None else str(n) for n in (cpus, gpus)]
                + [str(self.folder)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # its group: every process of this Ray (see ray_head)
            )
        try:
            self.address = self._address()
        except BaseException:
            self.stop()
            raise

    def _address(self) -> str:
        """The line the head prints once Ray is up (waited for in steps, so that a signal is
        handled meanwhile)."""
        deadline, text = time.monotonic() + START_TIMEOUT, b""
        while b"\n" not in text:
            if time.monotonic() > deadline:
                raise UserError(f"the local Ray did not start within {START_TIMEOUT:g} s")
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise UserError(f"cannot start a local Ray: {self._last_error()}")
                text += chunk
        return text.decode().partition("\n")[0].strip()

    def _last_error(self) -> str:
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1].strip()[:300] if lines else f"its head exited with code {self.proc.poll()}"

    def stop(self) -> None:
        """Stop the head, which stops every process of its group and removes its folder; what is
        left of the group after STOP_TIMEOUT is killed here, and the folder removed."""
        if self.proc.poll() is None:
            for step in (self.proc.stdin.close, lambda: self.proc.send_signal(signal.SIGTERM)):
                try:
                    step()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or group_members(self.proc.pid):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_head: LocalHead | None = None


def start_local(cpus: int | None = None, gpus: int | None = None) -> str:
    """A local Ray of this process's own (see dsrpipe.executors.ray_head), joined; its GCS
    address (for --address). It stops when this process calls stop_local, or exits."""
    global _head
    if ray_started():
        return import_ray().get_runtime_context().gcs_address
    if "RAY_AUTH_MODE" not in os.environ:
        # Ray turns token authentication on for a cluster it starts, unless told otherwise: this
        # process, and whatever inherits its environment, must use it too. Ray reads the mode
        # when it is imported; if it was, it is read again, as Ray does when it turns it on.
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:
            sys.modules["ray._raylet"].Config.initialize("")
    _head = LocalHead(cpus, gpus)
    atexit.register(stop_local)
    try:
        connect(_head.address)
    except BaseException:
        stop_local()
        raise
    return _head.address


def stop_local() -> None:
    """Leave the local Ray that start_local started, and stop it: nothing of it is left."""
    global _head
    head, _head = _head, None
    if head is None:
        return
    try:
        if ray_started():
            import_ray().shutdown()
    finally:
        head.stop()
