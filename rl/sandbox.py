"""Running untrusted code (model output) in an OS sandbox: bubblewrap namespaces, a seccomp filter, limits.

Anything that executes what a policy wrote (`code_exec`, a Python tool) runs a Python program through
`run_python` here. RL searches for holes: a policy that learns to rewrite its tests, read the answers or
reach the network gets reward for it, and the trainer's user is the one who would pay. So the boundary is
the kernel's, not the interpreter's (a Python audit hook is not a security boundary: ctypes and C
extensions never raise its events).

`sandbox: bwrap` (the default) — bubblewrap (`bwrap`, Debian/Ubuntu package `bubblewrap`, installed by
`.ci/install`) starts the program with:
- its own user (uid/gid 65534 inside), PID, mount, network, IPC, UTS and cgroup namespaces: it sees only its
  own processes (not the trainer: it cannot signal it), has no network but its own empty loopback, and a
  file system made of read-only binds of /usr (and the /bin, /lib... links) and the interpreter's prefix, a
  private /proc and a minimal /dev, plus one writable scratch directory (its cwd, HOME and TMPDIR, deleted
  afterwards). The run directory, checkpoints, the project, /etc, /tmp and the home directory are not there.
- every capability dropped, a new session (no terminal injection), `--die-with-parent`;
- a seccomp filter (built with libseccomp through `pyseccomp`, handed to bwrap as BPF) that KILLS the
  program (so the call scores nothing) on any attempt to start a process (fork, vfork, clone without
  CLONE_THREAD; threads still work), signal another process, open a socket other than a Unix one, or touch
  the kernel surfaces sandbox escapes go through (mount, ptrace, bpf, perf, keyrings, namespaces, io_uring,
  userfaultfd, modules, kexec...). Writing outside the scratch directory fails with the kernel's error
  (read-only file system, or no such directory): code that ignores the error has still written nothing;
- OS limits set before the untrusted code runs (address space, CPU seconds, file size, open files), a wall
  clock limit, and the whole process group killed at the end of every call: nothing survives a call.

`sandbox: python_only` — the weaker mode, for hosts with no bwrap or no user namespaces, only when a job
asks for it: the same program in a separate isolated interpreter under the same OS limits, with the audit
hook of rewards/isolation.py. It does NOT stop ctypes or C extensions from running commands, reading any file
the trainer's user can read, or reaching the network; a warning says so once.

What neither mode guarantees: an honest score. Tests that run in the candidate's own process (assert
strings) can be gamed by code that inspects or patches its harness (e.g. an object whose `__eq__` is always
True); stdin/stdout tests are compared outside the sandbox, by the trainer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rl.errors import UserError

log = logging.getLogger(__name__)

SandboxMode = Literal["bwrap", "python_only"]
SCRATCH = "/sandbox"  # where the scratch directory appears inside the bwrap sandbox
NOBODY = "65534"
OWNER_ENV = "RLPOST_SANDBOX_OWNER"
PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Limits:
    """What one call may use: wall clock, CPU seconds, address space, file size, open files."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    file_mb: int = 16
    open_files: int = 64

    @property
    def cpu_s(self) -> int:
        return max(1, int(self.timeout_s + 1))


@dataclass(frozen=True)
class Run:
    """A finished call: the program's stdout, whether it was killed at the time limit, the scratch
    directory's files it was asked to return (name -> bytes; missing ones are left out), and its exit
    status (FILTER_KILLED: the seccomp filter ended it)."""

    stdout: str
    timed_out: bool
    files: Mapping[str, bytes]
    returncode: int | None = None

    @property
    def blocked(self) -> bool:
        """The program tried something the sandbox forbids (and was killed for it)."""
        return self.returncode == FILTER_KILLED


def limits_prelude(limits: Limits) -> str:
    """Python that sets the OS limits; the runner executes it before any untrusted code."""
    pairs = ((("RLIMIT_AS", limits.memory_mb << 20), ("RLIMIT_CPU", limits.cpu_s),
              ("RLIMIT_FSIZE", limits.file_mb << 20), ("RLIMIT_NOFILE", limits.open_files)))
    lines = ["import resource"] + [f"resource.setrlimit(resource.{n}, ({v}, {v}))" for n, v in pairs]
    return "\n".join(lines) + "\n"


