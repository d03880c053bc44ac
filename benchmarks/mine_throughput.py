"""Mining throughput: images/s with a time breakdown, threads/processes, peak memory, per miner and backbone.

    .venv/bin/python benchmarks/mine_throughput.py                       # lost, dino_vits16 (GPU: batch 1 and 16)
    .venv/bin/python benchmarks/mine_throughput.py --miner dinoseg --batch 1 --procs 2 --threads 1
    .venv/bin/python benchmarks/mine_throughput.py --device cuda --batch 1 16 64 --precision bf16
    .venv/bin/python benchmarks/mine_throughput.py --miner votecut_ensemble --images 3   # CuVLER's six backbones

Times the real loop, ``pipeline.mining.mine_images`` (decode -> Backbone.features_batch -> Miner.mine_batch ->
the sinks: a real journal in a temporary folder and a ``Timing`` sink), on the VOC07 fixture, after one warm-up
image, and prints for every batch size: images/s and the seconds spent in decode (loader, in this process),
forward (backbone, incl. host->device copy), miner, write (the row and its sinks) and idle (waiting for
DataLoader workers), as the loop measures them (``MineStats.phases``). ``--procs N`` (0 = choose automatically
on CPU) runs ``pipeline.parallel.mine_in_processes``, what ``mine.procs`` runs: N one-thread workers, worker i
taking images i, i+N, ..., their rows journaled here; each worker's start-up (fork or spawn + import) and model
build are reported (forked workers share the model built and warmed up here; spawned ones build their own and
are not warmed up).

Throughput does not depend on the weights, so random weights are used when none are given. On CUDA
the default batch path is grouped (``exact=False``); ``--exact`` forces one forward per image.
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.backbones import build_backbone  # noqa: E402
from pipeline.backbones.ensemble import build_ensemble  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.discovery import MINERS, build_miner  # noqa: E402
from pipeline.mining import MiningRun, mine_images  # noqa: E402
from pipeline.mining_sinks import Timing  # noqa: E402


def miner_params(name: str) -> tuple[str, dict]:
    """The miner a conf/miner/<name>.yaml builds (its schema's miner, e.g. votecut for votecut_ensemble) and its
    parameters as the file sets them (what its Miner reads; the backbone outputs it needs come from the Miner
    itself)."""
    import yaml

    path = REPO / "conf" / "miner" / f"{name}.yaml"
    params = yaml.safe_load(path.read_text()) if path.exists() else {}
    schemas = [d for d in (params or {}).get("defaults", []) if str(d).startswith("/schema/miner_")]
    miner = schemas[0][len("/schema/miner_"):].split("@")[0] if schemas else name
    return miner, {k: v for k, v in (params or {}).items() if k not in ("name", "defaults")}


def bench_parts(args: dict, device: str = "cpu", exact: bool | None = None) -> tuple:
    """The dataset, backbone (an ensemble where the miner's file lists ``backbones``) and miner the benchmark mines
    with (a spawned worker builds them with this)."""
    def build(arch: str):
        b = build_backbone(arch, init="pretrained" if args["weights"] else "random", weights=args["weights"],
                           device=device, precision=args["precision"], force_precision=args["force_precision"])
        if exact is not None:  # the loop calls features_batch without ``exact``: fix it on this backbone
            b.features_batch = functools.partial(b.features_batch, exact=exact)
        return b

    miner, params = miner_params(args["miner"])
    backbone = build_ensemble(params["backbones"], params.get("image_size") or 480, build) \
        if params.get("backbones") else build(args["arch"])
    dataset = build_dataset("voc07", args["data"], max_images=args["images"])
    return dataset, backbone, build_miner(miner, backbone.patch_size, **params)


def _breakdown(stats, workers: int = 0) -> dict:
    """The loop's phases in this benchmark's columns."""
    p = stats.phases
    return {"decode": p["load"] if workers == 0 else 0.0, "idle": p["load"] if workers else 0.0,
            "forward": p["forward"], "miner": p["miner"], "write": p["sinks"], "images": stats.images,
            "wall": stats.seconds}


def _journal(tmp: str) -> MiningRun:
    return MiningRun(tmp, {"bench": True})


def _print_row(label: str, s: dict) -> None:
    n, wall = s["images"], s["wall"]
    print(f"{label:<28}{n / wall if wall else 0.0:>9.2f}{wall:>9.1f}" + "".join(
        f"{s[k]:>9.1f}" for k in ("decode", "forward", "miner", "write", "idle")), flush=True)


def bench_procs(args, shared: dict, header: str, weights: str) -> None:
    """``--procs``: the batch sizes through ``mine_in_processes``, what ``mine.procs`` runs."""
    from pipeline.backbones import check_precision
    from pipeline.parallel import available_cores, choose_cpu_workers, fork_available, mine_in_processes

    try:
        check_precision(args.precision, "cpu", force=args.force_precision)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    start_method = args.start_method or ("fork" if fork_available() else "spawn")
    if start_method == "fork":  # built (and warmed up) here, shared by the forked workers
        dataset, backbone, miner = bench_parts(shared)
        mine_images(dataset, backbone, miner, [0], [], feature=args.feature)
    else:  # each spawned worker builds its own
        dataset, backbone, miner = build_dataset("voc07", args.data, max_images=args.images), None, None
    procs = args.procs or choose_cpu_workers(len(dataset))
    print(f"arch={args.arch} miner={args.miner} device=cpu processes={procs} x 1 thread "
          f"(cores available: {available_cores()}) precision={args.precision} images={len(dataset)} weights={weights}")
    print(header)
    for batch in args.batch:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            res = mine_in_processes(dataset, backbone, miner, list(range(len(dataset))), [_journal(tmp), Timing()],
                                    procs=procs, feature=args.feature, start_method=start_method, batch_size=batch,
                                    build=(f"{Path(__file__).stem}:bench_parts", {"args": shared}))
        wall = time.time() - t0
        steady = max(r.ended_at for r in res) - min(r.started_at for r in res)
        parts = [_breakdown(r) for r in res]
        tot = {k: sum(b[k] for b in parts) for k in ("decode", "forward", "miner", "write", "idle", "images")}
        _print_row(f"procs={procs} batch={batch} steady", {**tot, "wall": steady})
        _print_row(f"procs={procs} batch={batch} +startup", {**tot, "wall": wall})
        started = [round(r.started_at - r.setup_s - t0, 1) for r in res]
        print(f"  per worker ({start_method}): start+import {started} s, "
              f"build {[round(r.setup_s, 1) for r in res]} s, max RSS "
              f"{[None if r.peak_rss_gib is None else round(r.peak_rss_gib, 2) for r in res]}"
              " GiB (busy seconds above are summed over workers)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dino_vits16")
    ap.add_argument("--miner", default="lost", help=f"a conf/miner/ file: a miner ({sorted(MINERS)}) or votecut_ensemble")
    ap.add_argument("--feature", default="k")
    ap.add_argument("--data", default=os.environ.get("LOST_SHARED_DATA", str(REPO / "tests" / "data"))
                    + "/voc07-mini")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch sizes to time (default: 1 16 on CUDA; 1 on CPU, where the exact path runs one "
                         "forward per image anyway)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--force-precision", action="store_true", help="run bf16 on a CPU without bf16 units")
    ap.add_argument("--exact", action="store_true", help="one forward per image on CUDA too")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's)")
    ap.add_argument("--procs", type=int, default=1, help="CPU worker processes, 1 thread each (0 = automatic)")
    ap.add_argument("--start-method", default=None, choices=["spawn", "fork"],
                    help="worker start (default: fork where available, as the mine stage; spawn elsewhere)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader decode workers (in-process mode)")
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.batch is None:
        args.batch = [1, 16] if device.startswith("cuda") else [1]
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = "given" if args.weights else "random (throughput only; weights do not change it)"
    shared = {"arch": args.arch, "weights": args.weights, "precision": args.precision,
              "force_precision": args.force_precision, "data": args.data, "images": args.images,
              "miner": args.miner, "feature": args.feature}
    header = f"{'run':<28}{'img/s':>9}{'wall s':>9}{'decode':>9}{'forward':>9}{'miner':>9}{'write':>9}{'idle':>9}"

    if device == "cpu" and args.procs != 1:
        return bench_procs(args, shared, header, weights)

    t0 = time.time()
    try:
        dataset, backbone, miner = bench_parts(shared, device, exact=True if args.exact else None)
    except ValueError as e:  # e.g. bf16 on a CPU without bf16 units: say so, no traceback
        raise SystemExit(f"error: {e}") from None
    build_s = time.time() - t0
    print(f"arch={backbone.arch} miner={args.miner} device={device} threads={torch.get_num_threads()} "
          f"precision={args.precision} images={len(dataset)} decode workers={args.workers} weights={weights} "
          f"(build {build_s:.1f} s)")
    print(header)
    indices = list(range(len(dataset)))
    mine_images(dataset, backbone, miner, indices[:1], [], feature=args.feature)  # warm-up
    for batch in args.batch:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            stats = mine_images(dataset, backbone, miner, indices, [_journal(tmp), Timing()], feature=args.feature,
                                num_workers=args.workers, batch_size=batch)
        _print_row(f"batch={batch}", _breakdown(stats, args.workers))
        if device.startswith("cuda"):
            print(f"  peak GPU memory (max allocated): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"peak host memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
