"""A worker process that runs a model in another Python (DeepSparse's venv) and times it on request.

DeepSparse 1.8 needs NumPy < 2 (its C extension misreads NumPy 2 arrays and returns wrong
outputs without an error), so it cannot share the benchmark's process.  It runs here, in a
process started with the Python of its own venv (``python -m benchmarks.peers
--setup-deepsparse`` makes one), and the benchmark times it round-robin with its own formats by
asking for bursts of calls.

Run as a script: ``<venv>/bin/python -I benchmarks/deepsparse_worker.py``.  This file imports only
the standard library at the top: the worker side needs NumPy and DeepSparse, the parent side
(``WorkerClient``, ``RemoteForward``) NumPy only.

The protocol: JSON lines, one request on the worker's stdin, one reply on its stdout (library
output goes to stderr).  Every reply has ``"ok"``; a failed request gets ``"ok": false`` and
``"error"``, and the worker goes on.  On start the worker sends a hello: ``{"ok": true, "hello":
HELLO, "protocol": PROTOCOL, ...versions}`` (or ``"ok": false`` and why it cannot serve).

* ``{"op": "load", "model": path, "batch": b, "cores": n}`` -> ``{"engine": id, "compile_s",
  ...}``: compile the ONNX model for batch ``b`` on ``n`` cores;
* ``{"op": "run", "engine": id, "x": in.npy, "y": out.npy}`` -> ``{"shape"}``: run once on the
  array in ``in.npy``, write the output to ``out.npy``; ``x`` becomes the input of ``time``;
* ``{"op": "time", "engine": id, "calls": k}`` -> ``{"times": [k seconds]}``: ``k`` back-to-back
  calls on the last input, each timed with ``time.perf_counter`` around the call alone;
* ``{"op": "free", "engine": id}``; ``{"op": "quit"}`` (or end of input): stop.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

HELLO = "prunejax-model-worker"
PROTOCOL = 1
WORKER_PATH = os.path.abspath(__file__)

# A loader: (model path, batch, cores) -> (forward: x -> y, facts about the compiled engine).
Loader = Callable[[str, int, "int | None"], "tuple[Callable[[Any], Any], dict]"]


class WorkerError(RuntimeError):
    """The worker could not start, died, or refused a request (its message says why)."""


# ----------------------------------------------------------------------------- worker side


def _handle(req: dict, state: dict, load: Loader) -> dict:
    """One request's reply (raises on a bad request; ``serve`` turns that into an error)."""
    import numpy as np

    op = req.get("op")
    engines, inputs = state["engines"], state["inputs"]
    if op == "load":
        t0 = time.perf_counter()
        fwd, facts = load(str(req["model"]), int(req["batch"]), req.get("cores"))
        eid = state["next"]  # never reused: a freed engine's id stays unknown
        state["next"] += 1
        engines[eid] = fwd
        return {"engine": eid, "compile_s": time.perf_counter() - t0, **facts}
    eid = int(req.get("engine", -1))
    if op in ("run", "time", "free") and eid not in engines:
        raise KeyError(f"no engine {eid} (loaded: {sorted(engines)})")
    if op == "run":
        x = np.ascontiguousarray(np.load(req["x"]))
        y = np.asarray(engines[eid](x))
        np.save(req["y"], y)
        inputs[eid] = x
        return {"shape": list(y.shape)}
    if op == "time":
        if eid not in inputs:
            raise ValueError(f"engine {eid} has no input yet: send 'run' first")
        fwd, x, times = engines[eid], inputs[eid], []
        for _ in range(int(req["calls"])):
            t0 = time.perf_counter()
            fwd(x)
            times.append(time.perf_counter() - t0)
        return {"times": times}
    if op == "free":
        engines.pop(eid)
        inputs.pop(eid, None)
        return {}
    raise ValueError(f"unknown op {op!r}")


