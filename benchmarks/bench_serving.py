"""Serving latency and throughput over real HTTP, and approximate-search recall.

Run (the full issue-5 measurement; ~10 minutes and ~3 GB of RAM for the 1.5M-item bundle)::

    python benchmarks/bench_serving.py --ml1m-run runs/demo/two-tower --synthetic-items 1500000

and a quick check at small scale::

    python benchmarks/bench_serving.py --ml1m-run runs/demo/two-tower --synthetic-items 50000 \
        --requests 300

What it does, per bundle:

1. **Bundles.** ML-1M: ``export_run`` of ``--ml1m-run`` (small domains: exact ``flat``
   indexes). Synthetic: a two-tower model is trained briefly (dim 64, history 50) on a
   synthetic 5-domain log (:mod:`aftrec.data.sources.synthetic`, 1,000 items per domain) so
   the encoder and its user vectors are real; the catalogue is then grown to
   ``--synthetic-items`` (split evenly over the domains): each domain keeps its 1,000 trained
   item vectors and adds new ones between them: ``(w a + (1 - w) b) s + e`` for two random
   trained items ``a``, ``b``, ``w ~ U(0, 1)``, a norm factor ``s ~ lognormal(0, 0.1)`` and
   Gaussian noise ``e`` of ``--noise`` times the per-dimension spread of the trained vectors
   (a continuum, not tight clusters around the trained items, which would flatter IVF). A new
   item is fed to the encoder as the nearer of its two parents (``item_input``), so any
   catalogue item may appear in a behaviour list. Domains above ``--exact-max`` (50,000) get
   IVF indexes whose ``nprobe`` export tunes to recall@200 >= 0.97 on 512 users' vectors
   (a small run can lower ``--exact-max`` to exercise IVF).
2. **Recall.** For ``--recall-users`` other users (not those export tuned on), the encoder's
   vector of each domain is searched in the bundle's index and by brute force
   (:class:`~aftrec.serving.index.ExactIndex`); recall@200 per domain is reported.
3. **Latency.** ``aftrec serve`` runs in its own process (the production setup: one process,
   ``--threads`` request threads, one torch / FAISS thread per request). This process is the
   client: an asyncio HTTP/1.1 client over loopback with keep-alive connections, one per
   unit of concurrency; it writes the raw request and reads the full response, so its own
   cost per request is a few tens of microseconds (httpx costs ~10x that, which on 2 shared
   cores would be measured as server time). Every response's status is checked and the
   first of each run is parsed. After ``--warmup`` requests, ``--requests`` requests are sent
   at each concurrency of ``--concurrency``: top-200 of one domain for a random known user.
   At concurrency 1 two more requests are timed: all domains at once, and a new user given
   by explicit behaviours (30 items in two domains).
4. **Where the time goes.** The server's ``Server-Timing`` header of every response: encode
   (TorchScript forward), search (FAISS, including seen-item filtering), serialize (JSON) and
   handler (all of the endpoint); ``http_and_framework`` is the client latency minus handler:
   HTTP parsing, request validation, thread hand-off, sockets.

Writes benchmarks/results/serving.json (with the machine and its load: other processes share
the 2 cores). Bundles are cached under ``--work``; ``--rebuild`` makes them again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import peak_rss_mib, write
from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.prepare import prepare
from aftrec.data.sources.synthetic import SyntheticConfig, generate
from aftrec.serving.bundle import (
    SAMPLE_USERS,
    BundleContents,
    contents_from_model,
    export_run,
    load_bundle,
    read_manifest,
    write_bundle,
)
from aftrec.serving.index import ExactIndex, IndexSpec, recall_at_k
from aftrec.serving.recommender import Recommender
from aftrec.training.rundir import load_run
from aftrec.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import argparse, sys
from aftrec.serving.cli import add_parsers
p = argparse.ArgumentParser(prog="aftrec")
add_parsers(p.add_subparsers(dest="command", required=True))
args = p.parse_args(sys.argv[1:])
args.func(args)
"""


