"""A warm stage server: one long-lived process that has imported torch, timm and the other heavy libraries once,
and forks a child for each stage command, so no stage pays those imports again (5-6 s a stage on this project's
2-core CPU, where a digits fine-tuning stage's own work is 15-40 s).

    python -m pipeline.runtime.warm run [--log FILE] -- COMMAND...     a server for the time COMMAND runs
    python -m pipeline.runtime.warm serve SOCKET [--idle-exit SECONDS]  a server on its own

DVC still starts every stage as its own command (`python -m pipeline.stages.NAME ...`), so its hashes, locks and
run-cache are untouched. When the environment names a server (`FEWSHOT_WARM_SOCKET`) and the command is a stage,
importing `pipeline.stages` hands the command over before anything heavy is imported: its arguments, working
folder and environment, and its standard streams as file descriptors. The server forks; the child runs the stage
module as `python -m` would, in that folder, with that environment, with torch's and the BLAS libraries' thread
counts taken from it, and its exit status becomes the command's. If the command dies (DVC interrupted, a worker
killed), the server kills the child and everything it started; if the server dies, so does the child. Without a
server, or when it cannot be reached, the stage runs in its own process as before.

The server imports none of the project's code for the children: each child imports `pipeline` afresh from its own
working folder, so a clone at another commit runs its own code. Results are those of a fresh process at the same
thread count (tests/test_warm.py compares them byte for byte).

`./dev.sh repro` starts a server for its `dvc repro`; parallel runs start one per machine (pipeline/distributed).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ENV = "FEWSHOT_WARM_SOCKET"  # the server's socket path, in a stage command's environment
STAGES = "pipeline.stages."  # only these modules are handed over
PRELOAD = ("numpy", "pandas", "scipy.stats", "PIL.Image", "torch", "torchvision", "timm", "sklearn.linear_model",
           "sklearn.model_selection", "albumentations", "safetensors.torch", "yaml")  # the stages' slow imports
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # read by the libraries as they load
HEADER = struct.Struct("!Q")  # the request's length in bytes
STATUS = struct.Struct("!i")  # the command's exit status
PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2
START_SECONDS = 10  # how long a starter waits for a new server's socket


# --------------------------------------------------------------------------------------------------
# The client: a stage command that hands itself over
# --------------------------------------------------------------------------------------------------


def stage_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) of `python -m pipeline.stages.NAME ARGS...` with no interpreter options; else None."""
    if len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith(STAGES):
        return None
    return argv[2], argv[3:]


def hand_over_if_served() -> None:
    """Run this stage command on the warm server named in the environment, and exit with its status. Returns
    (the stage then runs here, as usual) when no server is named, this is no stage command, or the server cannot
    be reached."""
    path = os.environ.get(ENV)
    command = stage_command(getattr(sys, "orig_argv", []))
    if not path or command is None:
        return
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        _send(client, *command)
    except OSError as err:  # nothing started there: run here
        client.close()
        print(f"warm stage server {path} not reachable ({err}); running {command[0]} in this process",
              file=sys.stderr, flush=True)
        return
    sys.exit(_wait(client, command[0]))


