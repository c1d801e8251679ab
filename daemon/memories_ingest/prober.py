"""The probe's fork server: FFmpeg is loaded once, and every file is still parsed in a fresh process.

Starting an interpreter and importing PyAV costs some 100 ms of CPU per file, several times that on a
NAS's ARM CPU. The zygote (``python -m memories_ingest.prober``) pays it once. For each request it forks
a child that starts its own session, takes the probe's resource limits and writes the same answer as
``python -m memories_ingest.inspector --fd N``, which is also what runs when the zygote cannot be had.
The zygote itself never opens a file, and it is
single-threaded, so forking it is safe where forking the daemon is not.

A request is one SOCK_SEQPACKET message on the control socket: the options as JSON and, by SCM_RIGHTS,
the file, a reply socket and the write ends of the child's stdout and stderr. On the reply socket the
zygote reports the child's pid, then how it ended. The daemon shuts its end of the reply socket to have
the child killed; closing the control socket stops the zygote and every child it has running.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import importlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any, NoReturn

from .inspector import MediaInfo, Rejection, answer_on_stdout, read_answer

# How long a zygote has to confirm that a child is dead, or to stop, before the daemon kills it.
_GRACE_SECONDS = 5.0
_MESSAGE_BYTES = 4096
_OUTPUT_CHUNK_BYTES = 1 << 16
_REQUEST_FDS = 4  # the file, the reply socket, the child's stdout and its stderr
# The child reads the file here; its stdout and stderr are 1 and 2.
_CHILD_FILE_FD = 3


class ProberUnavailable(Exception):
    """Neither the zygote nor a fresh one took the request: the file must be probed some other way."""


class _ZygoteGone(Exception):
    """The zygote died, or stopped answering, before it reported how the child ended."""


class Prober:
    """Probes files in children of one zygote, which starts on first use and is replaced when it fails."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None

    def probe(self, fd: int, *, require_audio: bool, timeout: float, cpu_seconds: int, memory_bytes: int) -> MediaInfo:
        """Answer as :func:`memories_ingest.probe.probe_fd`; :class:`ProberUnavailable` when two zygotes failed."""
        options = {"require_audio": require_audio, "cpu_seconds": cpu_seconds, "memory_bytes": memory_bytes}
        request = json.dumps(options).encode()
        for _attempt in range(2):
            zygote = self._running()
            try:
                return zygote.probe(fd, request, timeout=timeout, cpu_seconds=cpu_seconds)
            except _ZygoteGone:
                self._discard(zygote)
        raise ProberUnavailable("the probe's fork server failed twice")

    def start(self) -> None:
        """Start the zygote now rather than at the first probe; a zygote that cannot start is not an error here."""
        with contextlib.suppress(ProberUnavailable):
            self._running()

    def close(self) -> None:
        """Stop the zygote and the children it has running; a later probe starts a new one."""
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.stop(_GRACE_SECONDS)

    def _running(self) -> _Zygote:
        with self._lock:
            if self._zygote is None:
                try:
                    self._zygote = _Zygote()
                except OSError as error:
                    raise ProberUnavailable(f"cannot start the probe's fork server: {error}") from error
            return self._zygote

    def _discard(self, zygote: _Zygote) -> None:
        with self._lock:
            if self._zygote is zygote:
                self._zygote = None
        zygote.stop(0)


