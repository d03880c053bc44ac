"""Mining throughput: images/s with a time breakdown, threads/processes, peak memory, per miner and backbone.

    .venv/bin/python benchmarks/mine_throughput.py                       # lost, dino_vits16 (GPU: batch 1 and 16)
    .venv/bin/python benchmarks/mine_throughput.py --miner dinoseg --batch 1 --procs 2 --threads 1
    .venv/bin/python benchmarks/mine_throughput.py --device cuda --batch 1 16 64 --precision bf16

Runs its own loop over the library pieces (decode -> Backbone.features_batch -> Miner.mine_batch ->
journal line) on the VOC07 fixture, after one warm-up image, and prints for every batch size: images/s
and the seconds spent in decode (loader, in this process), forward (backbone, incl. host->device
copy), miner, write (journal) and idle (waiting for DataLoader workers). ``--procs N`` (0 = choose
automatically on CPU) mines in N one-thread worker processes, shard i taking images i, i+N, ... as
sharded mining does; the start-up (fork or spawn + import, backbone build) of each worker is reported.

Throughput does not depend on the weights, so random weights are used when none are given. On CUDA
the default batch path is grouped (``exact=False``); ``--exact`` forces one forward per image.
"""
from __future__ import annotations

import argparse
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
from pipeline.data import MiningImages, build_dataset, collate_list  # noqa: E402
from pipeline.discovery import MINERS, build_miner  # noqa: E402
from pipeline.journal import Journal  # noqa: E402

def miner_params(name: str) -> dict:
    """The miner's parameters as conf/miner/<name>.yaml sets them (what its Miner reads; the backbone
    outputs it needs come from the Miner itself)."""
    import yaml

    path = REPO / "conf" / "miner" / f"{name}.yaml"
    params = yaml.safe_load(path.read_text()) if path.exists() else {}
    return {k: v for k, v in (params or {}).items() if k not in ("name", "defaults")}


def _row(index: int, size, result, error) -> dict:
    """A journal line like the mining loop's (same size of write)."""
    row = {"index": index, "size": size, "error": error, "box": None, "score": None}
    if result is not None:
        row["box"] = [float(v) for v in result.box]
        row["score"] = float(result.score)
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mine_loop(dataset, backbone, indices, *, miner: str, params: dict, feature: str, batch: int,
              workers: int, journal: Journal | None, exact: bool | None) -> dict:
    """Mine ``indices``; return counts and the time breakdown (seconds)."""
    device = backbone.device
    mining = build_miner(miner, backbone.patch_size, **params)
    with_cls = mining.needs.cls_attn
    loader = torch.utils.data.DataLoader(
        MiningImages(dataset.records, backbone.patch_size, indices=indices), batch_size=batch, shuffle=False,
        num_workers=workers, collate_fn=collate_list, persistent_workers=False)
    t = {"decode": 0.0, "idle": 0.0, "forward": 0.0, "miner": 0.0, "write": 0.0}
    n = 0
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            items = next(it)
        except StopIteration:
            break
        t["decode" if workers == 0 else "idle"] += time.perf_counter() - t0
        ok = [x for x in items if x["error"] is None]
        t0 = time.perf_counter()
        outs = backbone.features_batch([x["image"] for x in ok], which=feature, with_cls_attn=with_cls,
                                       max_batch=batch, exact=exact) if ok else []
        _sync(device)
        t1 = time.perf_counter()
        results = mining.mine_batch(outs, [x["size"] for x in ok]) if ok else []
        t2 = time.perf_counter()
        t["forward"] += t1 - t0
        t["miner"] += t2 - t1
        by_index = {x["index"]: r for x, r in zip(ok, results)}
        for x in items:
            row = _row(x["index"], x["size"], by_index.get(x["index"]), x["error"])
            if journal is not None:
                journal.append(row)
            n += 1
        t["write"] += time.perf_counter() - t2
    t["wall"] = time.perf_counter() - start
    t["images"] = n
    return t


def _build(args, device: str):
    return build_backbone(args["arch"], init="pretrained" if args["weights"] else "random", weights=args["weights"],
                          device=device, precision=args["precision"], force_precision=args["force_precision"])


