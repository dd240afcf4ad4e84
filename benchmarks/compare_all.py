"""Every Keras distribution beside what a PyTorch user writes, in one run.

    OMP_NUM_THREADS=1 python benchmarks/compare_all.py \
        --json compare_all.json --markdown compare_all.md

One row per (model, distribution, compiled or not), each its own torchrun
job (`benchmarks/transformer_rows.py`, whose docstring says what each side
runs and what is measured), started here with a hard timeout (`--timeout`
seconds, after which its process group is killed and the row records the
timeout). Models (`--models`): `lm`, a decoder-only transformer LM
(`transformer_models.py`: by default 4 blocks, width 256, 4 heads,
sequence 128, vocabulary 8192, global batch 8, Adam), and `mlp`,
`timing`'s MLP (512-4096-512, global batch 128, SGD). Rows (`--rows`):

- `single`: one process, Keras `fit` vs a plain torch loop (Keras's own
  cost);
- `dp`: `DataParallel` vs `DistributedDataParallel`;
- `tp`: `ModelParallel` on a `(1, N)` mesh, Megatron-style layouts, vs
  `parallelize_module` with the same plan;
- `fsdp`: FSDP-style layouts on a `(N,)` mesh vs FSDP2 `fully_shard`;
- `2d`: a `(R / 2, 2)` mesh on R = `--ranks-2d` ranks (default 4),
  Megatron layouts plus data parallelism, vs TP x FSDP2 on a 2-D
  `init_device_mesh`. Left out of the default rows (4 ranks on a
  2-core machine is slow): `--rows all` or `--rows ...,2d` runs it.

`--compile both` (the default) runs each row also with `jit_compile=True`
beside `torch.compile` of the native model; `off` and `only` select. A row
that fails records its error text instead of its figures.

Per row: the median ms per step of each side, the median of per-step
ratios Keras / native (each Keras step followed by a native one,
`timing.InterleavedTimer`) and the ratio of the medians, the first-step
losses' relative difference, each side's collectives in one step beside
the fewest the layout needs (formulas in `transformer_rows`), and per rank
the parameter and optimizer-state bytes each side holds (local shards),
the process's peak RSS, and on CUDA each side's peak allocated memory.
`--json` gets every figure, `--markdown` (and stdout) a table headed by
the machine: CPU model or GPU name, torch version, ranks and threads. CUDA
and NCCL are used when torch sees a GPU (each rank its LOCAL_RANK's), else
CPU and gloo. Not a test: nothing here asserts a timing.

A smoke run, tiny sizes and few steps:

    OMP_NUM_THREADS=1 python benchmarks/compare_all.py --rows all \
        --blocks 1 --width 32 --heads 2 --seq 16 --vocab 128 \
        --mlp-sizes 32,64,32 --mlp-batch 16 --steps 6 --warmup 2 \
        --json /tmp/smoke.json --markdown /tmp/smoke.md
"""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "transformer_rows.py")
KINDS = ("single", "dp", "tp", "fsdp", "2d")
DEFAULT_KINDS = ("single", "dp", "tp", "fsdp")
# Flags handed on to every row's job unchanged: (flag, type, default).
FORWARDED = (
    ("--steps", int, 50),
    ("--warmup", int, 5),
    ("--batch", int, 8),
    ("--vocab", int, 8192),
    ("--seq", int, 128),
    ("--width", int, 256),
    ("--heads", int, 4),
    ("--blocks", int, 4),
    ("--learning-rate", float, 1e-3),
    ("--mlp-sizes", str, "512,4096,512"),
    ("--mlp-batch", int, 128),
    ("--mlp-learning-rate", float, 0.01),
)


