"""Multi-process runs on JAX's own distributed runtime (``jax.distributed``), on one machine or a cluster.

    spec = ClusterSpec(coordinator="10.0.0.1:7777", num_processes=4, process_id=2)   # or ClusterSpec(auto=True)
    with session(spec) as rt:          # joins the runtime, starts the peer watchdog, leaves cleanly at the end
        mesh = make_mesh("data=-1")    # the global mesh over every process's devices
        ...
        entries = rt.gather_json("batch3", mine)   # process 0 gets every process's value, the others None

What this module adds to ``jax.distributed.initialize``:

* clear errors before joining: a coordinator port already taken (process 0) or no coordinator answering
  (the others) is one ``error:`` line, not an abort inside the runtime;
* CPU collectives over gloo, so a multi-process run works on CPU-only machines (and in the tests);
* a **peer watchdog**: every process bumps a counter in the coordinator's key-value store once a second;
  process 0 watches all counters, the others watch process 0's. A process whose counter stands still for
  ``peer_timeout`` seconds (killed, crashed, pre-empted) is named on stderr (process 0 publishes it to the
  others) and every other process exits with code 1, whatever it was doing (a thread ends the process, even
  one blocked in a collective). JAX's own heartbeat is set to three times that timeout as a back-stop. When
  process 0 (the coordinator) dies, JAX's runtime ends the others itself, with its own message;
* barriers and gathers with timeouts (a peer that is alive but stuck does not hang the job);
* :func:`owned_rows` / :func:`host_local`: which batch rows this process writes, and the host copy of its part
  of a global array (``np.asarray`` of an array spanning other processes' devices is an error);
* :func:`launch_local`: N processes of one command on this machine (``fkv generate --local-processes N``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

KEY_PREFIX = "fkv"
EXIT_PEER_FAILED = 1  # exit code of a process that stops because another one failed


class DistributedError(RuntimeError):
    """The distributed runtime could not be joined, or a peer failed (one line, names the process)."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How to join: explicit (coordinator, num_processes, process_id), or ``auto`` (SLURM, Cloud TPU, ...)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    peer_timeout: float = 30.0  # seconds without a sign of life before a peer is declared dead
    init_timeout: int = 300  # seconds process 0 waits for everyone to join

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None

    def check(self) -> None:
        """Cheap consistency checks (no network); raises ValueError naming the option."""
        given = [self.coordinator is not None, self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together (all three or none)")
        if self.auto and self.explicit:
            raise ValueError("--distributed auto-detects the cluster; drop it when --coordinator is given")
        if self.explicit:
            parse_address(self.coordinator)
            if self.num_processes < 1:
                raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
            if not 0 <= self.process_id < self.num_processes:
                raise ValueError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.peer_timeout < 1:
            raise ValueError(f"--peer-timeout must be >= 1 second, got {self.peer_timeout:g}")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError naming --coordinator otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:7777), got {text!r}")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _preflight(spec: ClusterSpec) -> None:
    """Process 0 must be able to bind the port; the others must reach it (retried up to init_timeout)."""
    host, port = parse_address(spec.coordinator)
    if spec.process_id == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("" if host not in ("127.0.0.1", "localhost") else host, port))
            except OSError as e:
                raise DistributedError(
                    f"process 0 cannot listen on --coordinator {spec.coordinator}: {e.strerror or e} "
                    "(is another job using that port?)"
                ) from None
        return
    deadline = time.monotonic() + spec.init_timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {spec.process_id}: no coordinator answers at {spec.coordinator} after "
                    f"{spec.init_timeout} s ({e.strerror or e}); is process 0 running?"
                ) from None
            time.sleep(0.2)


def _client():
    from jax._src import distributed

    return distributed.global_state.client


