"""Time, peak memory and disk of ``aftrec prepare --streaming`` on a large synthetic log.

Run: ``python benchmarks/bench_scale_prepare.py`` (100M interactions, 1M users, 5 domains of
300,000 items: 1.5M items), or smaller first, e.g. ``--interactions-count 10000000 --users
200000 --root runs/scale-10M``. Writes the case into benchmarks/results/scale_prepare.json
(cases are kept by size, so a small run does not erase the full one).

1. Generation: ``iter_chunks`` writes ROOT/raw/interactions/part-*.parquet (one part per
   50,000 users) and ROOT/raw/items.parquet, in a child process so its time and peak memory are
   its own. Skipped when ROOT/raw holds a log of the same configuration.
2. Preparation: ``python -m aftrec.cli prepare --interactions ROOT/raw/interactions --items
   ROOT/raw/items.parquet --out ROOT/data --streaming --force`` in a child process; its peak
   resident memory is read from ``os.wait4`` (that child's own ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, write

REPO = Path(__file__).resolve().parent.parent
CHUNK_USERS = 50_000  # users per Parquet part of the raw log


def config(args: argparse.Namespace) -> dict[str, int]:
    return {
        "n_users": args.users,
        "n_domains": args.n_domains,
        "items_per_domain": args.items_per_domain,
        "n_interactions": args.interactions_count,
        "seed": args.seed,
    }


def generate(raw: Path, cfg: dict[str, int]) -> None:
    """Write the raw log as Parquet parts under ``raw`` (in this process)."""
    from aftrec.data.sources.synthetic import SyntheticConfig, catalogue, iter_chunks

    scfg = SyntheticConfig(**cfg)
    tmp = raw.with_name(raw.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "interactions").mkdir(parents=True)
    rows = 0
    for k, chunk in enumerate(iter_chunks(scfg, chunk_users=CHUNK_USERS)):
        chunk.to_parquet(tmp / "interactions" / f"part-{k:05d}.parquet", index=False)
        rows += len(chunk)
    catalogue(scfg).loc[:, ["item", "domain"]].to_parquet(tmp / "items.parquet", index=False)
    (tmp / "config.json").write_text(json.dumps({**cfg, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(raw, ignore_errors=True)
    os.replace(tmp, raw)


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run ``argv``; its exit code, wall time and own peak resident memory (MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "exit_code": proc.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 2**10, 1),  # Linux: KiB
    }


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions-count", type=int, default=100_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items-per-domain", type=int, default=300_000)
    parser.add_argument("--n-domains", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs/scale"))
    parser.add_argument("--partition-rows", type=int, help="default: the CLI's")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = config(args)
    root = args.root if args.root.is_absolute() else REPO / args.root
    raw = root / "raw"
    if args.generate_only:  # the generation child
        generate(raw, cfg)
        return

    made = json.loads((raw / "config.json").read_text()) if (raw / "config.json").is_file() else {}
    if {k: made.get(k) for k in cfg} == cfg:
        generation: dict[str, Any] = {"skipped": "reused the log already in " + str(raw)}
    else:
        generation = run_child([sys.executable, __file__, *sys.argv[1:], "--generate-only"])
        if generation["exit_code"] != 0:
            raise SystemExit(f"generation failed: {generation}")
        made = json.loads((raw / "config.json").read_text())
    print("generation", generation, flush=True)

    out = root / "data"
    command = [
        sys.executable, "-m", "aftrec.cli", "prepare",
        "--interactions", str(raw / "interactions"), "--items", str(raw / "items.parquet"),
        "--out", str(out), "--streaming", "--force",
    ]  # fmt: skip
    if args.partition_rows:
        command += ["--partition-rows", str(args.partition_rows)]
    prep = run_child(command)
    print("prepare", prep, flush=True)
    command_line = " ".join(["python benchmarks/bench_scale_prepare.py", *sys.argv[1:]])
    case: dict[str, Any] = {
        "config": cfg,
        "raw_rows": made["rows"],
        "raw_parts": len(list((raw / "interactions").glob("*.parquet"))),
        "generation": generation,
        "bench_command": command_line,
        "prepare_command": " ".join(["python", *command[1:]]).replace(f"{REPO}/", ""),
        "prepare": prep,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "disk_mib": {
            "raw_interactions": size_mib(raw / "interactions"),
            "raw_items": size_mib(raw / "items.parquet"),
        },
    }
    if prep["exit_code"] == 0:
        meta = json.loads((out / "meta.json").read_text())
        parts = meta["partitions"]
        per_partition = [sum(p["rows"].values()) for p in parts]
        case.update(
            users=meta["n_users"],
            items=meta["n_items"],
            users_dropped=meta["users_dropped"],
            rows_per_part={k: sum(v.values()) for k, v in meta["counts"].items()},
            partitions=len(parts),
            partition_rows=meta["partition_rows"],
            rows_per_partition={
                "min": min(per_partition),
                "max": max(per_partition),
                "mean": round(sum(per_partition) / len(per_partition)),
            },
        )
        case["disk_mib"]["prepared"] = size_mib(out)
    path = RESULTS / "scale_prepare.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    cases = {**previous.get("cases", {}), label(args.interactions_count): case}
    print(json.dumps(case, indent=2))
    print("wrote", write("scale_prepare", {"command": command_line, "cases": cases}))


if __name__ == "__main__":
    main()
