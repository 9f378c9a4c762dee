"""Serving throughput and latency under concurrent load, with and without batching, and
approximate-search recall.

Run (the serving targets' measurement; about 8 minutes of load once the bundles exist, ~3 GB of RAM
for the 1.5M-item bundle; on a shared machine pause other work while it runs)::

    python benchmarks/bench_serving.py --ml1m-run RUN --synthetic-items 1500000

and a quick check at small scale::

    python benchmarks/bench_serving.py --ml1m-run RUN --synthetic-items 50000 --seconds 2

It needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``) and says so in one line if it is
missing.

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
   IVF indexes whose ``nprobe`` export tunes to recall@200 >= 0.97 on 512 users' vectors.
2. **Recall.** For ``--recall-users`` other users (not those export tuned on), the encoder's
   vector of each domain is searched in the bundle's index and by brute force
   (:class:`~aftrec.serving.index.ExactIndex`); recall@200 per domain is reported.
3. **Load.** ``aftrec serve`` runs in its own process for each server setting of ``--configs``
   (``batched``: the defaults, 32 requests, 1 ms wait, 2 loops; ``unbatched``:
   ``--max-batch 1``; ``wait0`` / ``wait3``: batched with 0 / 3 ms wait; ``h11``: batched
   on uvicorn's pure-Python parser and asyncio loop (``--http h11 --loop asyncio``; the
   default takes httptools and uvloop); ``workers2``: batched
   in two worker processes (``--workers 2``; CPU and memory summed over them, the mean batch
   from the one worker that answers ``/metrics``); ``before``: the server
   of ``--before-src``, a source tree from before batching, with its own defaults). The load
   generator is ``wrk``, a C program in its own process (one thread, keep-alive connections, one
   per unit of concurrency, each sending its next request when the last is answered), with a Lua
   script cycling through ``--bodies`` different request bodies: top-200 of one domain for a
   random known user. The servers of a bundle are started together and warmed up; then each
   concurrency of ``--concurrency`` runs for ``--seconds`` on every server in turn (interleaved:
   a change in the machine's load during the run hits every setting). Recorded per level:
   throughput, latency p50, p90, p99, p99.9, mean and max (wrk's own histogram, microsecond
   resolution), errors, the CPU seconds per second of wall time used by the server and by wrk
   (from /proc and ``getrusage``), and the mean batch size (the server's ``aftrec_batch_size``
   metric).

Writes benchmarks/results/serving.json (``--name``) with the machine and its load average
before and after (other processes share the cores); ``benchmarks/plot_serving.py`` draws p99
against throughput from it. Bundles are cached under ``--work``; ``--rebuild`` makes them
again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


# --- the load generator ---------------------------------------------------------------------
#: server settings measured: name -> extra ``aftrec serve`` flags (None: the --before-src server)
CONFIGS: dict[str, list[str] | None] = {
    "batched": [],
    "unbatched": ["--max-batch", "1"],
    "wait0": ["--batch-wait-ms", "0"],
    "wait3": ["--batch-wait-ms", "3"],
    "workers2": ["--workers", "2"],
    "h11": ["--http", "h11", "--loop", "asyncio"],
    "before": None,
}
#: ``--workers``: seconds to let every worker load the bundle after the first one answers
WORKERS_LOAD_SECONDS = 40

LUA = """
local bodies = {
%s
}
local i = 0
local headers = {["Content-Type"] = "application/json"}
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/recommend", headers, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, " ..
    "\\"p90_us\\": %%d, \\"p99_us\\": %%d, \\"p999_us\\": %%d, \\"mean_us\\": %%f, " ..
    "\\"max_us\\": %%d, \\"errors\\": %%d, \\"bad_status\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        sys.exit(
            "error: the load generator `wrk` is not installed; install it with "
            "`apt-get install -y wrk` (Debian/Ubuntu) and run again"
        )
    return found


def lua_script(bodies: list[dict[str, Any]], folder: Path) -> Path:
    rows = ",\n".join(f"  [==[{json.dumps(b, separators=(',', ':'))}]==]" for b in bodies)
    path = folder / "post.lua"
    path.write_text(LUA % rows)
    return path