@dataclasses.dataclass(frozen=True)
class Runtime:
    """This process's place in the run (``num_processes == 1``: a single process, every method is local)."""

    process_id: int = 0
    num_processes: int = 1
    peer_timeout: float = 30.0

    @property
    def is_main(self) -> bool:
        return self.process_id == 0

    @property
    def multi(self) -> bool:
        return self.num_processes > 1

    @property
    def wait_ms(self) -> int:
        """How long a barrier or gather waits for a live but slow peer (dead peers are the watchdog's)."""
        return int(max(600.0, 20 * self.peer_timeout) * 1000)

    def barrier(self, name: str) -> None:
        if not self.multi:
            return
        try:
            _client().wait_at_barrier(f"{KEY_PREFIX}/{name}", self.wait_ms)
        except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
            raise DistributedError(f"process {self.process_id}: barrier {name!r} failed: {_first_line(e)}") from None

    def gather_json(self, name: str, value) -> list | None:
        """Every process's JSON-able ``value``, in process order, on process 0 (None on the others)."""
        if not self.multi:
            return [value]
        client = _client()
        client.key_value_set(f"{KEY_PREFIX}/{name}/{self.process_id}", json.dumps(value))
        if not self.is_main:
            return None
        out = []
        for p in range(self.num_processes):
            try:
                out.append(json.loads(client.blocking_key_value_get(f"{KEY_PREFIX}/{name}/{p}", self.wait_ms)))
            except Exception as e:  # noqa: BLE001
                raise DistributedError(
                    f"process {p} did not report {name!r} within {self.wait_ms // 1000} s: {_first_line(e)}"
                ) from None
        return out

    def broadcast_json(self, name: str, value=None):
        """Process 0's JSON-able ``value`` on every process."""
        if not self.multi:
            return value
        client = _client()
        key = f"{KEY_PREFIX}/{name}/bcast"
        if self.is_main:
            client.key_value_set(key, json.dumps(value))
            return value
        try:
            return json.loads(client.blocking_key_value_get(key, self.wait_ms))
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"process {self.process_id}: no {name!r} from process 0 within {self.wait_ms // 1000} s: "
                f"{_first_line(e)}"
            ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class _Watchdog:
    """A daemon thread: bump this process's counter, watch the others'; see the module docstring."""

    def __init__(self, rt: Runtime, period: float = 1.0):
        self.rt, self.period = rt, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fkv-peer-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _fail(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_FAILED)

    def _run(self) -> None:
        """Process 0 watches everyone with one directory read per period; the others watch process 0, which
        publishes a failure it sees under ``fkv/failed`` (a few RPCs per process per second at any scale)."""
        rt, client = self.rt, _client()
        me = f"process {rt.process_id} of {rt.num_processes}"
        watched = [p for p in range(rt.num_processes) if p != rt.process_id] if rt.is_main else [0]
        last = {p: (None, time.monotonic()) for p in watched}
        beat = 0
        while not self._stop.wait(self.period):
            beat += 1
            try:
                client.key_value_set(f"{KEY_PREFIX}/alive/{rt.process_id}", str(beat), allow_overwrite=True)
                if not rt.is_main and (failed := _try_get(client, f"{KEY_PREFIX}/failed")) is not None:
                    self._fail(f"{failed} (seen by process 0); {me} stops too")
                if rt.is_main:
                    alive, finished = _dir(client, f"{KEY_PREFIX}/alive/"), _dir(client, f"{KEY_PREFIX}/finished/")
                else:
                    alive = {0: _try_get(client, f"{KEY_PREFIX}/alive/0")}
                    finished = {0} if _try_get(client, f"{KEY_PREFIX}/finished/0") is not None else set()
                now = time.monotonic()
                for p, (seen, since) in list(last.items()):
                    if p in finished:
                        last.pop(p)  # finished cleanly: no more beats expected
                    elif alive.get(p) != seen:
                        last[p] = (alive.get(p), now)
                    elif now - since > rt.peer_timeout:
                        what = (
                            f"process {p} of {rt.num_processes} stopped responding ({rt.peer_timeout:g} s without "
                            "a sign of life: it died, was killed or pre-empted)"
                        )
                        if rt.is_main:  # tell the others, give them a moment to read it, then stop
                            client.key_value_set(f"{KEY_PREFIX}/failed", what, allow_overwrite=True)
                            print(f"error: {what}; {me} stops too", file=sys.stderr, flush=True)
                            time.sleep(2 * self.period)
                            os._exit(EXIT_PEER_FAILED)
                        self._fail(f"{what}; {me} stops too")
            except Exception as e:  # noqa: BLE001 - the coordinator is gone
                if self._stop.is_set():
                    return
                who = "this process is" if rt.is_main else "process 0 (the coordinator) is"
                self._fail(f"lost the distributed runtime ({who} unreachable: {_first_line(e)}); {me} stops")


def _dir(client, prefix: str) -> dict[int, str]:
    """{process: value} of the keys under ``prefix``."""
    return {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(prefix)}


def _try_get(client, key: str):
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND until the peer's first beat
        return None


def _initialize(spec: ClusterSpec) -> Runtime:
    import jax

    # CPU devices talk over gloo (harmless on GPU / TPU, whose collectives are their own); restored on failure
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    hb = int(max(3 * spec.peer_timeout, 10))
    try:
        if spec.auto:
            jax.distributed.initialize(
                initialization_timeout=spec.init_timeout, heartbeat_timeout_seconds=hb, shutdown_timeout_seconds=hb
            )
        else:
            _preflight(spec)
            jax.distributed.initialize(
                coordinator_address=spec.coordinator,
                num_processes=spec.num_processes,
                process_id=spec.process_id,
                initialization_timeout=spec.init_timeout,
                heartbeat_timeout_seconds=hb,
                shutdown_timeout_seconds=hb,
            )
    except DistributedError:
        jax.config.update("jax_cpu_collectives_implementation", before)
        raise
    except (ValueError, RuntimeError) as e:
        jax.config.update("jax_cpu_collectives_implementation", before)
        if spec.auto:
            raise DistributedError(
                f"--distributed found no cluster to join ({_first_line(e)}); JAX detects SLURM, Open MPI and "
                "Cloud TPU; elsewhere pass --coordinator HOST:PORT --num-processes N --process-id I "
                "(or --local-processes N on one machine)"
            ) from None
        raise DistributedError(f"cannot join the distributed runtime at {spec.coordinator}: {_first_line(e)}") from None
    return Runtime(jax.process_index(), jax.process_count(), spec.peer_timeout)


