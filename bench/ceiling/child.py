"""Child processes of the ceilings: a bare peer (a consumer, a server) in its own interpreter,
talking to the parent over its stdout, one line per message."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


async def start_child(module: str, *args: str) -> asyncio.subprocess.Process:
    """``python -m module args...`` with this repository importable, stdout piped to us."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE, env=env
    )


async def read_line(child: asyncio.subprocess.Process) -> str:
    """The child's next line; RuntimeError when it exited instead."""
    assert child.stdout is not None
    line = (await child.stdout.readline()).decode().strip()
    if not line:
        await child.wait()
        raise RuntimeError(f"the child process exited with status {child.returncode}")
    return line


async def stop_child(child: asyncio.subprocess.Process) -> None:
    """Kill the child (if it still runs) and reap it."""
    if child.returncode is None:
        child.kill()
    await child.wait()
