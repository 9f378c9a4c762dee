"""What MKL's choice of code path costs on a non-Intel CPU: matrix products and training steps,
with MKL's vendor check as shipped and with it answering "Intel".

Run: ``python benchmarks/bench_mkl_vendor.py --data data/ml-1m`` (writes
benchmarks/results/mkl_vendor.json). torch's x86 wheels link Intel MKL for ``mm``, ``addmm``
and ``bmm``. MKL picks its kernels after asking ``mkl_serv_intel_cpu_true()`` whether the CPU
is Intel's; on an AMD CPU the answer is no, and MKL takes its generic path even where the CPU
has the instructions (AVX-512 on AMD Zen 4). A one-line shared library that defines that
function to return 1, put in front of MKL with ``LD_PRELOAD``, makes MKL take the path it
would take on an Intel CPU with the same instructions. This script builds that library with
the system's C compiler into a temporary folder and, alternating the two settings
``--repeat`` times, each in a fresh process on one thread:

* **products**: GFLOP/s of single matrix products on the shapes of an ``aft`` step
  (tokens x dim x 3 dim, the feed-forward pair, ConvE's projection and its weight gradient)
  and a large square one;
* **steps**: examples/s of ``benchmarks/bench_train.py`` on ``--models``.

The override is a measurement, not something aftrec does: it replaces a function inside a
vendor's library. Results differ from the shipped path only by floating-point rounding
(other kernels sum in another order).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from _common import write

SHIM = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"

#: (m, k, n) of ``(m x k) @ (k x n)``: a step of ``aft`` on ML-1M (256 users, 5 domain tokens,
#: dim 64, feed-forward 256, ConvE of Eq. 10 with 16 x 10 x 64 maps) and a large square product
SHAPES = [(1280, 64, 192), (1280, 64, 256), (1280, 256, 64), (256, 10240, 64), (64, 256, 10240),
          (2048, 2048, 2048)]  # fmt: skip

GEMM = """
import json, sys, time, torch
torch.set_num_threads(1)
out = {}
for m, k, n in json.loads(sys.argv[1]):
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    reps = max(5, int(3e9 / (2 * m * k * n)))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9
print(json.dumps(out))
"""


def build_shim(folder: Path) -> Path:
    """Compile the override into ``folder``; exit with one line if no C compiler is found."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("bench_mkl_vendor: no C compiler found (set CC): the override cannot be built")
    source, library = folder / "mkl_any_cpu.c", folder / "libmkl_any_cpu.so"
    source.write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
    return library


def run(argv: list[str], preload: Path | None) -> str:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return done.stdout


def steps(args: argparse.Namespace, preload: Path | None, name: str) -> dict[str, float]:
    script = Path(__file__).resolve().parent / "bench_train.py"
    run([sys.executable, str(script), "--data", str(args.data), "--models", *args.models,
         "--steps", str(args.steps), "--chunk", "10", "--threads", "1", "--name", name],
        preload)  # fmt: skip
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    result = json.loads(path.read_text())
    path.unlink()  # a scratch file of this script's
    return {m: float(r["examples_per_second"]) for m, r in result["models"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    models = ["aft", "aft-d", "sasrec", "atrank", "bert4rec-single"]
    parser.add_argument("--models", nargs="+", default=models)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and run")
    parser.add_argument("--repeat", type=int, default=2, help="alternating pairs of runs")
    parser.add_argument("--name", default="mkl_vendor")
    args = parser.parse_args()
    vendor = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    raw: dict[str, dict[str, list[dict[str, float]]]] = {
        "products": {"shipped": [], "intel": []},
        "steps": {"shipped": [], "intel": []},
    }
    with tempfile.TemporaryDirectory() as tmp:
        shim = build_shim(Path(tmp))
        for i in range(args.repeat):
            for label, preload in (("shipped", None), ("intel", shim)):
                gemm = run([sys.executable, "-c", GEMM, json.dumps(SHAPES)], preload)
                raw["products"][label].append(json.loads(gemm))
                raw["steps"][label].append(steps(args, preload, f"_{args.name}_{label}_{i}"))
                print(label, i, raw["products"][label][-1], raw["steps"][label][-1], flush=True)

    def summary(kind: str) -> dict[str, Any]:
        keys = raw[kind]["shipped"][0]
        out = {}
        for key in keys:
            a = [r[key] for r in raw[kind]["shipped"]]
            b = [r[key] for r in raw[kind]["intel"]]
            out[key] = {"shipped": a, "intel": b, "ratio_of_medians": median(b) / median(a)}
        return out

    payload = {
        "command": "python benchmarks/bench_mkl_vendor.py " + " ".join(sys.argv[1:]),
        "cpu_vendor": vendor,
        "machine_arch": platform.machine(),
        "threads": 1,
        "products_gflops": summary("products"),
        "steps_examples_per_second": summary("steps"),
    }
    print("wrote", write(args.name, payload))


if __name__ == "__main__":
    main()