@contextlib.contextmanager
def session(spec: ClusterSpec | None) -> Iterator[Runtime]:
    """Join the runtime (``None``: a single process, nothing to join), watch the peers, leave cleanly.

    A :class:`DistributedError` (or any other error) inside the block ends this process without waiting for
    the others at the exit barrier: they notice through the watchdog."""
    if spec is None:
        yield Runtime()
        return
    spec.check()
    rt = _initialize(spec)
    if not rt.multi:
        yield rt
        return
    dog = _Watchdog(rt)
    dog.start()
    try:
        yield rt
    except BaseException:
        sys.stderr.flush()
        dog.stop()
        raise
    client = _client()
    client.key_value_set(f"{KEY_PREFIX}/finished/{rt.process_id}", "1")
    try:
        rt.barrier("exit")
    finally:
        dog.stop()
    import jax

    jax.distributed.shutdown()


COMMUNICATION_ERRORS = ("gloo", "connection", "unavailable", "deadline", "nccl", "peer", "socket")


def fail_fast(rt: Runtime, exc: BaseException) -> None:
    """End a multi-process run after an error in this process: the message, then exit at once (the runtime's
    exit-time shutdown would wait for the peers that are still computing). A failed collective is usually a
    peer that died: the watchdog gets ``peer_timeout`` seconds to name it (and end this process) first."""
    if not rt.multi:
        return
    text = _first_line(exc)
    if any(word in text.lower() for word in COMMUNICATION_ERRORS):
        time.sleep(rt.peer_timeout + 5)
    print(f"error: process {rt.process_id} of {rt.num_processes} failed: {text}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_PEER_FAILED)


# ---- arrays that span processes ----------------------------------------------------------------------------


def owned_rows(array_or_sharding, batch: int | None = None) -> list[int]:
    """Rows (axis 0) of a global array that this process writes: those held by one of its devices, each row
    owned by the lowest process index that holds it (a row replicated over ``model`` is written once).

    Takes a ``jax.Array``, or a sharding plus ``batch``; a single-device array: every row."""
    import jax

    sharding = getattr(array_or_sharding, "sharding", array_or_sharding)
    if batch is None:
        batch = array_or_sharding.shape[0]
    if jax.process_count() == 1 or not hasattr(sharding, "devices_indices_map"):
        return list(range(batch))
    owner = [None] * batch
    for dev, idx in sharding.devices_indices_map((batch,)).items():
        for r in range(batch)[idx[0]]:
            if owner[r] is None or dev.process_index < owner[r]:
                owner[r] = dev.process_index
    me = jax.process_index()
    return [r for r in range(batch) if owner[r] == me]


def host_local(x) -> np.ndarray:
    """Host copy of ``x`` (float32 numpy of the global shape). For an array that spans other processes'
    devices only this process's shards are filled; the rest is NaN (never read by this process)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    out = np.full(x.shape, np.nan, dtype=x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def gather_rows(local: np.ndarray, sharding) -> np.ndarray:
    """The global value of an array whose rows are spread over processes (``local``: global shape, this
    process's shards filled, as :func:`host_local` returns), on every process: one all-gather."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return local
    arr = jax.make_array_from_callback(local.shape, sharding, lambda idx: local[idx])
    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


# ---- one machine, several processes -------------------------------------------------------------------------


def launch_local(
    command: Sequence[str],
    num_processes: int,
    *,
    port: int | None = None,
    env: dict | None = None,
    poll: float = 0.2,
    log=lambda s: print(s, file=sys.stderr, flush=True),
) -> int:
    """Run ``command + [--coordinator 127.0.0.1:PORT --num-processes N --process-id I]`` N times on this
    machine and wait. When one process fails, it is named and the others are stopped; returns the first
    non-zero exit code (0 when all succeed)."""
    port = port or free_port()
    procs = []
    for i in range(num_processes):
        argv = [*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes)]
        argv += ["--process-id", str(i)]
        procs.append(subprocess.Popen(argv, env=env))
    log(f"launched {num_processes} processes on 127.0.0.1:{port} (pids {', '.join(str(p.pid) for p in procs)})")
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0) and failed is None:
                    failed = (i, code)
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    log(f"error: process {i} of {num_processes} (pid {p.pid}) failed ({how}); stopping the others")
                    _stop(procs)
            time.sleep(poll)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    if failed is not None:
        code = failed[1]
        return code if code > 0 else 128 - code
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0)


def _stop(procs, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (JAX's pre-emption notifier catches SIGTERM and the process
    would go on until its watchdog fires)."""
    for q in procs:
        if q.poll() is None:
            q.terminate()
    deadline = time.monotonic() + grace
    for q in procs:
        try:
            q.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            q.kill()
            q.wait()
