"""Start and stop a throw-away PostgreSQL server for Dispatcher's test suite.

The server lives in a fresh temporary directory under ``/tmp`` (data
directory, unix socket directory and server log), listens on a free TCP port
on 127.0.0.1, trusts every local connection and runs with durability switched
off (``fsync``, ``synchronous_commit``, ``full_page_writes``) because its data
is thrown away afterwards.  It holds one empty database, ``dispatcher_test``,
owned by the superuser ``dispatcher``.

PostgreSQL refuses to run as root.  When this script runs as root, ``initdb``,
``pg_ctl`` and ``postgres`` are run as the ``postgres`` system user through
``runuser`` and the temporary directory is handed over to that user; nothing
is ever created on the system (no users, no packages).

As a module::

    from scripts.pgtest import running_postgres

    with running_postgres() as url:   # postgresql+psycopg://dispatcher@127.0.0.1:PORT/dispatcher_test
        ...

As a command::

    python scripts/pgtest.py available         # exit 0 if a server can be started here
    python scripts/pgtest.py run -- pytest -q  # with DISPATCHER_TEST_POSTGRES_URL set

``run`` always stops the server and removes its directory, also when the
command fails or this script gets SIGINT, SIGTERM or SIGHUP, and exits with
the command's exit code (128 + N when the command was killed by signal N).
Only SIGKILL can leave a server behind: its directory is
``/tmp/dispatcher-pgtest-*`` and ``pg_ctl -D <dir>/data -m immediate stop``
stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "PgBinaries",
    "PgTestError",
    "find_binaries",
    "main",
    "running_postgres",
    "unavailable_reason",
]

#: Environment variable through which ``run`` hands the URL to the command.
ENV_VAR = "DISPATCHER_TEST_POSTGRES_URL"
#: Superuser created by initdb; it also appears in the URL.
SUPERUSER = "dispatcher"
#: Database created for the tests.
DATABASE = "dispatcher_test"
#: System user that runs the server when this script runs as root.
SYSTEM_USER = "postgres"
#: Where ``/usr/lib/postgresql/<version>/bin`` directories are looked for.
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 60
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 40
_SERVER_OPTIONS = (
    "-c fsync=off",
    "-c synchronous_commit=off",
    "-c full_page_writes=off",
    "-c max_connections=200",
)


class PgTestError(RuntimeError):
    """The throw-away server could not be set up or started."""


@dataclasses.dataclass(frozen=True)
class PgBinaries:
    """Absolute paths of the PostgreSQL server programs that are used."""

    initdb: Path
    pg_ctl: Path
    postgres: Path


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>`` (``9.6`` < ``15``)."""
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (-1,)


def find_binaries() -> PgBinaries | None:
    """Locate ``initdb``, ``pg_ctl`` and ``postgres``.

    All three on ``PATH`` win; otherwise the newest
    ``/usr/lib/postgresql/*/bin`` that holds all three is used.  Returns
    ``None`` when neither has them.
    """
    names = ("initdb", "pg_ctl", "postgres")
    on_path = [shutil.which(name) for name in names]
    if all(on_path):
        found = [Path(p).absolute() for p in on_path if p]
        return PgBinaries(*found)
    if DEBIAN_PG_ROOT.is_dir():
        for version_dir in sorted(DEBIAN_PG_ROOT.iterdir(), key=_version_key, reverse=True):
            candidates = [version_dir / "bin" / name for name in names]
            if all(c.is_file() and os.access(c, os.X_OK) for c in candidates):
                return PgBinaries(*candidates)
    return None


def _system_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: ``None`` means "as ourselves"."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PgTestError(
            f"running as root, and PostgreSQL refuses to run as root; the "
            f"{SYSTEM_USER!r} system user it would run as does not exist here "
            f"(`id {SYSTEM_USER}` fails). Install PostgreSQL from the distribution "
            f"packages, which create that user, or run as a non-root user."
        ) from None


def unavailable_reason() -> str | None:
    """Why no server can be started here, or ``None`` when one can."""
    if find_binaries() is None:
        return (
            "PostgreSQL server binaries not found: initdb, pg_ctl and postgres are "
            f"neither all on PATH nor in {DEBIAN_PG_ROOT}/*/bin "
            "(Debian/Ubuntu: apt-get install postgresql-15)"
        )
    try:
        if _system_user() is not None and shutil.which("runuser") is None:
            return "running as root but `runuser` (util-linux) is not installed"
    except PgTestError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------
