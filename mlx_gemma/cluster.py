"""One rank of several (a CLI under `mlx.launch`): joining the group without hanging, noticing
a rank that dies, one stdout, one agreed input.

- Joining: `mx.distributed.init` blocks (holding the GIL) until every rank is up, forever if one
  never comes. A small watchdog process kills this one with a one-line error after
  CONNECT_TIMEOUT seconds unless it joined by then.
- Faults: a side channel of TCP heartbeats between every pair of ranks (ports exchanged over
  the group at start). A rank whose connection closes without a goodbye died; one silent for
  HEARTBEAT_TIMEOUT seconds hangs (or its machine went away); a rank that stops on an error
  says so first. Each survivor prints one line naming the rank and the cause and exits 1.
  Collectives themselves have no timeout; the heartbeat bounds how long a survivor waits.
- Output: only rank 0 writes to stdout and stderr (the others' go to /dev/null). Another rank's
  error reaches rank 0 over the side channel, which prints it; a rank that survives rank 0
  prints its own line, marked with its rank. mlx.launch exits 0 whatever
  the ranks do, so these lines and each rank's exit status are what carry a failure.
- Input: rank 0 reads standard input and shares what it read; every rank runs the same steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .errors import DistributedError, InputError, MlxGemmaError

# Seconds; the environment can change both (a slow network, a test).
CONNECT_TIMEOUT = float(os.environ.get("MLX_GEMMA_CONNECT_TIMEOUT", 60))
HEARTBEAT_TIMEOUT = float(os.environ.get("MLX_GEMMA_HEARTBEAT_TIMEOUT", 10))
HEARTBEAT_INTERVAL = 1.0
# Set by mlx.launch (ring, jaccl, nccl) or mpirun: this process is one rank of several.
_LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")

_WATCHDOG = """
import os, select, signal, sys
pid, timeout, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], timeout)[0]:
    sys.stderr.write(line + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


def launched() -> bool:
    return any(v in os.environ for v in _LAUNCH_VARIABLES)


def _ring_hosts() -> list:
    """The ring hostfile mlx.launch writes: one list of "ip:port" per rank ([] for another backend)."""
    name = os.environ.get("MLX_HOSTFILE", "")
    try:
        hosts = json.loads(Path(name).read_text()) if name and Path(name).is_file() else json.loads(name or "[]")
    except (OSError, ValueError):
        return []
    return hosts if isinstance(hosts, list) and all(isinstance(h, list) and h for h in hosts) else []


def fingerprint(path: Path) -> str:
    """What must be equal on every rank: config.json and the weight files' tensor lists."""
    from .loading import read_safetensors_header, weight_files

    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(json.dumps(sorted(read_safetensors_header(f).items())).encode())
    return h.hexdigest()


class Cluster:
    """The ranks of one run; `Cluster()` alone is a single process (every method is then trivial)."""

    def __init__(self, group: Optional[mx.distributed.Group] = None, error_stream=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self._error_stream = error_stream or sys.stderr
        self._monitor: Optional[_Monitor] = None

    # --- exchanging small values over the group -------------------------------------------------

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (ints below 2^31, as many on each rank), on every rank."""
        if self.size == 1:
            return [list(values)]
        # A step still in flight on this thread's stream (the server's worker) holds the model's
        # collectives: they must reach the ring before this one does, on every rank alike.
        mx.synchronize()
        rows = mx.zeros((self.size, len(values)), dtype=mx.int32)
        rows[self.rank] = mx.array(values, dtype=mx.int32)
        return mx.distributed.all_sum(rows, group=self.group, stream=mx.cpu).tolist()

    def share(self, value=None):
        """Rank 0's `value` (any picklable object) on every rank; the other ranks pass nothing."""
        if self.size == 1:
            return value
        data = pickle.dumps(value) if self.rank == 0 else b""
        n = self.gather([len(data)])[0][0]
        mine = np.frombuffer(data, np.uint8) if self.rank == 0 else np.zeros(n, np.uint8)
        got = mx.distributed.all_sum(mx.array(mine), group=self.group, stream=mx.cpu)
        return pickle.loads(bytes(np.array(got)))

    def from_rank0(self, read: Callable[[], Optional[str]]) -> Callable[[], Optional[str]]:
        """`read` run on rank 0, its text (or None, or the InputError it raised) on every rank."""
        if self.size == 1:
            return read

        def shared():
            message = None
            if self.rank == 0:
                try:
                    message = ("text", read())
                except InputError as e:
                    message = ("error", str(e))
            kind, value = self.share(message)
            if kind == "error":
                raise InputError(value)
            return value

        return shared

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on some rank, on every rank. It runs on the default stream, as
        the model's own collectives do: issued while a step is in flight, it still reaches every
        rank in the same order as theirs."""
        if self.size == 1:
            return flag
        return mx.distributed.all_sum(mx.array([float(flag)]), group=self.group).item() > 0

    def _everyone(self, value: int) -> list[int]:
        """Every rank's `value` (below 2^51), on every rank."""
        return [high << 20 | low for high, low in self.gather([value >> 20, value & ((1 << 20) - 1)])]

    def smallest(self, value: int) -> int:
        """The smallest `value` of any rank (a memory budget: every rank plans with the same one)."""
        return value if self.size == 1 else min(self._everyone(value))

    def largest(self, value: int) -> int:
        """The largest `value` of any rank (the bytes of a cache whose layers the ranks split)."""
        return value if self.size == 1 else max(self._everyone(value))

    def seed(self, seed: Optional[int]) -> Optional[int]:
        """One sampling seed on every rank: each samples the same token from the same logits.
        Seeds this thread (MLX's generator is per thread) and returns the seed for others."""
        if seed is None and self.size > 1:
            seed = self.gather([random.getrandbits(31)])[0][0]
        if seed is not None:
            mx.random.seed(seed)
        return seed

    def check_same_checkpoint(self, path: Path) -> None:
        if self.size == 1:
            return
        digests = self.gather(list(bytes.fromhex(fingerprint(path))))
        for rank, d in enumerate(digests):
            if d != digests[0]:
                raise DistributedError(f"rank {rank} has a different checkpoint than rank 0 (config/weights hash "
                                       f"{bytes(d).hex()[:12]} vs {bytes(digests[0]).hex()[:12]}): give every rank "
                                       "the same --model")

    def drafter(self, choice: Optional[str], pipeline: bool, config) -> bool:
        """Whether to look for an MTP drafter (`--draft-model`): across pipeline stages, only
        when one stage holds every layer whose K/V it reads (the last stage does, on Gemma 4)."""
        from .distributed import drafting_rank

        if self.size == 1 or not pipeline or drafting_rank(config.text_config, self.size) is not None:
            return True
        if choice not in (None, "none"):
            raise DistributedError(f"--draft-model: the layers the drafter reads are on different ones of the "
                                   f"{self.size} pipeline stages; use --draft-model none, or tensor parallel")
        return False

    # --- planning ---------------------------------------------------------------------------------

    def plan(self, plan, config, kv, dtype_bytes: int, step: int, pipeline: bool, refuse: bool = True):
        """Each rank's share of `plan` (a single-process `memory.Plan`); refuses, naming the rank,
        when one will not fit (unless `refuse` is off, for --plan)."""
        if self.size == 1:
            return plan
        from . import memory
        from .distributed import drafting_rank

        mode = "pipeline" if pipeline else "tensor"
        # A drafter is replicated under tensor parallel; one pipeline stage holds it.
        drafts = drafting_rank(config.text_config, self.size) if pipeline else None
        plans = RankPlans()
        for r, (view, weights) in enumerate(self.shares(config, plan.weights, pipeline)):
            draft = plan.draft if drafts is None or r == drafts else None
            p = memory.make_plan(view, weights, plan.context, plan.budget, kv, dtype_bytes, step, draft)
            if refuse and not p.fits:
                raise DistributedError(f"rank {r} ({mode} parallel): "
                                       + memory.refusal(p, view, kv, dtype_bytes, step))
            plans.append(p)
        return plans

    def shares(self, config, weights: int, pipeline: bool) -> list:
        """(config view, weight bytes) of each rank's part of the model: the layers, heads and
        MLP width it holds (`distributed.rank_config`)."""
        if self.size == 1:
            return [(config, weights)]
        from . import distributed

        mode = "pipeline" if pipeline else "tensor"
        return [(distributed.rank_config(config, r, self.size, mode),
                 int(weights * distributed.weight_share(config, r, self.size, mode))) for r in range(self.size)]

    # --- running ----------------------------------------------------------------------------------

    def report(self, line: str) -> None:
        prefix = f"[rank {self.rank}] " if self.rank else ""
        print(f"{prefix}error: {line}", file=self._error_stream, flush=True)

    def abort(self, why: str) -> None:
        """End this rank now, saying why here and to its peers: a failure on one rank inside a
        generation, after which the ranks no longer run the same steps."""
        self.report(why)
        if self._monitor is not None:
            self._monitor.close(f"E{why}")
        os._exit(1)

    @contextmanager
    def running(self):
        """Around a rank's work: peers are told how it ended; a collective that fails because a
        peer went away waits for the heartbeat to name that peer."""
        if self._monitor is None:
            yield self
            return
        try:
            yield self
        except MlxGemmaError as e:  # rank 0 says it (mlx.launch stops the others once one exits)
            self._monitor.close(f"E{e}")
            raise
        except RuntimeError as e:  # a collective whose peer is gone: the monitor knows which
            time.sleep(3 * HEARTBEAT_INTERVAL)
            self._monitor.close("Elost the connection to the group")
            raise DistributedError(f"rank {self.rank}: lost the connection to the other ranks ({e})") from None
        except BaseException as e:  # Ctrl-C, SIGTERM, or a bug
            self._monitor.close(f"Estopped by {type(e).__name__}{': ' + str(e) if str(e) else ''}")
            raise
        self._monitor.close("Q")


class RankPlans(list):
    """The memory plans of every rank (a list of `memory.Plan`)."""

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self)

    def table(self) -> str:
        rows = [p.rows() for p in self]
        head = "| item | " + " | ".join(f"rank {r}" for r in range(len(self))) + " |"
        lines = [head, "|---|" + "---|" * len(self)]
        for i, (name, _) in enumerate(rows[0]):
            lines.append(f"| {name} | " + " | ".join(r[i][1] for r in rows) + " |")
        return "\n".join(lines)


def join(connect_timeout: Optional[float] = None, heartbeat_timeout: Optional[float] = None) -> Cluster:
    """This process's place in the launched group (a single-process Cluster when not launched)."""
    if not launched():
        return Cluster()
    connect_timeout = connect_timeout or CONNECT_TIMEOUT
    heartbeat_timeout = heartbeat_timeout or HEARTBEAT_TIMEOUT
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    others = [h[0] for r, h in enumerate(_ring_hosts()) if str(r) != rank]
    line = (f"{'[rank ' + rank + '] ' if rank != '0' else ''}error: could not connect to the other ranks"
            f"{' (' + ', '.join(others) + ')' if others else ''} within {connect_timeout:g} s: is every rank "
            "started, and reachable from this one?")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(connect_timeout), line],
                                stdin=subprocess.PIPE)
    try:
        group = mx.distributed.init()
    finally:
        watchdog.stdin.close()
        watchdog.wait()
    error_stream = sys.stderr
    if group.rank() > 0:
        # Only rank 0 speaks; this rank keeps a handle on the terminal for its own last words.
        error_stream = os.fdopen(os.dup(2), "w")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    cluster = Cluster(group, error_stream)
    if group.size() > 1:
        cluster._monitor = _Monitor(cluster, heartbeat_timeout)
    return cluster


