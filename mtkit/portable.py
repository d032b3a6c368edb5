"""What differs between Linux, macOS and Windows, in one place: a lock on an open file.

POSIX systems lock with fcntl.flock; Windows with msvcrt.locking. Either way the system releases
the lock when the file is closed or the process ends, so a killed run leaves no stale lock. Where
there is no lock to take (neither module, or a file system that refuses them, such as an NFS mount
without its lock service), `lock` says so and the caller goes on unlocked, saying so too: a
missing lock costs the protection against a second run, never the work.

(Signals: SIGINT and SIGTERM exist on every system Python runs on. The C allocator's settings are
fast.keep_freed_memory's, for glibc on Linux only.)
"""

import errno
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # everything but Windows
    msvcrt = None

NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def lock(f: IO) -> bool | str:
    """Take an exclusive lock on the open file `f` without waiting. True: taken; False: another
    process holds it; a string: no lock can be taken here, and why."""
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        if msvcrt is not None:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)  # the first byte stands for the file
            return True
    except BlockingIOError:
        return False
    except PermissionError:  # msvcrt's word for a lock another process holds
        return False
    except OSError as e:
        if e.errno in NO_LOCKS:
            return f"this file system takes no locks ({e.strerror})"
        raise
    return "this system has neither fcntl nor msvcrt"
