"""CPU process parallelism: N worker processes with one thread each, each mining its share of the images.

On a CPU, PyTorch's intra-op threads scale poorly for the small GEMMs of a ViT on one image (and
spin-wait on a busy machine); N processes with one thread each keep every core busy instead. The
work is split as sharded mining splits it: worker ``i`` of ``N`` mines indices ``i, i+N, i+2N, ...``
(``pipeline.mining.shard_indices``).

    from pipeline.parallel import choose_cpu_workers, run_parallel
    n = choose_cpu_workers(len(todo))
    results = run_parallel("my.module:mine_shard", n, kwargs={...}, on_message=print)

The target is named by import path ("package.module:function") so spawned workers import only what
they need. It is called as ``fn(shard, num_shards, emit, **kwargs)``; ``emit(obj)`` sends a picklable
object (a journal row, a progress count) to the parent, where ``on_message(shard, obj)`` receives it in
arrival order. The function's return value comes back in the list ``run_parallel`` returns.

:func:`mine_in_processes` is mining on top of it: the loop of :func:`pipeline.mining.mine_images` in each
worker, whose rows go to the parent's sinks (the journal, progress, timing).

This module does not import torch at import time (a spawned worker sets its thread count first).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Sequence

#: the thread-count variables a worker process starts with (read by OpenMP/MKL when torch loads)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_cpu_workers(n_images: int, cores: int | None = None, *, min_images_per_worker: int = 8) -> int:
    """How many one-thread worker processes to mine ``n_images`` with on the CPU.

    One per core, but never so many that a worker gets fewer than ``min_images_per_worker`` images:
    each worker pays its start-up (import torch + build the backbone, a few seconds; see
    README "Performance"), which a handful of images would not repay. 1 means "stay in this
    process" (no workers)."""
    cores = available_cores() if cores is None else int(cores)
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if int(min_images_per_worker) < 1:
        raise ValueError(f"min_images_per_worker must be >= 1, got {min_images_per_worker}")
    if n_images <= 0:
        return 1
    return max(1, min(cores, int(n_images) // int(min_images_per_worker)))


def mining_processes(n_images: int, requested: int | None = None) -> int:
    """Worker processes to mine ``n_images`` on a CPU: ``requested`` (at most one per image), else one per core
    (:func:`choose_cpu_workers`) where workers are forked (they start at once, sharing the built model) and where
    they must be spawned (each imports torch and builds its model: ~6-10 s) only with at least 4 cores."""
    if n_images <= 0:
        return 1
    if requested is not None:
        return max(1, min(int(requested), int(n_images)))
    return choose_cpu_workers(n_images) if fork_available() or available_cores() >= 4 else 1


def fork_available() -> bool:
    """Whether workers may be forked: Linux only (macOS's system libraries are not fork-safe; Windows has
    no fork), and never from a process that has initialised CUDA (a forked child cannot use it)."""
    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def resolve_target(target: str | Callable) -> Callable:
    """``"package.module:function"`` -> the function (a callable is returned as it is)."""
    if callable(target):
        return target
    mod, sep, name = str(target).partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"target must be 'package.module:function', got {target!r}")
    fn = getattr(importlib.import_module(mod), name, None)
    if not callable(fn):
        raise ValueError(f"target {target!r}: {mod} has no function {name!r}")
    return fn


def _worker_entry(target, shard: int, num_shards: int, kwargs: dict, q, threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(int(threads))
        fn = resolve_target(target)
        parent = os.getppid()

        def emit(obj) -> None:
            if os.getppid() != parent:  # the parent was killed: nobody journals this work any more
                print(f"worker {shard}: parent process {parent} is gone; stopping", file=sys.stderr, flush=True)
                os._exit(3)  # at once: a normal exit would wait for the queue's feeder, which nobody reads
            q.put(("msg", shard, obj))

        result = fn(shard, num_shards, emit, **kwargs)
        q.put(("done", shard, result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        q.put(("error", shard, traceback.format_exc()))


@contextmanager
def _thread_env(threads: int):
    old = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(threads) for k in THREAD_ENV})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WorkerError(RuntimeError):
    """A worker process raised or died; the message names the shard and holds its traceback."""


def run_parallel(target: str | Callable, num_procs: int, *, kwargs: dict | None = None,
                 on_message: Callable[[int, Any], None] | None = None, threads_per_proc: int = 1,
                 start_method: str = "spawn", poll_s: float = 0.5) -> list[Any]:
    """Run ``target(shard, num_shards, emit, **kwargs)`` for shard 0..num_procs-1, one process each.

    Workers start with ``threads_per_proc`` torch/OpenMP threads (``torch.set_num_threads`` and the
    OMP/MKL environment). ``start_method`` "spawn" (default: start-up pays ``import torch`` and whatever
    the target builds; a callable target must be a module-level function, its kwargs picklable) or
    "fork" (Linux, :func:`fork_available`: the workers start at once with the parent's memory, so
    kwargs may hold built models and datasets, shared copy-on-write and never pickled). A forked
    worker must run one thread: with one thread set, PyTorch enters no OpenMP region (its
    ``parallel_for`` runs inline), which is what makes forking a process that has already used OpenMP
    threads safe (PyTorch's DataLoader workers rely on the same). Returns the targets' return values
    by shard. If a worker raises or
    dies, the others are stopped and :class:`WorkerError` is raised (finished shard journals stay;
    a rerun resumes them). If the parent itself is killed, each worker stops at its next ``emit``.
    """
    num_procs = int(num_procs)
    if num_procs < 1:
        raise ValueError(f"num_procs must be >= 1, got {num_procs}")
    if start_method == "fork" and (int(threads_per_proc) != 1 or not fork_available()):
        raise ValueError("start_method='fork' needs one thread per worker, Linux and a process without CUDA "
                         f"(threads_per_proc={threads_per_proc}, fork_available()={fork_available()}); use 'spawn'")
    if isinstance(target, str):
        resolve_target(target)  # fail here, with a clear message, not in every worker
    ctx = mp.get_context(start_method)
    q = ctx.Queue()
    procs = []
    with _thread_env(threads_per_proc):
        for shard in range(num_procs):
            p = ctx.Process(target=_worker_entry, name=f"mine-shard-{shard}",
                            args=(target, shard, num_procs, dict(kwargs or {}), q, threads_per_proc))
            p.start()
            procs.append(p)
    results: dict[int, Any] = {}
    error: str | None = None
    try:
        while len(results) < num_procs and error is None:
            try:
                kind, shard, obj = q.get(timeout=poll_s)
            except queue_mod.Empty:
                for s, p in enumerate(procs):
                    if s not in results and not p.is_alive():
                        time.sleep(poll_s)  # its last message may still be in the pipe
                        if q.empty():
                            error = f"worker {s} of {num_procs} died (exit code {p.exitcode}) without a result"
                            break
                continue
            if kind == "msg":
                if on_message is not None:
                    on_message(shard, obj)
            elif kind == "done":
                results[shard] = obj
            else:
                error = f"worker {shard} of {num_procs} failed:\n{obj}"
    finally:
        if error is not None or len(results) < num_procs:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join()
    if error is not None:
        raise WorkerError(error)
    return [results[s] for s in range(num_procs)]


# ------------------------------------------------------------------------------ process-parallel mining
class _ToParent:
    """The sink (:class:`~pipeline.mining.MiningSink`) that sends a worker's rows to the parent (``emit``)."""

    needs_result = False

    def __init__(self, emit) -> None:
        self.emit = emit

    def process(self, index, record, result, row, size) -> None:
        self.emit((index, row, size))

    def finish(self) -> None:
        pass


def _worker_share(shard: int, num_shards: int, emit, *, indices: list[int], sinks: list, parts=None,
                  build: tuple[str, dict] | None = None, feature: str, max_side, batch_size: int):
    """A worker's share, ``indices[shard::num_shards]``: the forked worker gets the parent's ``parts`` (dataset,
    backbone, miner) as they are; a spawned one builds them with ``build`` ("module:function", kwargs)."""
    from pipeline.mining import mine_images

    entered = time.time()
    dataset, backbone, miner = parts if build is None else resolve_target(build[0])(**build[1])
    stats = mine_images(dataset, backbone, miner, indices[shard::num_shards], [*sinks, _ToParent(emit)],
                        feature=feature, num_workers=0, max_side=max_side, batch_size=batch_size)
    stats.setup_s = stats.started_at - entered
    try:
        import resource

        stats.peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:  # no resource module (Windows)
        pass
    return stats


def mine_in_processes(dataset, backbone, miner, indices: Sequence[int], sinks: Sequence, *, procs: int,
                      feature: str = "k", max_side: int | None = None, build: tuple[str, dict] | None = None,
                      start_method: str | None = None, batch_size: int = 1) -> list:
    """:func:`~pipeline.mining.mine_images` in ``procs`` one-thread worker processes (:func:`run_parallel`),
    worker ``i`` mining ``indices[i::procs]`` (``batch_size`` images at a time: 1, the exact CPU path, unless
    timing another): the sinks that need the miner's result (pictures) run in the
    workers, the others (journal, progress, timing) here, on every row as it arrives, then ``finish()``. One
    journal, as a single process writes it: a killed run resumes the same way.

    ``start_method`` None: "fork" where :func:`fork_available` (Linux: the workers start at
    once with this process's built ``backbone``, shared copy-on-write), else "spawn", where each worker builds
    its own dataset, backbone and miner with ``build`` = ("module:function", picklable kwargs), a function
    returning the three as this process built them. Returns each worker's
    :class:`~pipeline.mining.MineStats`."""
    from pipeline.mining import ordered_sinks

    method = start_method or ("fork" if fork_available() else "spawn")
    if method != "fork" and build is None:
        raise ValueError("spawned workers build their own dataset, backbone and miner: give build=("
                         "'module:function', kwargs), or fork them (Linux)")
    if build is not None:
        resolve_target(build[0])  # a wrong name fails here, not in every worker
    sinks = ordered_sinks(sinks)
    here = [s for s in sinks if not s.needs_result]
    kwargs = {"indices": list(indices), "sinks": [s for s in sinks if s.needs_result], "feature": feature,
              "max_side": max_side, "batch_size": int(batch_size)}
    if method == "fork":
        kwargs["parts"] = (dataset, backbone, miner)   # never pickled: the workers inherit them
    else:
        kwargs["build"] = build

    def on_row(shard: int, message) -> None:
        index, row, size = message
        for sink in here:
            sink.process(index, dataset.records[index], None, row, size)

    stats = run_parallel(_worker_share, int(procs), kwargs=kwargs, on_message=on_row, start_method=method)
    for sink in here:
        sink.finish()
    return stats


__all__ = ["THREAD_ENV", "WorkerError", "available_cores", "choose_cpu_workers", "fork_available", "mine_in_processes",
           "mining_processes", "resolve_target", "run_parallel"]
