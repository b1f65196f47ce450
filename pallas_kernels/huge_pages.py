"""Transparent huge pages for the CPU backend, by restarting the process with malloc asking.

The native kernels (`cpu_native.cc`) read K and V rows by index from caches of gigabytes. On
4 KiB pages nearly every such row is a TLB miss and a page walk, and every first touch of a
fresh XLA buffer a page fault (slow in a VM). Linux backs memory with 2 MiB pages always, never,
or (a common default, `madvise`) where the process asks; XLA:CPU allocates through glibc's
malloc, which asks when the tunable `glibc.malloc.hugetlb=1` is set (glibc >= 2.35). glibc reads
its tunables once, at start-up: hence a restart, done by each entry point before its work.

Setting `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` yourself keeps 4 KiB pages (no restart).
"""

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's setting, 'always', 'madvise' or 'never'; None off Linux."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def _glibc_asks() -> bool:
    """Whether this glibc's malloc can ask for huge pages (the tunable exists from 2.35)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)


def describe() -> str:
    """One line for a benchmark's record: what backs this process's large buffers."""
    mode = _thp_mode()
    tunable = next(
        (t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith(TUNABLE)),
        f"{TUNABLE} unset",
    )
    return f"transparent huge pages: {mode or 'unknown'}; {tunable}"


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, same command line) with malloc asking for
    huge pages, where that changes anything: THP `madvise`, glibc >= 2.35 and the tunable not
    set already (either way). Elsewhere, and if the restart fails, it returns and work goes on."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or _thp_mode() != "madvise" or not _glibc_asks():
        return
    environ = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:
        return