class _Monitor:
    """Heartbeats with every other rank over TCP (lines: "." alive, "Q" done, "E<why>" failed)."""

    def __init__(self, cluster: Cluster, timeout: float):
        self.cluster, self.timeout = cluster, timeout
        self.closed = False
        self.lock = threading.Lock()
        self.rank0_done = threading.Event()
        hosts = _ring_hosts()
        ips = [h[0].rsplit(":", 1)[0] for h in hosts] if len(hosts) == cluster.size else ["127.0.0.1"] * cluster.size
        rank = cluster.rank
        server = socket.create_server((ips[rank] if len(hosts) == cluster.size else "", 0))
        ports = [row[0] for row in cluster.gather([server.getsockname()[1]])]
        self.peers: dict[int, socket.socket] = {}
        for peer in range(rank):  # connect to the lower ranks, accept the higher ones
            s = socket.create_connection((ips[peer], ports[peer]), timeout=timeout)
            s.sendall(f"{rank}\n".encode())
            self.peers[peer] = s
        server.settimeout(timeout)
        for _ in range(rank + 1, cluster.size):
            s, _ = server.accept()
            s.settimeout(timeout)
            self.peers[int(s.makefile().readline())] = s
        server.close()
        for peer, s in self.peers.items():
            s.settimeout(timeout)
            threading.Thread(target=self._listen, args=(peer, s), daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _send(self, s: socket.socket, line: str) -> None:
        try:
            s.sendall((line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass

    def _beat(self) -> None:
        while not self.closed:
            for s in list(self.peers.values()):
                self._send(s, ".")
            time.sleep(HEARTBEAT_INTERVAL)

    def _listen(self, peer: int, s: socket.socket) -> None:
        try:
            self._read(peer, s)
        finally:
            if peer == 0:
                self.rank0_done.set()

    def _read(self, peer: int, s: socket.socket) -> None:
        reader = s.makefile("r", encoding="utf-8", errors="replace")
        while True:
            try:
                line = reader.readline()
            except (socket.timeout, TimeoutError):
                return self._fail(f"rank {peer} stopped responding (no heartbeat for {self.timeout:g} s)")
            except OSError as e:
                return self._fail(f"rank {peer}: connection lost ({e.strerror or e})")
            if not line:
                return self._fail(f"rank {peer} exited (its connection closed without a word)")
            if line.startswith("Q"):
                return None
            if line.startswith("E"):
                # An error every rank meets (a bad argument) is this rank's own to report, once.
                time.sleep(HEARTBEAT_INTERVAL)
                return self._fail(f"rank {peer} failed: {line[1:].strip()}")

    def _fail(self, why: str) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.cluster.report(why)
            os._exit(1)

    def close(self, last: str) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for s in self.peers.values():
            self._send(s, last)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self.cluster.rank and last != "Q":
            # Rank 0 reports the failure: leave it time to, before mlx.launch stops it for ours.
            self.rank0_done.wait(3 * HEARTBEAT_INTERVAL)