def machine():
    """What the run ran on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }
    try:
        from importlib.metadata import version

        info["keras"] = version("keras")
    except Exception:
        info["keras"] = None
    return info


def tail(path, chars=3000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_row(model, kind, compiled, ranks, forwarded, timeout, workdir):
    """Run one row's torchrun job; return its JSON, or a row recording why
    there is none."""
    name = f"{model}-{kind}{'-compiled' if compiled else ''}"
    out = os.path.join(workdir, f"{name}.json")
    log = os.path.join(workdir, f"{name}.log")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        WORKER,
        "--model",
        model,
        "--kind",
        kind,
        *(["--compile"] if compiled else []),
        *forwarded,
        "--json",
        out,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("KERAS_BACKEND", "torch")
    row = {"model": model, "kind": kind, "compiled": compiled, "ranks": ranks}
    with open(log, "w") as log_file:
        # A session of its own: on timeout the whole job (torchrun and its
        # ranks) is killed as one process group.
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=HERE,
            start_new_session=True,
        )
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            row["error"] = f"timed out after {timeout} s\n" + tail(log)
            row["log"] = log
            return row
    if not os.path.exists(out):
        row["error"] = f"exit status {rc}\n" + tail(log)
        row["log"] = log
        return row
    with open(out) as f:
        row = json.load(f)
    row["log"] = log
    if rc != 0:
        # Rank 0 wrote its figures; a rank then failed on the way out (in
        # smoke runs on 2 cores, now and then: "terminate called without
        # an active exception", SIGABRT, after the JSON was written).
        row["exit_status"] = f"{rc} after the row's figures were written"
    return row


def _mb(value):
    return "-" if value is None else f"{value / 2**20:.3g}"


def _collectives(side):
    """`5 all_reduce/model (20,480)` per (kind, axis), `; `-joined."""
    if "collectives_not_counted" in side:
        return "not counted: " + side["collectives_not_counted"]
    if "collectives" not in side:
        return "-"
    parts = []
    for c in side["collectives"]:
        axis = c["axis"].split("'")[1] if "'" in c["axis"] else c["axis"]
        parts.append(f"{c['count']} {c['kind']}/{axis} ({c['elements']:,})")
    return "; ".join(parts) or "none"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Unsupported)\b.*")


def _summary(text, limit=300):
    """The exception line of a traceback (its last), and the explanation
    dynamo gives, if any, cut to `limit` characters."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    # A rank's lines in torchrun's log start `[rank0]: `; torchrun's own
    # `ChildFailedError` says only that a rank failed.
    lines = [_RANK_PREFIX.sub("", line) for line in lines if line]
    errors = [
        line
        for line in lines
        if _ERROR_LINE.match(line) and "ChildFailedError" not in line
    ]
    summary = errors[-1] if errors else (lines[-1] if lines else "")
    explanations = [line for line in lines if line.startswith("Explanation:")]
    if explanations:
        summary += " " + explanations[-1]
    return summary[:limit]


def _side_memory(row, side):
    per_rank = row.get("per_rank") or []
    values = [
        (r[f"{side}_param_bytes"] or 0) + (r[f"{side}_optimizer_bytes"] or 0)
        for r in per_rank
        if r.get(f"{side}_param_bytes") is not None
    ]
    return max(values) if values else None


def _cuda_peak(row, side):
    values = [
        r[f"{side}_cuda_peak_bytes"]
        for r in row.get("per_rank") or []
        if r.get(f"{side}_cuda_peak_bytes") is not None
    ]
    return max(values) if values else None