def _send(client: socket.socket, module: str, args: list[str]) -> None:
    request = json.dumps({"module": module, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    streams = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]  # e.g. no stdin
    socket.send_fds(client, [HEADER.pack(len(request))], streams)
    client.sendall(request)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _wait(client: socket.socket, module: str) -> int:
    with client:
        reply = _receive(client, STATUS.size)
    if reply is None:
        print(f"warm stage server stopped while running {module}", file=sys.stderr, flush=True)
        return 1
    return STATUS.unpack(reply)[0]


def _receive(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


@dataclass
class Server:
    listener: socket.socket
    idle_exit: float  # seconds without a command before the server stops (0: never)
    site_path: list[str]  # sys.path less the server's own folder and PYTHONPATH: what every child starts from
    running: dict[int, socket.socket] = field(default_factory=dict)  # child pid -> its command's connection
    last_active: float = field(default_factory=time.monotonic)

    def serve(self) -> None:
        while not (self.idle_exit and not self.running and time.monotonic() - self.last_active > self.idle_exit):
            ready, _, _ = select.select([self.listener, *self.running.values()], [], [], POLL_SECONDS)
            for conn in ready:
                if conn is self.listener:
                    self._start(*self.listener.accept())
                else:
                    self._client_gone(conn)
            self._reap()

    def _start(self, conn: socket.socket, _address) -> None:
        request = _read_request(conn) if _same_user(conn) else None
        if request is None:
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            for held in (self.listener, conn, *self.running.values()):
                held.close()
            _die_with_parent(server)
            _run_child(*request, self.site_path)  # never returns
        for fd in request[1]:
            os.close(fd)
        _say(f"pid {pid} runs {request[0]['module']} {' '.join(request[0]['args'])} in {request[0]['cwd']}")
        conn.settimeout(None)
        self.running[pid] = conn
        self.last_active = time.monotonic()

    def _client_gone(self, conn: socket.socket) -> None:
        """A command's connection became readable: it sends nothing after its request, so it has gone."""
        for pid, known in self.running.items():
            if known is conn:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # the child leads its own process group
                return

    def _reap(self) -> None:
        while self.running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            conn = self.running.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # anything the stage left running
            code = os.waitstatus_to_exitcode(status)
            _say(f"pid {pid} exited with {code}")
            with contextlib.suppress(OSError):
                conn.sendall(STATUS.pack(code if code >= 0 else 128 - code))  # killed by signal N: 128 + N
            conn.close()
            self.last_active = time.monotonic()


def _same_user(conn: socket.socket) -> bool:
    """Only the server's own user may hand it commands (on Linux the kernel says who connected; the socket is
    also created readable and writable by that user alone)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        _say(f"refused a command from user id {uid}")
        return False
    return True


def _say(message: str) -> None:
    """A line of the server's log (its stderr): the time, then what happened. Printed, not logged: the server
    leaves `logging` unconfigured, because each child configures it as its stage does and would inherit it."""
    print(f"{time.strftime('%H:%M:%S')} warm stage server: {message}", file=sys.stderr, flush=True)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]] | None:
    """The command (module, args, cwd, env) and its three standard streams; None, said on stderr, if malformed."""
    conn.settimeout(30)
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        if not header and not fds:
            return None  # a probe: someone checked that the server answers
        body = _receive(conn, HEADER.unpack(header)[0]) if len(header) == HEADER.size else None
        request = json.loads(body) if body is not None else None
        if isinstance(request, dict) and len(fds) == 3 and stage_command(["", "-m", request.get("module", "")]):
            return request, fds
    except (OSError, ValueError) as err:
        _say(f"a request failed: {err}")
    else:
        _say("ignored a request that is no stage command")
    for fd in fds:
        os.close(fd)
    return None


def _run_child(request: dict, fds: list[int], site_path: list[str]) -> None:
    """In the forked child: become the stage command, run it, exit with its status."""
    code = 1
    try:
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, as in python
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({k: v for k, v in request["env"].items() if k != ENV})
        sys.path[:] = [request["cwd"], *_python_path(), *site_path]  # as `python -m` builds it in that folder
        for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            del sys.modules[name]  # the child's own checkout, not the server's
        _set_threads()
        sys.argv = [request["module"], *request["args"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:  # noqa: BLE001  (whatever the stage raised: shown as python would, then exit 1)
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _python_path() -> list[str]:
    return [os.path.abspath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"), as python prints it
    return 1


def _die_with_parent(server: int) -> None:
    """Linux: the kernel kills this child if the server dies, so no stage outlives its server unseen."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:  # it died before the request above took hold
        os._exit(1)


def _set_threads() -> None:
    """torch's and the BLAS pools' sizes as a fresh process would set them from OMP_NUM_THREADS: the libraries read
    it as they load, which happened in the server (without it, so with their defaults), so it is applied here."""
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if not (asked.isdigit() and int(asked) > 0):
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(asked))
    threadpool_limits(int(asked))


def serve(path: Path, idle_exit: float) -> None:
    """Listen on `path` first (commands queue while the libraries load), then preload and serve until idle."""
    for name in THREAD_VARS:  # the children set their own; the server's libraries load with the defaults
        os.environ.pop(name, None)
    site_path = [entry for entry in sys.path[1:] if entry not in _python_path()]
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is born rw------- : no other user can connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    listener.listen(64)
    _say(f"listening on {path}")
    try:
        import importlib

        for name in PRELOAD:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        Server(listener, idle_exit, site_path).serve()
    finally:
        path.unlink(missing_ok=True)
        listener.close()


# --------------------------------------------------------------------------------------------------
# Starting servers
# --------------------------------------------------------------------------------------------------


def _start_server(path: Path, log, *, idle_exit: float = 0, **popen) -> subprocess.Popen:
    """A server process on `path`, returned once its socket exists (it binds before loading the libraries)."""
    command = [sys.executable, "-m", "pipeline.runtime.warm", "serve", str(path), "--idle-exit", str(idle_exit)]
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **popen)
    deadline = time.monotonic() + START_SECONDS
    while not path.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return server


def run_with_server(command: list[str], log: Path | None = None) -> int:
    """Run `command` (e.g. `dvc repro`) with a warm server for its stages; stop the server after; its status."""
    with tempfile.TemporaryDirectory(prefix="fewshot-warm-", dir="/tmp") as folder:  # short: sockets take <108 bytes
        path = Path(folder) / "socket"
        with open(log or Path(folder) / "server.log", "ab") as out:
            server = _start_server(path, out)
            try:
                return subprocess.run(command, env={**os.environ, ENV: str(path)}).returncode
            finally:
                server.terminate()
                server.wait()


def node_socket() -> Path:
    """The socket of this machine's shared server for this user and this Python (parallel runs' workers)."""
    python = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"fewshot-warm-{os.getuid()}-{python}.sock"


def ensure_server(path: Path, idle_exit: float, log: Path, cwd: Path) -> None:
    """Start a server on `path`, detached, stopping after `idle_exit` idle seconds, unless one answers there; of
    several concurrent callers (tasks on one machine), one starts it. `cwd`: a checkout of this project, for
    `python -m pipeline.runtime.warm` (the server needs it only to start; its children use their own)."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if answers(path):
            return
        with open(log, "ab") as out:
            _start_server(path, out, idle_exit=idle_exit, start_new_session=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(cwd)})


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runtime.warm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    running = sub.add_parser("run", help="run COMMAND with a server for its stages, then stop the server")
    running.add_argument("--log", type=Path, help="the server's log (which stage ran as which process)")
    running.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    serving = sub.add_parser("serve", help="serve stage commands on a Unix socket")
    serving.add_argument("socket", type=Path)
    serving.add_argument("--idle-exit", type=float, default=0, help="stop after this many idle seconds (0: never)")
    args = parser.parse_args(argv)
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("run: give the command after --")
        sys.exit(run_with_server(command, args.log))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it cleanly, removing the socket
    serve(args.socket, args.idle_exit)


if __name__ == "__main__":
    main()