def serve(inp: IO[str], out: IO[str], load: Loader, hello: dict | None = None) -> None:
    """Answer requests from ``inp`` on ``out`` until ``quit`` or end of input.

    Args:
      inp: where requests come from, one JSON object per line.
      out: where replies go, one JSON object per line (flushed after each).
      load: compiles a model: ``(path, batch, cores) -> (forward, facts)``.
      hello: extra fields of the hello line (versions); ``{"ok": False, "error": ...}`` in it
        makes the worker say why it cannot serve, and stop.
    """

    def send(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    first = {"ok": True, "hello": HELLO, "protocol": PROTOCOL, **(hello or {})}
    send(first)
    if not first["ok"]:
        return
    state: dict[str, Any] = {"engines": {}, "inputs": {}, "next": 1}
    for line in inp:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                send({"ok": True})
                return
            send({"ok": True, **_handle(req, state, load)})
        except Exception as e:  # noqa: BLE001 - a bad request is answered, not fatal
            send({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})


def load_deepsparse(model: str, batch: int, cores: int | None) -> tuple[Callable, dict]:
    """Compile ``model`` with ``deepsparse.Engine`` for ``batch`` on ``cores`` physical cores."""
    from deepsparse import Engine

    eng = Engine(model=model, batch_size=batch, num_cores=cores)

    def forward(x: Any) -> Any:
        return eng.run([x], val_inp=False)[0]

    return forward, {"num_cores": eng.num_cores, "num_streams": eng.num_streams}


def deepsparse_hello() -> dict:
    """Versions and CPU facts, or ``ok: False`` where DeepSparse cannot give right answers."""
    import numpy as np

    facts: dict[str, Any] = {"numpy": np.__version__, "python": sys.version.split()[0]}
    try:
        import deepsparse
        from deepsparse import engine
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return {
            **facts,
            "ok": False,
            "error": f"deepsparse not importable: {type(e).__name__}: {e}",
        }
    facts.update(
        deepsparse=getattr(deepsparse, "__version__", "?"),
        avx_type=str(getattr(engine, "AVX_TYPE", "?")),
        vnni=bool(getattr(engine, "VNNI", False)),
    )
    if int(np.__version__.split(".")[0]) >= 2:
        why = "DeepSparse 1.8 misreads NumPy 2 arrays (wrong outputs, no error): needs numpy<2"
        return {
            **facts,
            "ok": False,
            "error": f"numpy {np.__version__} in the worker's venv: {why}",
        }
    return facts


def main() -> None:
    """The worker: replies on the original stdout, everything else printed goes to stderr."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, proto, load_deepsparse, deepsparse_hello())


# ----------------------------------------------------------------------------- parent side


class WorkerClient:
    """The parent's end of a worker: start it, send requests, read replies with time limits.

    Args:
      cmd: the worker's command line, e.g. ``[venv_python, WORKER_PATH]``.
      env: extra environment variables for the worker.
      start_timeout: seconds to wait for the hello.

    Raises:
      WorkerError: the worker did not start or said it cannot serve (its reason, and the end of
        its stderr).
    """

    def __init__(
        self, cmd: Sequence[str], env: dict | None = None, start_timeout: float = 120.0
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="prunejax-worker-")
        self.err_path = os.path.join(self.tmp.name, "stderr.log")
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in close()
        self._buf = b""
        self._n = 0
        try:
            self.proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._err,
                env={**os.environ, **(env or {})},
            )
        except OSError as e:
            self._err.close()
            self.tmp.cleanup()
            raise WorkerError(f"cannot start {cmd[0]}: {e}") from None
        try:
            self.hello = self._read(start_timeout)
        except WorkerError:
            self.close()
            raise
        if not self.hello.get("ok") or self.hello.get("hello") != HELLO:
            self.close()
            raise WorkerError(str(self.hello.get("error") or f"not a worker: {self.hello}"))

    def _stderr_tail(self, n: int = 600) -> str:
        try:
            with open(self.err_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:].strip()
        except OSError:
            return ""

    def _read(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerError(f"worker did not answer in {timeout:.0f} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # end of output: the worker is exiting; its status, when it has one
                try:
                    rc = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    rc = None
                raise WorkerError(f"worker exited (rc {rc}): {self._stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise WorkerError(f"worker sent a line that is not JSON: {line[:200]!r}") from None

    def request(self, op: str, timeout: float = 120.0, **fields: Any) -> dict:
        """Send ``{"op": op, **fields}``; the reply, or WorkerError with the worker's message."""
        if self.proc.poll() is not None:
            raise WorkerError(f"worker exited (rc {self.proc.returncode}): {self._stderr_tail()}")
        try:
            self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise WorkerError(f"worker is gone ({e}): {self._stderr_tail()}") from None
        reply = self._read(timeout)
        if not reply.get("ok"):
            raise WorkerError(f"{op}: {reply.get('error')}")
        return reply

    def load(self, model: str, batch: int, cores: int | None, timeout: float = 900.0) -> dict:
        """Compile ``model`` for ``batch``; the reply (``engine`` id, ``compile_s``, facts)."""
        return self.request("load", timeout, model=str(model), batch=int(batch), cores=cores)

    def run(self, engine: int, x: Any) -> Any:
        """One call of ``engine`` on ``x`` (which becomes its timing input); the output."""
        import numpy as np

        self._n += 1
        xp = os.path.join(self.tmp.name, f"x{self._n}.npy")
        yp = os.path.join(self.tmp.name, f"y{self._n}.npy")
        np.save(xp, np.ascontiguousarray(np.asarray(x)))
        try:
            self.request("run", engine=engine, x=xp, y=yp)
            return np.load(yp)
        finally:
            for p in (xp, yp):
                if os.path.exists(p):
                    os.remove(p)

    def time_calls(self, engine: int, calls: int) -> list[float]:
        """``calls`` back-to-back calls of ``engine`` on its input: seconds each, worker-timed."""
        return [float(t) for t in self.request("time", engine=engine, calls=int(calls))["times"]]

    def free(self, engine: int) -> None:
        """Release a compiled engine."""
        self.request("free", engine=engine)

    def close(self) -> None:
        """Ask the worker to quit (kill it after 10 s), remove the temporary files."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(b'{"op": "quit"}\n')
                proc.stdin.flush()
                proc.stdin.close()
                proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if not self._err.closed:
            self._err.close()
        self.tmp.cleanup()


class RemoteForward:
    """A compiled engine of a worker as a benchmark callable.

    Calling it runs the engine once on ``x`` (the output check); ``time_calls(k)`` is what the
    benchmark's timer uses instead of timing calls itself: ``k`` back-to-back calls timed inside
    the worker, so the pipe's round trip is not counted as the engine's time.
    """

    def __init__(self, client: WorkerClient, engine: int) -> None:
        self.client = client
        self.engine = engine

    def __call__(self, x: Any) -> Any:
        return self.client.run(self.engine, x)

    def time_calls(self, calls: int) -> float:
        """Seconds per call of ``calls`` back-to-back calls, timed in the worker."""
        times = self.client.time_calls(self.engine, calls)
        return sum(times) / len(times)


if __name__ == "__main__":
    main()