# --- the seccomp filter --------------------------------------------------------------------------------

FATAL_SYSCALLS = (
    # new processes (a fork bomb, a background process that outlives the call, a shell)
    "fork", "vfork",
    # signals to other processes (the sandbox sees only its own, but none may be signalled: no legitimate
    # test needs it, and it makes "kill the parent" end the call instead of passing silently)
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_send_signal", "pidfd_open",
    # the kernel surfaces sandbox escapes go through
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "ptrace", "process_vm_readv",
    "process_vm_writev", "kcmp", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "syslog", "open_by_handle_at", "name_to_handle_at", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "fanotify_init", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "personality",
)
"""Calls that end the program at once (SIGSYS): an attempt scores nothing instead of failing quietly (e.g.
ctypes' `system()` returns -1 and the code goes on) and passing its tests."""
CLONE_THREAD = 0x00010000
AF_UNIX = 1
FILTER_KILLED = 128 + 31  # bwrap's exit status when the program died of SIGSYS (the filter's kill)


@functools.cache
def seccomp_bpf() -> bytes:
    """The compiled filter: default allow; FATAL_SYSCALLS, process-making clones and non-Unix sockets kill."""
    import errno

    import pyseccomp as seccomp  # the one place the libseccomp bindings are imported

    f = seccomp.SyscallFilter(seccomp.ALLOW)
    kill = seccomp.KILL_PROCESS
    for name in FATAL_SYSCALLS:
        with contextlib.suppress(OSError):  # not a syscall on this architecture (no fork on aarch64): nothing to do
            f.add_rule(kill, name)
    # clone makes threads too (CLONE_THREAD set): only process-making clones are refused. clone3 passes its
    # flags in memory, out of a filter's reach, so it says "not implemented" and libc falls back to clone.
    f.add_rule(kill, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(kill, "socket", seccomp.Arg(0, seccomp.NE, AF_UNIX))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


# --- bubblewrap ----------------------------------------------------------------------------------------

def _system_dirs() -> list[str]:
    """Read-only binds of /usr and the interpreter's prefix; /bin, /lib... as links where they are links."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefix = os.path.realpath(sys.base_prefix)
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        args += ["--ro-bind", prefix, prefix]
    return args


def interpreter() -> str:
    """The base interpreter (not the venv's link, whose directory need not be visible in the sandbox)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def bwrap_command(bwrap: str, scratch: str, seccomp_fd: int, argv: Sequence[str]) -> list[str]:
    """The bwrap command line that runs `argv` with `scratch` as its only writable directory."""
    return [bwrap, "--unshare-all", "--unshare-user", "--uid", NOBODY, "--gid", NOBODY, "--hostname", "sandbox",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", *_system_dirs(),
            "--proc", "/proc", "--dev", "/dev", "--bind", scratch, SCRATCH, "--chdir", SCRATCH,
            "--clearenv", "--setenv", "HOME", SCRATCH, "--setenv", "TMPDIR", SCRATCH, "--setenv", "PATH",
            "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", OWNER_ENV, str(os.getpid()),  # whose sandbox this is: a leak can be traced to its owner
            "--remount-ro", "/", "--seccomp", str(seccomp_fd),
            "--", *argv]


def _which_bwrap() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def bwrap_problem() -> str | None:
    """None when bwrap runs a program here; else why not (probed once per process)."""
    bwrap = _which_bwrap()
    if bwrap is None:
        return "bubblewrap (`bwrap`) is not installed"
    try:
        run = _run_bwrap(bwrap, [interpreter(), "-I", "-S", "-c", "print('ok')"], {}, "", Limits(PROBE_TIMEOUT_S))
    except OSError as exc:
        return f"bwrap could not start ({exc})"
    if run.stdout.strip() != "ok":
        return ("bwrap could not start a sandbox here (no user namespaces? e.g. kernel.unprivileged_userns_clone=0 "
                "or an AppArmor userns restriction)")
    return None


# --- running -------------------------------------------------------------------------------------------

def _communicate(cmd: list[str], cwd: str, env: Mapping[str, str] | None, stdin: str, timeout_s: float,
                 pass_fds: Sequence[int] = ()) -> tuple[str, bool, int | None]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=tuple(pass_fds))
    try:
        out, _ = proc.communicate(stdin.encode(), timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        out, timed_out = b"", True
    finally:  # the whole group, always: the program may have left something behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if timed_out:
        out = (proc.communicate()[0] or b"")
    return out.decode("utf-8", "replace"), timed_out, None if timed_out else proc.returncode


def _collect(scratch: str, names: Sequence[str]) -> dict[str, bytes]:
    found = {}
    for name in names:
        path = Path(scratch, name)
        if path.is_file() and not path.is_symlink():
            found[name] = path.read_bytes()
    return found


def _run_bwrap(bwrap: str, argv: Sequence[str], files: Mapping[str, str], stdin: str, limits: Limits,
               collect: Sequence[str] = ()) -> Run:
    with tempfile.TemporaryDirectory(prefix="rlpost-sandbox-") as scratch:
        for name, text in files.items():
            Path(scratch, name).write_text(text)
        read, write = os.pipe()
        try:
            os.write(write, seccomp_bpf())  # a few KB: fits the pipe's buffer, so no writer thread is needed
            os.close(write)
            cmd = bwrap_command(bwrap, scratch, read, argv)
            out, timed_out, code = _communicate(cmd, scratch, None, stdin, limits.timeout_s, pass_fds=[read])
        finally:
            os.close(read)
        return Run(out, timed_out, _collect(scratch, collect), code)


def _run_python_only(argv: Sequence[str], files: Mapping[str, str], stdin: str, limits: Limits,
                     collect: Sequence[str] = ()) -> Run:
    with tempfile.TemporaryDirectory(prefix="rlpost-code-") as scratch:
        for name, text in files.items():
            Path(scratch, name).write_text(text)
        env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        out, timed_out, code = _communicate([sys.executable, *argv[1:]], scratch, env, stdin, limits.timeout_s)
        return Run(out, timed_out, _collect(scratch, collect), code)


def _bwrap_runner(argv: Sequence[str], files: Mapping[str, str], stdin: str, limits: Limits,
                  collect: Sequence[str]) -> Run:
    bwrap = _which_bwrap()
    assert bwrap is not None  # checked by require()
    return _run_bwrap(bwrap, argv, files, stdin, limits, collect)


RUNNERS: dict[str, Callable[[Sequence[str], Mapping[str, str], str, Limits, Sequence[str]], Run]] = {
    "bwrap": _bwrap_runner,
    "python_only": _run_python_only,
}


@functools.cache
def _warn_python_only() -> None:
    log.warning("sandbox: python_only runs model-written code under an audit hook and OS limits only: it does "
                "NOT stop ctypes or C extensions from running commands, reading the trainer user's files or "
                "reaching the network. Use it only on a machine you can lose; install bubblewrap for the OS "
                "sandbox.")


def require(mode: SandboxMode) -> None:
    """Raise a UserError unless `mode` can run here (call it before training starts)."""
    if mode not in RUNNERS:
        raise UserError(f"unknown sandbox {mode!r}; use one of {sorted(RUNNERS)} (bwrap: the OS sandbox).")
    if mode == "python_only":
        _warn_python_only()
        return
    problem = bwrap_problem()
    if problem is not None:
        raise UserError(f"code execution needs an OS sandbox, and {problem}. Install bubblewrap (`apt-get install "
                        "bubblewrap`, or run `bash .ci/install`, which does) on a host that allows user "
                        "namespaces; or, accepting that model-written code can then run commands, read your "
                        "files and reach the network, opt in to the weaker mode with `sandbox: python_only` in "
                        "the reward's kwargs.")


def run_python(source: str, args: Sequence[str], files: Mapping[str, str], stdin: str, limits: Limits,
               mode: SandboxMode = "bwrap", collect: Sequence[str] = ()) -> Run:
    """Run the Python program `source` (with `args`) in the sandbox: `files` (name -> text) are written to
    its scratch directory first, `stdin` is its input, and the scratch files named in `collect` come back."""
    require(mode)
    argv = [interpreter(), "-I", "-S", "-c", source, *args]
    return RUNNERS[mode](argv, files, stdin, limits, collect)
