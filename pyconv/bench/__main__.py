"""python -m pyconv.bench [--op OP] [--device cpu|cuda] [--quick] [--json PATH] [--png PATH]

Prints, per op and case: shape, dtype, device, memory format, torch time, pyconv time, speedup,
max abs error against torch, and pyconv's achieved rate: GB/s for the memory-bound ops (also as a
share of what plain copies of the same bytes reach in the same run), GFLOP/s for convolution.
"""

import argparse
import json
import math
import os
import platform
import sys

import torch

import pyconv

from . import conv as conv_bench
from . import dropout as dropout_bench
from . import model as model_bench
from . import pool as pool_bench
from .cases import all_cases
from .timing import copy_bandwidth, interleaved, matmul_rate

BODIES = {
    "dropout": dropout_bench,
    "dropout2d": dropout_bench,
    "max_pool2d": pool_bench,
    "avg_pool2d": pool_bench,
    "conv2d": conv_bench,
    "resnet18": model_bench,
}


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    m = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyconv": pyconv.info()["version"],
        "simd": pyconv.info()["simd"],
        "python": platform.python_version(),
    }
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
    return m


def progress(i, n, label):
    end = "" if sys.stderr.isatty() else "\n"
    sys.stderr.write(f"\r[{i}/{n}] {label:<70}{end}")
    sys.stderr.flush()


def run(args):
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    report = {"machines": {}, "copy_gbps": {}, "matmul_gflops": {}, "rows": []}
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        report["machines"][device] = machine(device)
        report["copy_gbps"][device] = copy_bandwidth(device) / 1e9
        # torch's float32 matrix product before and after the cases: the machine's FMA speed
        # during the run, against which the conv2d rates read
        report["matmul_gflops"][device] = [matmul_rate(device) / 1e9]
        cases = []
        for op, op_cases in all_cases(device).items():
            if args.op in (None, "all", op):
                cases += [c for c in op_cases if c.quick or not args.quick]
        repeat = args.repeat or (5 if args.quick else 9)
        for i, case in enumerate(cases, 1):
            progress(i, len(cases), f"{device} {case.label()}")
            body = BODIES[case.op]
            torch_fn, our_fn, copy_fn, error_fn, amount = body.callables(case, device)
            fns = {"torch": torch_fn, "pyconv": our_fn}
            if copy_fn is not None:
                fns["copy"] = copy_fn
            # on the GPU several calls per timing, so that the host's launch overhead overlaps
            t = interleaved(fns, device, repeat, inner=5 if device == "cuda" else 1)
            # bytes moved (GB/s) or floating-point operations (GFLOP/s) per second
            scale = getattr(body, "SCALE", 1e9)
            rate = amount / t["pyconv"] / scale
            ceiling = amount / t["copy"] / scale if copy_fn is not None else None
            report["rows"].append(
                {
                    "op": case.label().split(f" {case.mode} ")[0],
                    "mode": case.mode,
                    "shape": list(case.shape),
                    "dtype": case.dtype_label,
                    "device": device,
                    "layout": case.layout,
                    "p": case.p,
                    "torch_ms": t["torch"] * 1e3,
                    "pyconv_ms": t["pyconv"] * 1e3,
                    "speedup": t["torch"] / t["pyconv"],
                    "max_abs_err": error_fn(),
                    "unit": getattr(body, "UNIT", "GB/s"),
                    "rate": rate,
                    "copy_gbps": ceiling,
                    "pct_of_copy": 100 * rate / ceiling if ceiling else None,
                }
            )
        report["matmul_gflops"][device].append(matmul_rate(device) / 1e9)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    return report


def _rate(r):
    return f"{r['rate']:.1f} {r['unit']}"


def _pct(r):
    return "-" if r["pct_of_copy"] is None else f"{r['pct_of_copy']:.0f}%"


def print_table(report):
    for device, gbps in report["copy_gbps"].items():
        m = report["machines"][device]
        where = m.get("gpu", m["cpu"])
        mm = report.get("matmul_gflops", {}).get(device)
        mm = (
            f"; torch float32 matmul 2048^3 {mm[0]:.0f} / {mm[-1]:.0f} GFLOP/s (start / end)"
            if mm
            else ""
        )
        print(
            f"# {device}: {where}, torch {m['torch']}, {m['threads']} threads, simd {m['simd']}; "
            f"plain copy of 256 MiB {gbps:.1f} GB/s (read + write){mm}"
        )
    head = (
        f"{'op':<33}{'mode':<9}{'shape':<16}{'dtype':<15}{'dev':<5}{'layout':<14}"
        f"{'torch ms':>10}{'pyconv ms':>11}{'speedup':>9}{'max err':>10}{'rate':>15}{'%copy':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        print(
            f"{r['op']:<33}{r['mode']:<9}{'x'.join(map(str, r['shape'])):<16}{r['dtype']:<15}"
            f"{r['device']:<5}{r['layout']:<14}{r['torch_ms']:>10.2f}{r['pyconv_ms']:>11.2f}"
            f"{r['speedup']:>8.1f}x{r['max_abs_err']:>10.1e}{_rate(r):>15}{_pct(r):>7}"
        )
    speedups = [r["speedup"] for r in report["rows"]]
    if speedups:
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        print(
            f"geometric mean speedup {geo:.2f}x over {len(speedups)} cases; "
            f"min {min(speedups):.2f}x, max {max(speedups):.2f}x"
        )
    groups = {}  # the conv2d suite by dtype
    for r in report["rows"]:
        if r["op"].startswith("conv2d"):
            groups.setdefault((r["device"], r["dtype"]), []).append(r["speedup"])
    for (device, dtype), sp in groups.items():
        geo = math.exp(sum(math.log(s) for s in sp) / len(sp))
        print(
            f"  conv2d {device} {dtype}: geometric mean {geo:.2f}x over {len(sp)} cases; "
            f"min {min(sp):.2f}x, max {max(sp):.2f}x"
        )


def markdown(report):
    """The rows as a Markdown table (what README's results section carries)."""
    lines = [
        "| op | mode | shape | dtype | device | layout | torch ms | pyconv ms | speedup | rate |"
        " %copy |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['op']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
            f"{r['device']} | {r['layout']} | {r['torch_ms']:.2f} | {r['pyconv_ms']:.2f} | "
            f"{r['speedup']:.1f}x | {_rate(r)} | {_pct(r)} |"
        )
    return "\n".join(lines)


def chart(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [
        f"{r['device']} {r['op']} {r['mode']} {r['dtype']} {r['layout']}\n"
        f"{'x'.join(map(str, r['shape']))}"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over torch (time torch / time pyconv)")
    ax.set_title("pyconv vs torch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pyconv.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=["all", *BODIES], default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--quick", action="store_true", help="a few cases, fewer repeats")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON")
    ap.add_argument("--png", metavar="PATH", help="speedup chart (default: next to --json)")
    ap.add_argument("--from-json", metavar="PATH", help="print a saved report instead of running")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        report = run(args)
    if args.markdown:
        print(markdown(report))
    else:
        print_table(report)
    if args.from_json:
        return
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if png:
        try:
            chart(report, png)
        except ImportError:
            print("matplotlib is not installed: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
