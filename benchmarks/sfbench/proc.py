"""The orchestrator's side of the worker processes: their environment and the JSON-line
protocol (the handlers that answer it are in workers.py)."""
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

from . import env
from .env import THIS, USER_GOMP_SPINCOUNT, USER_OMP_WAIT_POLICY


def torch_env() -> Dict[str, str]:
    """Environment for PyTorch processes: stackformer's OMP_WAIT_POLICY and GOMP_SPINCOUNT
    ("same", the default), or the user's own settings ("default": libgomp's spinning default
    when unset)."""
    e = dict(os.environ)
    if env.TORCH_OMP_WAIT == "same":
        import stackformer  # noqa: F401  (sets its default into os.environ)
        e = dict(os.environ)
    else:
        for key, user in (("OMP_WAIT_POLICY", USER_OMP_WAIT_POLICY), ("GOMP_SPINCOUNT", USER_GOMP_SPINCOUNT)):
            if user is None:
                e.pop(key, None)
            else:
                e[key] = user
    return e


class WorkerError(RuntimeError):
    pass


class Worker:
    """A persistent subprocess answering JSON-line requests (see worker_main)."""

    def __init__(self, kind: str, threads: int, env: Optional[Dict[str, str]] = None):
        e = torch_env() if kind == "torch" else dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, str(THIS), "--_worker", kind, "--threads", str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=e)
        # wait until it has imported its libraries: a worker starting up (seconds of CPU) would
        # otherwise take a core from whatever is measured next
        self.call(op="ping")

    def call(self, **msg: Any) -> Dict[str, Any]:
        try:
            self.p.stdin.write(json.dumps(msg) + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as ex:
            raise WorkerError(f"worker is gone: {ex}")
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise WorkerError(f"worker exited (rc={self.p.poll()})")
            if line.startswith("@@"):
                r = json.loads(line[2:])
                if "error" in r:
                    raise WorkerError(r["error"])
                return r

    @property
    def pid(self) -> int:
        return self.p.pid

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.p.stdin.flush()
                self.p.wait(timeout=30)
            except Exception:
                self.p.kill()
                self.p.wait()
