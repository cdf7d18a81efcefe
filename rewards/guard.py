"""`trusted_code_guard`: a Python audit hook that keeps trusted code (user reward functions, and the weaker
`sandbox: python_only` mode) from opening sockets, starting processes or writing outside its directory by
mistake. Not a security boundary: ctypes and C extensions never raise the events it watches (rl/sandbox.py is
the boundary for model-written code). A module of its own, standard library only, so a sandboxed runner can
import it in milliseconds (rewards/isolation.py pulls in multiprocessing).
"""

from __future__ import annotations

import os
from collections.abc import Callable

NETWORK_EVENTS = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"})
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                            "os.forkpty", "pty.spawn"})
PATH_EVENTS = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown",
                         "os.link", "os.symlink", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _is_write(mode: object, flags: object) -> bool:
    if isinstance(mode, str) and any(m in mode for m in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


def trusted_code_guard(root: str) -> Callable[[str, tuple], None]:
    """An audit hook for trusted code: PermissionError on network, process and outside-`root` writes (a
    guard against mistakes, not a sandbox: see the module doc)."""
    root = os.path.realpath(root)

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already-open descriptor: its open was checked
            return True
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in NETWORK_EVENTS:
            raise PermissionError(f"reward guard: network access is not allowed ({event})")
        if event in PROCESS_EVENTS:
            raise PermissionError(f"reward guard: starting processes is not allowed ({event})")
        if event == "open" and len(args) >= 3 and _is_write(args[1], args[2]) and not inside(args[0]):
            raise PermissionError(f"reward guard: writing {args[0]!r} is not allowed (only inside {root})")
        if event in PATH_EVENTS:
            for path in args[:2] if event in ("os.rename", "os.link", "os.symlink", "shutil.move") else args[:1]:
                if not inside(path):
                    raise PermissionError(f"reward guard: {event} on {path!r} is not allowed (only inside {root})")

    return hook