class _Zygote:
    """The daemon's side of one zygote process."""

    def __init__(self) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Held to send and to close, so the socket is never closed under a sender and its number reused.
        self.sending = threading.Lock()
        with theirs:
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "memories_ingest.prober", "--control-fd", str(theirs.fileno())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    # `-m` puts the working directory first on sys.path: not a folder where files arrive.
                    cwd="/",
                    env=probe_environment(),
                    # Out of the terminal's process group: the daemon stops it, by closing the control socket.
                    start_new_session=True,
                )
            except BaseException:
                self.control.close()
                raise

    def probe(self, fd: int, request: bytes, *, timeout: float, cpu_seconds: int) -> MediaInfo:
        deadline = time.monotonic() + timeout
        with contextlib.ExitStack() as ours:
            # The zygote's ends are closed here once sent, so that only it and the child hold them.
            with contextlib.ExitStack() as theirs:
                reply, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                ours.enter_context(reply)
                theirs.enter_context(remote)
                stdout, stdout_end = _pipe(ours, theirs)
                stderr, stderr_end = _pipe(ours, theirs)
                self._send(request, [fd, remote.fileno(), stdout_end, stderr_end], timeout)
            return self._await_child(reply, stdout, stderr, deadline, timeout, cpu_seconds)

    def stop(self, grace: float) -> None:
        """Close the control socket, give the zygote ``grace`` seconds to end its children and exit, then kill it."""
        with contextlib.suppress(OSError):
            # Fails at once any send that waits for room in the zygote's queue.
            self.control.shutdown(socket.SHUT_RDWR)
        with self.sending:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
            self.control.close()
            if self.process.poll() is None:
                _kill_group(self.process.pid)
                self.process.wait()

    def _send(self, request: bytes, fds: list[int], timeout: float) -> None:
        with self.sending:
            try:
                # A zygote that cannot take a request within the probe's whole time is as good as gone.
                self.control.settimeout(timeout)
                socket.send_fds(self.control, [request], fds)
            except OSError:
                raise _ZygoteGone from None

    def _await_child(
        self, reply: socket.socket, stdout: int, stderr: int, deadline: float, timeout: float, cpu_seconds: int
    ) -> MediaInfo:
        output = {stdout: bytearray(), stderr: bytearray()}
        pid: int | None = None
        returncode: int | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(reply, selectors.EVENT_READ)
            for end in output:
                selector.register(end, selectors.EVENT_READ)
            while selector.get_map():
                events = selector.select(deadline - time.monotonic())
                if not events:
                    self._give_up(reply, pid, returncode)
                    raise timed_out(timeout)
                for key, _ in events:
                    if key.fd in output:
                        chunk = os.read(key.fd, _OUTPUT_CHUNK_BYTES)
                        output[key.fd] += chunk
                        if not chunk:
                            selector.unregister(key.fd)
                        continue
                    report = reply.recv(_MESSAGE_BYTES)
                    if not report:
                        if pid is not None:
                            # The zygote is gone, so nobody else will stop its child.
                            _kill_group(pid)
                        raise _ZygoteGone
                    news = json.loads(report)
                    pid = news.get("pid", pid)
                    returncode = news.get("returncode")
                    if returncode is not None:
                        selector.unregister(reply)
        assert returncode is not None
        return read_answer(returncode, bytes(output[stdout]), bytes(output[stderr]), cpu_seconds)

    def _give_up(self, reply: socket.socket, pid: int | None, returncode: int | None) -> None:
        """Past the deadline: have the child killed, and find out whether the zygote is still fit to use."""
        if returncode is not None:
            return
        if pid is None:
            # The zygote never forked, so the file is not to blame; the zygote is no longer to be trusted.
            raise _ZygoteGone
        # The zygote kills the child, not the daemon: only the zygote knows that the pid is not yet reaped,
        # and so cannot name some new process.
        with contextlib.suppress(OSError):
            reply.shutdown(socket.SHUT_WR)
            reply.settimeout(_GRACE_SECONDS)
            if reply.recv(_MESSAGE_BYTES):
                return
        # The zygote is gone or wedged: the child is the daemon's to kill, and the zygote is replaced.
        _kill_group(pid)
        self.stop(0)


def _pipe(ours: contextlib.ExitStack, theirs: contextlib.ExitStack) -> tuple[int, int]:
    read_end, write_end = os.pipe()
    ours.callback(os.close, read_end)
    theirs.callback(os.close, write_end)
    return read_end, write_end


def _kill_group(pid: int) -> None:
    """SIGKILL a process and its group: safe while the process is not reaped, as its pid still names them."""
    # The process too: a child killed before its setsid() leads no group yet.
    for kill in (os.kill, os.killpg):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)


# What a probe process may see of the daemon's environment: enough to run Python, and nothing else. Not the
# API key's variable, not $CREDENTIALS_DIRECTORY, not NOTIFY_SOCKET: a hostile file is parsed in there.
_ENVIRONMENT_KEPT = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSAFEPATH",
        "PYTHONDONTWRITEBYTECODE",
    }
)


def probe_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for the probe's processes: an allow-list of the daemon's."""
    return {name: value for name, value in environ.items() if name in _ENVIRONMENT_KEPT or name.startswith("LC_")}


def _probe_in_new_interpreter(
    fd: int, *, require_audio: bool, timeout: float, cpu_seconds: int, memory_bytes: int
) -> MediaInfo:
    command = [sys.executable, "-m", "memories_ingest.inspector", "--fd", str(fd)]
    command += ["--cpu-seconds", str(cpu_seconds), "--memory-bytes", str(memory_bytes)]
    if require_audio:
        command.append("--require-audio")
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(fd,),
        # `-m` puts the working directory first on the child's sys.path; it must not be a
        # folder where files arrive that could pass for modules.
        cwd="/",
        env=probe_environment(),
        start_new_session=True,
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_process_group(child)
            raise timed_out(timeout) from None
        except BaseException:
            _kill_process_group(child)
            raise
    return read_answer(child.returncode, stdout, stderr, cpu_seconds)


def timed_out(timeout: float) -> Rejection:
    return Rejection(f"probe timed out after {timeout:g} s")


def _kill_process_group(child: subprocess.Popen[bytes]) -> None:
    _kill_group(child.pid)
    child.communicate()


_shared = Prober()


def probe_fd(fd: int, *, require_audio: bool, timeout: float, cpu_seconds: int, memory_bytes: int) -> MediaInfo:
    """Probe ``fd`` in a child of the daemon's zygote (see :meth:`Prober.probe`), or in a new interpreter."""
    try:
        return _shared.probe(
            fd, require_audio=require_audio, timeout=timeout, cpu_seconds=cpu_seconds, memory_bytes=memory_bytes
        )
    except ProberUnavailable:
        return _probe_in_new_interpreter(
            fd, require_audio=require_audio, timeout=timeout, cpu_seconds=cpu_seconds, memory_bytes=memory_bytes
        )