def markdown(rows, info):
    """The results as a markdown table, headed by the machine."""
    device = info["gpu"] or f"{info['cpu']} ({info['cpu_count']} cores)"
    lines = [
        f"Machine: {device}; torch {info['torch']}, keras {info['keras']}; "
        f"OMP_NUM_THREADS={info['omp_num_threads']}, "
        f"{info.get('threads_per_rank')} torch thread(s) per rank; "
        f"ranks {info['ranks']}; {info['date']}",
        "",
        "Times are medians over the timed steps; ratio = median of per-step "
        "ratios Keras / native (ratio of the medians in brackets). Memory: "
        "parameters + optimizer state held by the rank holding most, MB; "
        "RSS: the largest rank's peak (both sides share the process). "
        "Compiled rows: the native step also timed alone before Keras ran "
        "(alone).",
        "",
        "| row | ranks | Keras | native | Keras ms | native ms | ratio | "
        "first-loss diff | Keras collectives | native collectives | "
        "minimum | state MB K / N | peak RSS MB | CUDA peak MB K / N | "
        "notes |",
        "|" + "---|" * 15,
    ]
    for row in rows:
        label = f"{row['model']} {row['kind']}" + (
            " compiled" if row["compiled"] else ""
        )
        keras_side = row.get("keras", {})
        native = row.get("native", {})
        notes = []
        if "error" in row:
            notes.append("job failed: " + _summary(row["error"]))
        if "exit_status" in row:
            notes.append("job exit status " + row["exit_status"])
        for name, side in (("Keras", keras_side), ("native", native)):
            if "error" in side:
                notes.append(f"{name} failed: " + _summary(side["error"]))
        if native.get("parameters_updated"):
            done, _, total = native["parameters_updated"].partition(" of ")
            if done != total:
                notes.append(
                    f"native optimizer updated {done} of {total} parameters"
                )
        diff = row.get("loss_rel_diff")
        if diff is not None and diff > 1e-4:
            notes.append(f"first-step losses differ by {diff:.1e}")
        ratio = row.get("paired_ratio")
        rss = [r["peak_rss_bytes"] for r in row.get("per_rank") or []]

        def ms(side):
            value = side.get("median_ms")
            alone = side.get("median_ms_alone_before_keras")
            if alone is not None:
                # Compiled native rows: also timed alone, before Keras.
                text = "-" if value is None else f"{value:.2f}"
                return f"{text} (alone {alone:.2f})"
            return "-" if value is None else f"{value:.2f}"

        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    str(row.get("ranks", "-")),
                    keras_side.get("name", "-"),
                    native.get("name", "-"),
                    ms(keras_side),
                    ms(native),
                    "-"
                    if ratio is None
                    else f"{ratio:.3f} ({row['ratio_of_medians']:.3f})",
                    "-" if diff is None else f"{diff:.1e}",
                    _collectives(keras_side),
                    _collectives(native),
                    row.get("minimum", "-"),
                    f"{_mb(_side_memory(row, 'keras'))} / "
                    f"{_mb(_side_memory(row, 'native'))}",
                    _mb(max(rss)) if rss else "-",
                    f"{_mb(_cuda_peak(row, 'keras'))} / "
                    f"{_mb(_cuda_peak(row, 'native'))}",
                    "; ".join(notes).replace("|", "/").replace("\n", " "),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rows",
        default=",".join(DEFAULT_KINDS),
        help=f"comma-separated, of {', '.join(KINDS)}; or all",
    )
    parser.add_argument("--models", default="lm,mlp")
    parser.add_argument(
        "--compile", choices=("both", "off", "only"), default="both"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ranks-2d", type=int, default=4)
    parser.add_argument(
        "--timeout",
        type=int,
        default=1800,
        help="seconds each row's job may run before it is killed",
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown")
    parser.add_argument(
        "--logs", help="folder for each job's log (default: a temporary one)"
    )
    for flag, kind, default in FORWARDED:
        parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args()
    kinds = KINDS if args.rows == "all" else tuple(args.rows.split(","))
    models = tuple(args.models.split(","))
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"--rows: unknown row {kind!r}; expected {KINDS}.")
    for model in models:
        if model not in ("lm", "mlp"):
            parser.error(f"--models: unknown model {model!r}; lm or mlp.")
    compiled = {"both": (False, True), "off": (False,), "only": (True,)}[
        args.compile
    ]
    forwarded = []
    for flag, _, _ in FORWARDED:
        value = getattr(args, flag[2:].replace("-", "_"))
        forwarded += [flag, str(value)]
    workdir = args.logs or tempfile.mkdtemp(prefix="compare_all_")
    os.makedirs(workdir, exist_ok=True)
    info = machine()
    info["ranks"] = f"{args.ranks} ({args.ranks_2d} for 2d, 1 for single)"
    rows = []
    for model in models:
        for kind in kinds:
            ranks = {"single": 1, "2d": args.ranks_2d}.get(kind, args.ranks)
            for jit in compiled:
                print(
                    f"running {model} {kind}"
                    f"{' compiled' if jit else ''} on {ranks} ranks",
                    flush=True,
                )
                rows.append(
                    run_row(
                        model,
                        kind,
                        jit,
                        ranks,
                        forwarded,
                        args.timeout,
                        workdir,
                    )
                )
                info["threads_per_rank"] = rows[-1].get(
                    "threads", info.get("threads_per_rank")
                )
                with open(args.json, "w") as f:
                    json.dump(
                        {"machine": info, "args": vars(args), "rows": rows},
                        f,
                        indent=1,
                    )
    table = markdown(rows, info)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