def _tree(pid: int) -> list[int]:
    """``pid`` and its children (``--workers``: uvicorn's worker processes)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid:
                kids.append(int(entry.name))
    return [pid, *kids]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and its children (all threads)."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def batch_metric(port: int) -> tuple[float, float]:
    """(sum, count) of the server's ``aftrec_batch_size`` histogram; (0, 0) without one."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = [re.search(rf"^aftrec_batch_size_{k} (\S+)$", text, re.M) for k in ("sum", "count")]
    return (float(found[0][1]), float(found[1][1])) if found[0] and found[1] else (0.0, 0.0)


def run_wrk(port: int, script: Path, concurrency: int, seconds: int, server: int) -> dict[str, Any]:
    """One load level: wrk with ``concurrency`` connections for ``seconds``."""
    cmd = [
        wrk_binary(),
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",  # whole seconds: wrk takes no fractions
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/recommend",
    ]
    batch0 = batch_metric(port)
    server0 = cpu_seconds(server)
    gen0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    out = done.stdout
    wall = time.perf_counter() - t0
    gen1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server1 = cpu_seconds(server)
    batch1 = batch_metric(port)
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    w = json.loads(line.removeprefix("WRK_JSON "))
    batches = batch1[1] - batch0[1]
    gen_cpu = (gen1.ru_utime + gen1.ru_stime) - (gen0.ru_utime + gen0.ru_stime)
    return {
        "concurrency": concurrency,
        "requests": w["requests"],
        "errors": w["errors"] + w["bad_status"],
        "throughput_rps": round(w["requests"] / (w["duration_us"] / 1e6), 1),
        "latency_ms": {
            k: round(w[f"{k}_us"] / 1e3, 3) for k in ("p50", "p90", "p99", "p999", "mean", "max")
        },
        "mean_batch": round((batch1[0] - batch0[0]) / batches, 2) if batches else None,
        "cpu_cores": {
            "server": round((server1 - server0) / wall, 2),
            "wrk": round(gen_cpu / wall, 3),
        },
    }