# --- bundles -------------------------------------------------------------------------------
def synthetic_bundle(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train a small two-tower model on a synthetic log, grow its catalogue, export."""
    work = args.work
    data_dir = work / "synthetic-data"
    run = work / "synthetic-run"
    t0 = time.perf_counter()
    if not (data_dir / "meta.json").exists():
        scfg = SyntheticConfig(
            n_users=3000,
            n_domains=args.domains,
            items_per_domain=1000,
            n_interactions=150_000,
            seed=0,
        )
        prepare(generate(scfg), data_dir, source={"kind": "synthetic"}, force=True)
    if not (run / "best.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        overrides = [
            "model.dim=64",
            "data.history_len=50",
            "train.epochs=2",
            "train.max_batches_per_epoch=150",
            "train.batch_size=256",
        ]
        train(data_dir, resolve("two-tower", None, overrides), run, progress=False)
    train_seconds = time.perf_counter() - t0
    cfg, data, model = load_run(run)
    contents = contents_from_model(model, data, cfg.data.history_len, {"run": str(run)})
    grow(contents, data, args.synthetic_items, args.noise, seed=1)
    t0 = time.perf_counter()
    spec = IndexSpec(exact_max=args.exact_max, target_recall=args.target_recall)
    write_bundle(contents, out, spec, force=True)
    return {"train_seconds": round(train_seconds, 1), "export_seconds": time.perf_counter() - t0}


def grow(contents: BundleContents, data: Dataset, n_items: int, noise: float, seed: int) -> None:
    """Replace the catalogue of ``contents`` by ``n_items`` items over the same domains: the
    trained items first, then noisy scaled copies (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_dom = len(contents.domains)
    sizes = [n_items // n_dom + (1 if d < n_items % n_dom else 0) for d in range(n_dom)]
    old = np.asarray(contents.offsets)
    vectors, item_input, ids, domains, pop = [], [], [], [], []
    for d, name in enumerate(contents.domains):
        real = contents.item_vectors[d]
        n_real = len(real)
        size = max(sizes[d], n_real)
        m = size - n_real
        a, b = rng.integers(0, n_real, m), rng.integers(0, n_real, m)
        w = rng.uniform(0.0, 1.0, (m, 1)).astype(np.float32)
        scale = rng.lognormal(0.0, 0.1, (m, 1)).astype(np.float32)
        jitter = rng.normal(0.0, 1.0, (m, real.shape[1])).astype(np.float32)
        mixed = (w * real[a] + (1 - w) * real[b]) * scale
        v = np.concatenate([real, mixed + noise * real.std(axis=0, keepdims=True) * jitter])
        src = np.r_[np.arange(n_real), np.where(w[:, 0] >= 0.5, a, b)]
        vectors.append(v.astype(np.float32))
        item_input.append(old[d] + src)
        real_ids = contents.items["item"].to_numpy()[old[d] : old[d + 1]]
        ids.append(np.r_[real_ids, [f"{name}-syn-{j}" for j in range(n_real, size)]])
        domains.append(np.full(size, name, dtype=object))
        pop.append(contents.popularity[old[d] + src])
        sizes[d] = size
    new = np.r_[0, np.cumsum(sizes)]
    h = contents.history_items
    dom = np.searchsorted(old[1:], h, side="right")
    contents.history_items = new[dom] + (h - old[dom])
    contents.item_vectors = vectors
    contents.item_input = np.concatenate(item_input).astype(np.int64)
    contents.items = pd.DataFrame(
        {"item": np.concatenate(ids).astype(str), "domain": np.concatenate(domains).astype(str)}
    )
    contents.popularity = np.concatenate(pop).astype(np.float32)
    contents.offsets = tuple(int(x) for x in new)
    del data  # the dataset's own catalogue is not used any more


def held_out_recall(bundle: Path, users: int, seed: int = 7) -> dict[str, float]:
    """recall@200 of each domain's index against brute force, on users export did not tune
    on (export draws its tuning users with seed 0, as :func:`contents_from_model` does)."""
    b = load_bundle(bundle, verify=False)
    rec = Recommender(b)
    ids = b.users.astype(str).to_numpy()
    tuned = np.random.default_rng(0).permutation(len(ids))[:SAMPLE_USERS]
    pool = np.setdiff1d(np.arange(len(ids)), tuned)
    chosen = np.random.default_rng(seed).choice(pool, size=min(users, len(pool)), replace=False)
    out = {}
    import torch

    for d, name in enumerate(rec.domains):
        if b.indexes[d].kind == "flat":
            out[name] = 1.0
            continue
        q = []
        for u in chosen:
            hist, counts = rec.encoder_input(rec._behaviours(ids[u], None))
            with torch.inference_mode():
                q.append(b.encoders[d](hist, counts).numpy())
        queries = np.concatenate(q)
        k = min(200, b.indexes[d].size)
        _, truth = ExactIndex(b.item_vectors(d)).search(queries, k)
        out[name] = round(recall_at_k(b.indexes[d].search(queries, k)[1], truth), 4)
    return out


# --- the HTTP client -----------------------------------------------------------------------
def request_bytes(port: int, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, int, dict[str, float], bytes]:
    t0 = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    latency = time.perf_counter() - t0
    timing = {}
    for part in headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            timing[name] = float(dur)
    return latency, status, timing, body


async def load_test(port: int, requests: list[bytes], concurrency: int) -> dict[str, Any]:
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    queue = list(reversed(requests))
    results: list[tuple[float, int, dict[str, float]]] = []
    first_body: list[bytes] = []

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while queue:
            latency, status, timing, body = await one(reader, writer, queue.pop())
            if not first_body:
                first_body.append(body)
            results.append((latency, status, timing))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    wall = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    lat = np.array([r[0] for r in results]) * 1e3
    ok = sum(1 for r in results if r[1] == 200)
    stages: dict[str, float] = {}
    for name in ("wait", "encode", "search", "recommend", "serialize", "handler"):
        values = [r[2][name] for r in results if name in r[2]]
        if values:
            stages[f"{name}_ms_median"] = round(statistics.median(values), 3)
    handler = np.array([r[2].get("handler", np.nan) for r in results])
    parsed = json.loads(first_body[0]) if first_body else {}
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - ok,
        "throughput_rps": round(len(results) / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p90": round(float(np.percentile(lat, 90)), 3),
            "p99": round(float(np.percentile(lat, 99)), 3),
            "mean": round(float(lat.mean()), 3),
            "max": round(float(lat.max()), 3),
        },
        "server_ms": stages,
        "http_and_framework_ms_median": round(float(np.nanmedian(lat - handler)), 3),
        "items_per_result": len(parsed.get("results", [{}])[0].get("items", [])),
    }


def start_server(bundle: Path, port: int, threads: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        "-c",
        SERVER,
        "serve",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited: {proc.stdout.read().decode() if proc.stdout else ''}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def rss_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def measure(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    m = read_manifest(bundle)
    users = pd.read_parquet(bundle / "ids" / "users.parquet")["user"].astype(str).tolist()
    rng = random.Random(0)
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(bundle, port, args.threads)
    load_seconds = time.perf_counter() - t0
    try:

        def single(n: int) -> list[bytes]:
            return [
                request_bytes(
                    port, {"user": rng.choice(users), "domain": rng.choice(m["domains"]), "n": 200}
                )
                for _ in range(n)
            ]

        asyncio.run(load_test(port, single(args.warmup), 4))
        levels = [asyncio.run(load_test(port, single(args.requests), c)) for c in args.concurrency]
        n_extra = max(50, args.requests // 4)
        all_domains = [
            request_bytes(port, {"user": rng.choice(users), "n": 200}) for _ in range(n_extra)
        ]
        items = pd.read_parquet(bundle / "ids" / "items.parquet")
        by_domain = {d: g["item"].tolist() for d, g in items.groupby("domain")}
        doms = list(m["domains"])
        new_users = [
            request_bytes(
                port,
                {
                    "behaviours": {d: rng.sample(by_domain[d], 15) for d in rng.sample(doms, 2)},
                    "domain": rng.choice(doms),
                    "n": 200,
                },
            )
            for _ in range(n_extra)
        ]
        extra = {
            "all_domains_c1": asyncio.run(load_test(port, all_domains, 1)),
            "new_user_behaviours_c1": asyncio.run(load_test(port, new_users, 1)),
        }
        memory = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {
        "bundle": str(bundle),
        "model_version": m["model_version"],
        "n_items": m["n_items"],
        "domains": m["domains"],
        "indexes": m["indexes"],
        "bundle_mib": round(size / 2**20, 1),
        "server_start_seconds": round(load_seconds, 2),
        "server_memory_mib": memory,
        "single_domain_top200": levels,
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml1m-run", type=Path, default=None, help="a trained ML-1M run")
    parser.add_argument("--synthetic-items", type=int, default=1_500_000)
    parser.add_argument("--domains", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--target-recall", type=float, default=0.97)
    parser.add_argument(
        "--exact-max", type=int, default=50_000, help="larger domains get IVF (IndexSpec)"
    )
    parser.add_argument("--recall-users", type=int, default=300)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=4, help="server request threads")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serving")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--name", default="serving", help="results file name")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "bundles": {},
    }
    if args.ml1m_run is not None:
        out = args.work / "ml-1m-bundle"
        built: dict[str, Any] = {}
        if args.rebuild or not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            export_run(args.ml1m_run, out, force=True)
            built["export_seconds"] = round(time.perf_counter() - t0, 1)
        report["bundles"]["ml-1m"] = {**built, **measure(out, args)}
        print(json.dumps(report["bundles"]["ml-1m"], indent=1)[:3000])
    if args.synthetic_items > 0:
        out = args.work / f"synthetic-{args.synthetic_items}-x{args.exact_max}-bundle"
        built = {}
        if args.rebuild or not (out / "manifest.json").exists():
            built = synthetic_bundle(args, out)
            built["export_seconds"] = round(built["export_seconds"], 1)
        recall = held_out_recall(out, args.recall_users)
        result = {**built, "recall_at_200_held_out": recall, **measure(out, args)}
        report["bundles"][f"synthetic-{args.synthetic_items}"] = result
        c1 = min(result["single_domain_top200"], key=lambda r: r["concurrency"])
        report["targets"] = {
            "p99_ms_single_query": c1["latency_ms"]["p99"],
            "p99_under_20ms": c1["latency_ms"]["p99"] < 20,
            "min_recall_at_200": min(recall.values()),
            "recall_at_least_0.95": min(recall.values()) >= 0.95,
        }
        print(json.dumps(result, indent=1)[:4000])
    report["peak_rss_mib_client"] = round(peak_rss_mib(), 1)
    print("targets:", report.get("targets"))
    print("wrote", write(args.name, report))


if __name__ == "__main__":
    main()
