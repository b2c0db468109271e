#!/usr/bin/python3
"""csaq's calibration pass against a PyTorch eager reference, on the same cores (bench/run.sh).

For each model shape: a random-weight bfloat16 Llama checkpoint (csaq make-demo), then in
one invocation, one after the other,
  - `csaq profile` on 1 rank and on 2 ranks (mpirun), and bench/reference.py (forward,
    autograd backward, |g*W| into float32 accumulators) at the same threads;
  - `csaq eval` and the reference's forward pass alone.
Every run reads the same tokens (consecutive windows of the demo's tokens.npy). Prints a
Markdown table and writes every measurement to OUT/results.json.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {
    # name: make-demo flags, calibration sequences
    "h256x6": (["--layers", "6", "--hidden", "256", "--intermediate", "768", "--heads", "4", "--kv-heads", "2",
                "--vocab", "2048"], 16),
    "h1024x8": (["--layers", "8", "--hidden", "1024", "--intermediate", "2816", "--heads", "16", "--kv-heads", "4",
                 "--vocab", "2048"], 6),
    "smoke": (["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-heads", "1",
               "--vocab", "300"], 2),
}


def run(cmd, env=None, log=None):
    merged = dict(os.environ, **(env or {}))
    start = time.perf_counter()
    p = subprocess.run(cmd, env=merged, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log:
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n" + p.stdout)
    if p.returncode != 0:
        sys.exit(f"bench: failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}")
    return p.stdout, time.perf_counter() - start


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csaq", default=os.path.join(ROOT, "build/launcher/csaq"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/out"))
    ap.add_argument("--shapes", default="h256x6,h1024x8")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every run (2 ranks: half each)")
    ap.add_argument("--ranks", default="1,2", help="world sizes of csaq profile")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    mpirun = ["mpirun", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    threads = str(args.threads)
    blas_env = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    version, _ = run([args.csaq, "--version"])
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
               "cores": os.cpu_count(), "threads": args.threads, "seq_len": args.seq_len,
               "csaq_version": version.strip().splitlines(), "shapes": {}}
    rows = []
    for shape in args.shapes.split(","):
        flags, samples = SHAPES[shape]
        model = os.path.join(args.out, shape)
        tokens = args.seq_len * samples + 1
        if not os.path.exists(os.path.join(model, "config.json")):
            run([args.csaq, "make-demo", "--out", model, "--dtype", "bfloat16", "--tokens", str(tokens)] + flags)
        npy = os.path.join(model, "tokens.npy")
        common = ["--model", model, "--seq-len", str(args.seq_len)]
        r = {"make_demo": flags, "sequences": samples, "profile": {}}
        for ranks in [int(x) for x in args.ranks.split(",")]:
            report = os.path.join(args.out, f"{shape}-profile-{ranks}.json")
            cmd = [args.csaq, "profile"] + common + ["--calib", npy, "--samples", str(samples), "--sampling",
                   "contiguous", "--early-stop-rho", "2", "--threads", threads if ranks == 1 else "0",
                   # the text's labels and the Taylor cost's Σg, as the eager reference computes
                   "--objective", "calibration-loss",
                   "--out", os.path.join(args.out, f"{shape}-profile-{ranks}.h5"), "--report", report,
                   "--overwrite", "--resume", "never"]
            _, wall = run((mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd,
                          log=os.path.join(args.out, f"{shape}-profile-{ranks}.log"))
            with open(report) as f:
                rep = json.load(f)
            r["profile"][ranks] = {"tokens_per_s": rep["time_s"]["calibration_pass"]["tokens_per_s"],
                                   "phases": rep["time_s"]["calibration_pass"]["phases"],
                                   "peak_over_baseline_bytes": max(rep["memory"]["peak_over_baseline_bytes"]),
                                   "peak_rss_bytes": max(rep["memory"]["peak_rss_bytes"]),
                                   "runtime": rep["runtime"], "wall_s": wall}
        out, _ = run(["/usr/bin/python3", os.path.join(HERE, "reference.py"), "--model", model, "--tokens", npy,
                      "--samples", str(samples), "--seq-len", str(args.seq_len), "--threads", threads], env=blas_env)
        r["reference"] = json.loads(out.strip().splitlines()[-1])
        report = os.path.join(args.out, f"{shape}-eval.json")
        run([args.csaq, "eval"] + common + ["--data", npy, "--max-sequences", str(samples), "--threads", threads,
            "--report", report, "--overwrite"])
        with open(report) as f:
            ev = json.load(f)
        r["eval"] = {"tokens_per_s": ev["pass_tokens_per_s"], "dtype": ev["dtype"],
                     "peak_over_baseline_bytes": max(ev["memory"]["peak_over_baseline_bytes"])}
        out, _ = run(["/usr/bin/python3", os.path.join(HERE, "reference.py"), "--model", model, "--tokens", npy,
                      "--samples", str(samples), "--seq-len", str(args.seq_len), "--threads", threads,
                      "--forward-only"], env=blas_env)
        r["reference_forward"] = json.loads(out.strip().splitlines()[-1])
        results["shapes"][shape] = r
        ref = r["reference"]
        for ranks, p in r["profile"].items():
            rows.append(f"| {shape} | profile, {ranks} rank{'s' if ranks > 1 else ''} | {p['tokens_per_s']:.0f} | "
                        f"{ref['tokens_per_s']:.0f} | {p['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                        f"{p['peak_over_baseline_bytes'] / 1e6:.0f} | {ref['peak_over_baseline_bytes'] / 1e6:.0f} | "
                        f"{p['peak_over_baseline_bytes'] / ref['peak_over_baseline_bytes']:.2f} |")
        fwd = r["reference_forward"]
        rows.append(f"| {shape} | eval (forward) | {r['eval']['tokens_per_s']:.0f} | {fwd['tokens_per_s']:.0f} | "
                    f"{r['eval']['tokens_per_s'] / fwd['tokens_per_s']:.2f} | "
                    f"{r['eval']['peak_over_baseline_bytes'] / 1e6:.0f} | {fwd['peak_over_baseline_bytes'] / 1e6:.0f} | "
                    f"{r['eval']['peak_over_baseline_bytes'] / fwd['peak_over_baseline_bytes']:.2f} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"{results['date']}, {results['cpu']}, {results['cores']} cores, {args.threads} threads, "
          f"seq-len {args.seq_len}")
    print("\n".join(results["csaq_version"]))
    print("\n| model | csaq pass | csaq tokens/s | eager tokens/s | ratio | csaq peak MB | eager peak MB | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    phases = ["forward", "backward", "recompute", "salience_fold", "output_gradient_energy", "coactivation", "hessian",
              "input_statistics", "communication", "early_stop", "checkpoint", "other"]
    print("\ncsaq profile, seconds per phase (rank by rank):\n")
    print("| model | ranks | rank | " + " | ".join(phases) + " | total |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in phases) + " | --- |")
    for shape, r in results["shapes"].items():
        for ranks, p in r["profile"].items():
            for rank, ph in enumerate(p["phases"]):
                print(f"| {shape} | {ranks} | {rank} | " + " | ".join(f"{ph[k]:.2f}" for k in phases) +
                      f" | {ph['total']:.2f} |")
    print(f"\nall measurements: {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