def start_server(bundle: Path, port: int, flags: list[str], src: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", SERVER, "serve", "--bundle", str(bundle), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
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
                    if "--workers" in flags:  # the first worker answers; let the rest load
                        time.sleep(WORKERS_LOAD_SECONDS)
                    return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def rss_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid``, summed with its children's (``--workers``)."""
    out: dict[str, float] = {}
    for p in _tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(out.get(key, 0.0) + int(value.split()[0]) / 1024, 1)
    return out


def bodies_for(bundle: Path, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` requests: top-200 of one random domain for a random known user."""
    m = read_manifest(bundle)
    users = pd.read_parquet(bundle / "ids" / "users.parquet")["user"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    return [
        {"user": str(u), "domain": str(d), "n": 200}
        for u, d in zip(rng.choice(users, count), rng.choice(m["domains"], count), strict=True)
    ]


def measure(bundle: Path, args: argparse.Namespace, configs: list[str]) -> dict[str, Any]:
    m = read_manifest(bundle)
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "model_version": m["model_version"],
        "n_items": m["n_items"],
        "domains": m["domains"],
        "indexes": m["indexes"],
        "configs": {},
    }
    configs = [c for c in configs if CONFIGS[c] is not None or args.before_src is not None]
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = lua_script(bodies_for(bundle, args.bodies), Path(tmp))
        try:
            for name in configs:  # every server up (idle) at once: the levels interleave
                flags = CONFIGS[name]
                src = ROOT / "src" if flags is not None else args.before_src
                port = free_port()
                t0 = time.perf_counter()
                servers[name] = (start_server(bundle, port, flags or [], src), port)
                out["configs"][name] = {
                    "flags": flags if flags is not None else f"source {args.before_src}",
                    "server_start_seconds": round(time.perf_counter() - t0, 2),
                    "levels": [],
                }
                run_wrk(port, script, 16, args.warmup_seconds, servers[name][0].pid)
            for c in args.concurrency:  # each level on every server in turn, so that a
                for name in configs:  # change in the machine's load hits them all alike
                    proc, port = servers[name]
                    result = run_wrk(port, script, c, args.seconds, proc.pid)
                    out["configs"][name]["levels"].append(result)
                    print(name, json.dumps(result), flush=True)
            for name, (proc, _) in servers.items():
                out["configs"][name]["server_memory_mib"] = rss_mib(proc.pid)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def level(result: dict[str, Any], config: str, c: int) -> dict[str, Any] | None:
    cfg = result["configs"].get(config)
    found = [x for x in cfg["levels"] if x["concurrency"] == c] if cfg else []
    return found[0] if found else None


def targets(report: dict[str, Any], synthetic: str | None) -> dict[str, Any]:
    """The issue's targets, from the batched server's levels."""
    out: dict[str, Any] = {}
    b = report["bundles"]
    if synthetic in b:
        r = b[synthetic]
        c64, c16, c1 = (level(r, "batched", c) for c in (64, 16, 1))
        if c64:
            out["synthetic_c64_rps"] = c64["throughput_rps"]
            out["synthetic_c64_at_least_1000_rps"] = c64["throughput_rps"] >= 1000
        if c16:
            out["synthetic_c16_p99_ms"] = c16["latency_ms"]["p99"]
            out["synthetic_c16_p99_under_25ms"] = c16["latency_ms"]["p99"] < 25
        if c1:
            out["synthetic_c1_p99_ms"] = c1["latency_ms"]["p99"]
            out["synthetic_c1_p99_at_most_5.3ms"] = c1["latency_ms"]["p99"] <= 5.3
        recall = min(r["recall_at_200_held_out"].values())
        out["synthetic_min_recall_at_200"] = recall
        out["synthetic_recall_at_least_0.95"] = recall >= 0.95
    if "ml-1m" in b:
        c64, c1 = level(b["ml-1m"], "batched", 64), level(b["ml-1m"], "batched", 1)
        if c64 and c1:
            ratio = c64["throughput_rps"] / c1["throughput_rps"]
            out["ml1m_c64_over_c1"] = round(ratio, 2)
            out["ml1m_c64_at_least_twice_c1"] = ratio >= 2
    return out


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
    parser.add_argument("--seconds", type=int, default=8, help="per load level")
    parser.add_argument("--warmup-seconds", type=int, default=2)
    parser.add_argument("--bodies", type=int, default=2000, help="distinct request bodies")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["batched", "unbatched", "wait0", "wait3", "before"],
        choices=list(CONFIGS),
        help="server settings on the synthetic bundle (ML-1M: batched and unbatched)",
    )
    parser.add_argument(
        "--before-src",
        type=Path,
        default=None,
        help="the src/ folder of aftrec before batching (e.g. from `git archive`), for the "
        "`before` setting",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serving")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--name", default="serving", help="results file name")
    args = parser.parse_args()
    wrk_binary()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split(
            "\n"
        )[0],
        "bundles": {},
    }
    synthetic = None
    bundles: list[tuple[str, Path, list[str]]] = []
    if args.ml1m_run is not None:
        out = args.work / "ml-1m-bundle"
        built: dict[str, Any] = {}
        if args.rebuild or not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            export_run(args.ml1m_run, out, force=True)
            built["export_seconds"] = round(time.perf_counter() - t0, 1)
        report["bundles"]["ml-1m"] = built
        ml_configs = [c for c in ("batched", "unbatched") if c in args.configs]
        bundles.append(("ml-1m", out, ml_configs))
    if args.synthetic_items > 0:
        out = args.work / f"synthetic-{args.synthetic_items}-x{args.exact_max}-bundle"
        built = {}
        if args.rebuild or not (out / "manifest.json").exists():
            built = synthetic_bundle(args, out)
            built["export_seconds"] = round(built["export_seconds"], 1)
        synthetic = f"synthetic-{args.synthetic_items}"
        built["recall_at_200_held_out"] = held_out_recall(out, args.recall_users)
        report["bundles"][synthetic] = built
        bundles.append((synthetic, out, list(args.configs)))
    report["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    for name, path, configs in bundles:
        report["bundles"][name].update(measure(path, args, configs))
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report, synthetic)
    report["peak_rss_mib_client"] = round(peak_rss_mib(), 1)
    print("targets:", json.dumps(report["targets"], indent=1))
    print("wrote", write(args.name, report))


if __name__ == "__main__":
    main()