# Server lifecycle
# --------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _initdb_locale() -> str:
    """``C.UTF-8`` when the system has it (UTF-8 aware ``lower()`` etc.), else ``C``."""
    try:
        listed = subprocess.run(
            ["locale", "-a"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "C"
    for name in ("C.UTF-8", "C.utf8"):
        if name in listed:
            return name
    return "C"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no server log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or f"(server log {path} is empty)"


class _Server:
    """One throw-away cluster in its own temporary directory."""

    def __init__(self, binaries: PgBinaries, user: pwd.struct_passwd | None) -> None:
        self.binaries = binaries
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="dispatcher-pgtest-", dir="/tmp"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "postgres.log"

    # -- helpers -----------------------------------------------------------

    def _run(
        self, argv: Sequence[str | os.PathLike[str]], *, stdin: str | None = None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run one server program to completion.

        It gets its own session, so Ctrl-C on the terminal does not reach it,
        and an exception (``KeyboardInterrupt``, a signal handler's) raised
        while it runs is held back until it has finished: killing
        ``runuser`` would orphan ``initdb`` or leave a half-started server
        nobody knows about.  On timeout its whole process group is killed.
        """
        command = [os.fspath(a) for a in argv]
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,  # readable by the server's user, unlike e.g. /root
            start_new_session=True,
        )
        held_back: BaseException | None = None
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(stdin, timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
                    if held_back is not None:
                        raise held_back from None
                    raise PgTestError(
                        f"timed out after {timeout:g}s: {shlex.join(command)}"
                    ) from None
                except BaseException as exc:  # re-raised below
                    held_back = held_back or exc
                    stdin = None  # already written (or being written) before the interruption
        finally:
            if process.stdout is not None:
                process.stdout.close()
            if process.stderr is not None:
                process.stderr.close()
        if held_back is not None:
            raise held_back
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    @staticmethod
    def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise PgTestError(f"{what} failed with exit code {result.returncode}:\n{output}")

    # -- lifecycle ---------------------------------------------------------

    def prepare(self) -> None:
        for directory in (self.data, self.sockets):
            directory.mkdir(mode=0o700)
        if self.user is not None:
            for path in (self.root, self.data, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.data, 0o700)  # initdb insists; mkdir's mode is subject to umask
        result = self._run(
            [
                self.binaries.initdb,
                "-D",
                self.data,
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                f"--locale={_initdb_locale()}",
                "--no-sync",
            ],
            timeout=120,
        )
        self._check(result, "initdb")
        # Single-user mode needs no client program and no running server.
        result = self._run(
            [
                self.binaries.postgres,
                "--single",
                "-D",
                self.data,
                "-F",
                "-c",
                "exit_on_error=true",
                "postgres",
            ],
            stdin=f"CREATE DATABASE {DATABASE};\n",
            timeout=120,
        )
        self._check(result, f"creating database {DATABASE}")

    def start(self) -> str:
        last_error: PgTestError | None = None
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()  # another process may grab it first: retried below
            options = " ".join(
                [
                    f"-c listen_addresses={_HOST}",
                    f"-p {port}",
                    f"-k {shlex.quote(str(self.sockets))}",
                    *_SERVER_OPTIONS,
                ]
            )
            result = self._run(
                [
                    self.binaries.pg_ctl,
                    "-D",
                    self.data,
                    "-w",
                    "-t",
                    str(_START_TIMEOUT_S),
                    "-o",
                    options,
                    "-l",
                    self.log,
                    "start",
                ],
                timeout=_START_TIMEOUT_S + 30,
            )
            if result.returncode == 0:
                return f"postgresql+psycopg://{SUPERUSER}@{_HOST}:{port}/{DATABASE}"
            log = _tail(self.log)
            last_error = PgTestError(
                f"pg_ctl start failed with exit code {result.returncode}:\n"
                f"{(result.stdout + result.stderr).strip()}\n"
                f"--- last lines of {self.log} ---\n{log}"
            )
            self.stop()
            if "could not bind" not in log and "already in use" not in log:
                break
        assert last_error is not None
        raise last_error

    def _pid_file_exists(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        """Stop the server if it runs (its pid file exists); reports, never raises, failure."""
        if not self._pid_file_exists():
            return
        try:
            result = self._run(
                [
                    self.binaries.pg_ctl,
                    "-D",
                    self.data,
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    str(_START_TIMEOUT_S),
                    "stop",
                ],
                timeout=_START_TIMEOUT_S + 30,
            )
        except PgTestError as exc:
            print(f"pgtest: {exc}", file=sys.stderr)
            return
        if result.returncode != 0 and self._pid_file_exists():
            print(
                f"pgtest: pg_ctl stop failed ({result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}",
                file=sys.stderr,
            )

    def remove(self) -> None:
        """Delete the directory - unless a server may still be using it."""
        if self._pid_file_exists():
            print(
                f"pgtest: PostgreSQL may still be running; left {self.root} in place "
                f"(stop it with: pg_ctl -D {self.data} -m immediate stop)",
                file=sys.stderr,
            )
            return
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(binaries: PgBinaries | None = None) -> Iterator[str]:
    """Run a throw-away PostgreSQL for the duration of the ``with`` block.

    Yields the SQLAlchemy URL
    ``postgresql+psycopg://dispatcher@127.0.0.1:<port>/dispatcher_test``.
    On exit - normal, exception or ``KeyboardInterrupt`` - the server is
    stopped (``pg_ctl -m immediate stop``) and its directory removed.
    Raises :class:`PgTestError` when it cannot be started; the message holds
    the tail of the server log.
    """
    if binaries is None:
        binaries = find_binaries()
        if binaries is None:
            raise PgTestError(unavailable_reason() or "PostgreSQL binaries not found")
    user = _system_user()
    if user is not None and shutil.which("runuser") is None:
        raise PgTestError("running as root but `runuser` (util-linux) is not installed")
    server = _Server(binaries, user)
    try:
        server.prepare()
        yield server.start()
    finally:
        try:
            server.stop()
        finally:
            server.remove()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _Interrupted(BaseException):
    """A termination signal arrived while no command was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: After this many signals the command is sent SIGKILL.
_SIGNALS_BEFORE_KILL = 2


def _sigint_came_from_terminal() -> bool:
    """Whether a SIGINT most likely came from Ctrl-C on our terminal.

    The terminal then sends it to the whole foreground process group, which
    includes the command, so it must not be sent a second time.
    """
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


class _SignalRelay:
    """Handler for SIGINT/SIGTERM/SIGHUP while ``run`` is active.

    Before the command runs, a signal aborts the start-up (the server is
    still cleaned up).  While it runs, the signal is passed on to it and
    ``run`` waits for it to exit; a third signal kills it.  During the final
    clean-up signals are ignored so that the clean-up completes.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.received = 0
        self.stopping = False

    def __call__(self, signum: int, _frame: types.FrameType | None) -> None:
        if self.stopping:
            return
        child = self.child
        if child is None or child.returncode is not None:
            self.stopping = True
            raise _Interrupted(signum)
        self.received += 1
        try:
            if self.received > _SIGNALS_BEFORE_KILL:
                child.kill()
            elif not (signum == signal.SIGINT and _sigint_came_from_terminal()):
                child.send_signal(signum)
        except ProcessLookupError:
            pass


def _run_command(command: Sequence[str]) -> int:
    """Run ``command`` with the server up; the exit code to leave with."""
    relay = _SignalRelay()
    previous = {sig: signal.signal(sig, relay) for sig in _FORWARDED_SIGNALS}
    try:
        with running_postgres() as url:
            print(f"pgtest: PostgreSQL is up at {url}", file=sys.stderr, flush=True)
            env = {**os.environ, ENV_VAR: url}
            try:
                relay.child = subprocess.Popen(list(command), env=env)
            except OSError as exc:
                relay.stopping = True
                print(f"pgtest: cannot run {command[0]!r}: {exc}", file=sys.stderr)
                return 127
            returncode = relay.child.wait()
            relay.stopping = True
        return 128 - returncode if returncode < 0 else returncode
    except _Interrupted as exc:
        print(f"pgtest: interrupted by signal {exc.signum}", file=sys.stderr)
        return 128 + exc.signum
    except PgTestError as exc:
        print(f"pgtest: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_USAGE = f"""\
usage: pgtest.py available
       pgtest.py run -- COMMAND [ARG...]

available   exit 0 if a throw-away PostgreSQL can be started here, 1 (with the
            reason on stderr) if not
run         start PostgreSQL, run COMMAND with {ENV_VAR} set to its
            SQLAlchemy URL, stop PostgreSQL, exit with COMMAND's exit code
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"], ["help"]):
        print(_USAGE, end="")
        return 0
    if args == ["available"]:
        reason = unavailable_reason()
        if reason is not None:
            print(f"pgtest: {reason}", file=sys.stderr)
            return 1
        return 0
    if args and args[0] == "run":
        command = args[2:] if args[1:2] == ["--"] else args[1:]
        if command:
            return _run_command(command)
    print(_USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