def bench_shard(shard: int, num_shards: int, emit, *, args: dict, t_spawn: float) -> dict:
    """Worker-process target (``run_parallel``): build, warm up, mine shard ``shard`` of ``num_shards``."""
    t_entry = time.time()
    dataset = build_dataset("voc07", args["data"], max_images=args["images"])
    backbone = _build(args, "cpu")
    t_built = time.time()
    idx = list(range(shard, len(dataset), num_shards))  # pipeline.mining.shard_indices
    params = miner_params(args["miner"])
    mine_loop(dataset, backbone, idx[:1], miner=args["miner"], params=params, feature=args["feature"], batch=1,
              workers=0, journal=None, exact=None)  # warm-up (not counted)
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / f"shard-{shard}.jsonl", {"bench": True})
        t_start = time.time()
        stats = mine_loop(dataset, backbone, idx, miner=args["miner"], params=params, feature=args["feature"],
                          batch=args["batch"], workers=0, journal=journal, exact=None)
    stats.update(spawn_import_s=t_entry - t_spawn, build_s=t_built - t_entry, t_start=t_start,
                 t_end=time.time(), maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return stats


def _print_row(label: str, s: dict) -> None:
    n, wall = s["images"], s["wall"]
    print(f"{label:<28}{n / wall if wall else 0.0:>9.2f}{wall:>9.1f}" + "".join(
        f"{s[k]:>9.1f}" for k in ("decode", "forward", "miner", "write", "idle")), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dino_vits16")
    ap.add_argument("--miner", default="lost", help=f"miner name ({sorted(MINERS)})")
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
        from pipeline.backbones import check_precision
        from pipeline.parallel import available_cores, choose_cpu_workers, run_parallel

        try:
            check_precision(args.precision, "cpu", force=args.force_precision)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

        from pipeline.parallel import fork_available

        start_method = args.start_method or ("fork" if fork_available() else "spawn")
        n_images = len(build_dataset("voc07", args.data, max_images=args.images))
        procs = args.procs or choose_cpu_workers(n_images)
        print(f"arch={args.arch} miner={args.miner} device=cpu processes={procs} x 1 thread "
              f"(cores available: {available_cores()}) precision={args.precision} images={n_images} weights={weights}")
        print(header)
        for batch in args.batch:
            t0 = time.time()
            res = run_parallel(f"{Path(__file__).stem}:bench_shard", procs, start_method=start_method,
                               kwargs={"args": {**shared, "batch": batch}, "t_spawn": t0})
            wall = time.time() - t0
            steady = max(r["t_end"] for r in res) - min(r["t_start"] for r in res)
            tot = {k: sum(r[k] for r in res) for k in ("decode", "forward", "miner", "write", "idle", "images")}
            _print_row(f"procs={procs} batch={batch} steady", {**tot, "wall": steady})
            _print_row(f"procs={procs} batch={batch} +startup", {**tot, "wall": wall})
            print(f"  per worker ({start_method}): start+import {[round(r['spawn_import_s'], 1) for r in res]} s, "
                  f"build {[round(r['build_s'], 1) for r in res]} s, max RSS {[round(r['maxrss_gib'], 2) for r in res]}"
                  " GiB (busy seconds above are summed over workers)")
        return

    t0 = time.time()
    dataset = build_dataset("voc07", args.data, max_images=args.images)
    try:
        backbone = _build(shared, device)
    except ValueError as e:  # e.g. bf16 on a CPU without bf16 units: say so, no traceback
        raise SystemExit(f"error: {e}") from None
    build_s = time.time() - t0
    print(f"arch={args.arch} miner={args.miner} device={device} threads={torch.get_num_threads()} "
          f"precision={args.precision} images={len(dataset)} decode workers={args.workers} weights={weights} "
          f"(build {build_s:.1f} s)")
    print(header)
    params = miner_params(args.miner)
    exact = True if args.exact else None
    indices = list(range(len(dataset)))
    mine_loop(dataset, backbone, indices[:1], miner=args.miner, params=params, feature=args.feature, batch=1,
              workers=0, journal=None, exact=exact)  # warm-up
    for batch in args.batch:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            journal = Journal(Path(tmp) / "bench.jsonl", {"bench": True})
            s = mine_loop(dataset, backbone, indices, miner=args.miner, params=params, feature=args.feature,
                          batch=batch, workers=args.workers, journal=journal, exact=exact)
        _print_row(f"batch={batch}", s)
        if device.startswith("cuda"):
            print(f"  peak GPU memory (max allocated): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"peak host memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
