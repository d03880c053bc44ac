"""Tiny worker targets for tests/test_batched.py (a module of its own: spawned workers import only this)."""


def shard_target(shard, num_shards, emit, n):
    import torch

    for i in range(shard, n, num_shards):
        emit({"index": i, "threads": torch.get_num_threads()})
    return shard * 10


def failing_target(shard, num_shards, emit):
    raise RuntimeError(f"boom in shard {shard}")


def orphan_target(shard, num_shards, emit, pid_file):
    """Emits forever, one row every 50 ms, after writing its pid (the test kills the parent)."""
    import os
    import time

    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    while True:
        emit({"shard": shard})
        time.sleep(0.05)