def start() -> None:
    """Start the daemon's zygote: before the API key is read, so that nothing of it could reach the zygote."""
    _shared.start()


def close() -> None:
    """Stop the daemon's zygote, after it has ended its children. Runs at exit."""
    _shared.close()


atexit.register(close)


# Everything below runs in the zygote and its children.


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m memories_ingest.prober")
    parser.add_argument("--control-fd", type=int, required=True)
    arguments = parser.parse_args(argv)
    # Loaded once, here, for every child to inherit: the reason the zygote exists.
    importlib.import_module("av")
    # Its children take the probe's limits; of those, only "no core dump" also fits a long-lived process.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _ForkServer(socket.socket(fileno=arguments.control_fd)).serve()
    return 0


class _ForkServer:
    """The zygote's loop: a child per request, its pid and its end reported, killed when the daemon gives up."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.replies: dict[int, socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.child_ended, alarm = os.pipe()
        os.set_blocking(self.child_ended, False)
        os.set_blocking(alarm, False)
        # SIGCHLD wakes the select loop through the pipe; the handler has nothing left to do.
        signal.set_wakeup_fd(alarm, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _signal, _frame: None)
        self.selector.register(control, selectors.EVENT_READ)
        self.selector.register(self.child_ended, selectors.EVENT_READ)

    def serve(self) -> None:
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.fileobj is self.control:
                        if not self._fork_for_request():
                            return
                    elif key.fileobj == self.child_ended:
                        self._reap()
                    else:
                        self._kill_abandoned(key)
        finally:
            # The daemon is gone: so must be everything that was probing for it.
            for pid in self.replies:
                _kill_group(pid)
            for pid in self.replies:
                os.waitpid(pid, 0)

    def _fork_for_request(self) -> bool:
        """Start a child for the next request; False once the daemon has closed the control socket."""
        message, fds, _flags, _address = socket.recv_fds(self.control, _MESSAGE_BYTES, _REQUEST_FDS)
        if not message:
            return False
        file, reply_fd, stdout, stderr = fds
        reply = socket.socket(fileno=reply_fd)
        pid = os.fork()
        if pid == 0:
            _run_child(file, stdout, stderr, json.loads(message))
        for fd in (file, stdout, stderr):
            os.close(fd)
        self.replies[pid] = reply
        try:
            reply.send(json.dumps({"pid": pid}).encode())
        except OSError:
            # The daemon gave up before the child even started.
            _kill_group(pid)
        else:
            self.selector.register(reply, selectors.EVENT_READ, pid)
        return True

    def _reap(self) -> None:
        os.read(self.child_ended, _MESSAGE_BYTES)
        while True:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if ended is None:
                return
            # Until it is reaped its pid holds the group: kill whatever it left there, so nothing outlives a probe.
            _kill_group(ended.si_pid)
            _, status = os.waitpid(ended.si_pid, 0)
            reply = self.replies.pop(ended.si_pid)
            with contextlib.suppress(KeyError):
                self.selector.unregister(reply)
            with contextlib.suppress(OSError):
                reply.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
            reply.close()

    def _kill_abandoned(self, key: selectors.SelectorKey) -> None:
        """The daemon shut its end of a reply socket: it has stopped waiting, so the child dies."""
        pid = key.data
        if self.replies.get(pid) is not key.fileobj:
            return  # reaped earlier in the same round of events
        self.selector.unregister(key.fileobj)
        _kill_group(pid)


def _run_child(file: int, stdout: int, stderr: int, options: dict[str, Any]) -> NoReturn:
    """Become the probe of one file, in a session of its own with only that file and two pipes open."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        # Lifted clear of 1-3 first, as any of them may already sit there.
        stdout, stderr, file = (fcntl.fcntl(fd, fcntl.F_DUPFD, _CHILD_FILE_FD + 1) for fd in (stdout, stderr, file))
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.dup2(file, _CHILD_FILE_FD)
        # Hostile input must find nothing of the zygote's open: not the control socket, nor other requests.
        os.closerange(_CHILD_FILE_FD + 1, max(map(int, os.listdir("/proc/self/fd"))) + 1)
        answer_on_stdout(
            _CHILD_FILE_FD,
            require_audio=options["require_audio"],
            cpu_seconds=options["cpu_seconds"],
            memory_bytes=options["memory_bytes"],
        )
        sys.stdout.flush()
        status = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
