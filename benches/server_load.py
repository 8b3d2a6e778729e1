#!/usr/bin/env python3
"""Load benchmark of `sdctl serve`: N small txt2img requests at once, latency and throughput.

    python benches/server_load.py --sdctl target/debug/sdctl [--requests 50] [--steps 4]

Run from the repository root with tests/server/requirements.txt installed. Starts the server on
127.0.0.1 (port 0, read from its stderr line) with the tiny fixture models, exactly as
tests/server/test_api.py does, and:
1. warms up with one request (model load);
2. sends the same request alone, one after another (`--lone` times, 50): lone-request latency,
   and each one's latency minus the engine time the server reports for it (p50 / p99);
3. fires `--requests` requests (64x64, `--steps` steps, fixed distinct seeds) from as many
   threads at once, released together by a barrier (all queued), and checks that none is lost
   (every answer 200 with one image): latency under load and throughput;
4. the engine's own time for one request: the server's timing in `info` when it reports one,
   else `sdctl generate`'s printed `N steps in X s ... decode Y s` for the same settings (that
   summary has 0.1 s resolution; the model load and PNG write it also prints are left out);
   the HTTP layer's overhead is lone-request latency minus that engine time.
Prints a markdown table. Loopback only, every wait bounded, the server stopped at the end.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

sys.dont_write_bytecode = True  # importing the test's helpers must not leave __pycache__ behind
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "server"))
from test_api import LORAS, Server, TestFailure, make_dirs  # noqa: E402

TIMEOUT = 600  # seconds for one request (50 queued 4-step requests take well under a minute)


def percentile(xs, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def payload(seed, steps):
    return {"prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "", "width": 64,
            "height": 64, "steps": steps, "cfg_scale": 7.0, "seed": seed,
            "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1}


def post(base, body):
    t0 = time.perf_counter()
    r = requests.post(base + "/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    dt = time.perf_counter() - t0
    ok = r.status_code == 200 and len(r.json().get("images") or []) == 1
    info = {}
    if r.status_code == 200:
        try:
            info = json.loads(r.json().get("info") or "{}")
        except ValueError:
            pass
    return ok, dt, r.status_code, info, (None if ok else r.text[:300])


def server_timing(info):
    """The engine's own seconds for the request if info reports it: (seconds, key) or None."""
    for k, v in info.items():
        if not re.search(r"tim|elapsed|duration", k, re.I):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v), k
        # sdctl serve: "sdctl_timings": [{"load_s", "controls_s", "sampling_s", "decode_s"}, ...]
        parts = v if isinstance(v, list) else [v]
        if parts and all(isinstance(d, dict) for d in parts):
            nums = [x for d in parts for x in d.values()
                    if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if nums:
                keys = "+".join(sorted({kk for d in parts for kk in d}))
                return float(sum(nums)), f"{k} ({keys})"
    return None


def cli_engine_time(sdctl, models, env, steps, tmp, runs=3):
    """`sdctl generate` sampling + decode seconds (its summary line), median of `runs`."""
    p = payload(1, steps)
    times = []
    line = ""
    for i in range(runs):
        out = os.path.join(tmp, f"cli{i}.png")
        cmd = [sdctl, "generate", "--model", os.path.join(models, "sd1"), "--prompt", p["prompt"],
               "--negative-prompt", p["negative_prompt"], "--width", "64", "--height", "64",
               "--steps", str(steps), "--cfg-scale", "7.0", "--sampler", "euler_a",
               "--schedule", "normal", "--seed", "1", "--rng", "philox", "--clip-skip", "1",
               "--batch", "1", "--lora-dir", LORAS, "--output", out]
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise SystemExit(f"sdctl generate failed: {r.stderr.decode(errors='replace')[-1000:]}")
        line = r.stderr.decode(errors="replace").strip().splitlines()[-1]
        m = re.search(r"(\d+) steps in ([\d.]+) s", line)
        d = re.search(r"decode ([\d.]+) s", line)
        if not (m and d):
            raise SystemExit(f"cannot read sdctl generate's summary line: {line!r}")
        times.append(float(m.group(2)) + float(d.group(1)))
    return statistics.median(times), line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdctl", required=True)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lone", type=int, default=50, help="lone requests, one after another")
    args = ap.parse_args()
    n = args.requests
    sdctl = os.path.abspath(args.sdctl)

    tmp = tempfile.mkdtemp(prefix="sdctl-load-")
    env = dict(os.environ, SDCTL_CACHE_DIR=os.path.join(tmp, "cache"))
    os.makedirs(env["SDCTL_CACHE_DIR"])
    models, cns, _ = make_dirs(tmp)
    server = None
    try:
        try:
            server = Server(sdctl, models, cns, ["--queue-size", str(n + 8)], env, "load")
        except TestFailure as e:
            raise SystemExit(str(e))
        base = server.base

        ok, dt, st, _, err = post(base, payload(1, args.steps))
        if not ok:
            raise SystemExit(f"warm-up request failed: {st} {err}")
        warm = dt

        lone, timings = [], []
        for _ in range(args.lone):
            ok, dt, st, info, err = post(base, payload(1000, args.steps))
            if not ok:
                raise SystemExit(f"lone request failed: {st} {err}")
            lone.append(dt)
            t = server_timing(info)
            if t:
                timings.append((t[0], t[1], dt - t[0]))

        barrier = threading.Barrier(n)
        results = [None] * n

        def worker(i):
            try:
                barrier.wait(60)
                results[i] = post(base, payload(1000 + i, args.steps))
            except Exception as e:  # counted as lost
                results[i] = (False, None, None, {}, repr(e)[:300])

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT + 60)
        wall = time.perf_counter() - t0
        lost = [(i, r) for i, r in enumerate(results) if not r or not r[0]]
        loaded = [r[1] for r in results if r and r[0]]
        # the engine's own time for each loaded request, where the server reports it
        loaded_engine = [server_timing(r[3]) for r in results if r and r[0]]
        engine_sum = (sum(t[0] for t in loaded_engine)
                      if loaded_engine and all(loaded_engine) else None)

        cli_engine, cli_line = cli_engine_time(sdctl, models, env, args.steps, tmp)
        if len(timings) == len(lone):
            engine = statistics.median(t for t, _, _ in timings)
            engine_src = f"server info `{timings[0][1]}`, median of {len(timings)} lone requests"
            # paired: each lone request's latency minus its own engine time
            paired = [o for _, _, o in timings]
            overhead = statistics.median(paired)
            overhead_p99 = percentile(paired, 99)
        else:
            engine = cli_engine
            engine_src = "`sdctl generate` steps + decode, median of 3 (0.1 s resolution)"
            overhead = statistics.median(lone) - engine
            overhead_p99 = percentile(lone, 99) - engine

        lone_p50 = statistics.median(lone)
        rows = [
            ("requests under load", f"{n} sent at once, {len(loaded)} x 200 with an image, "
                                    f"{len(lost)} lost"),
            ("warm-up (first request, model load)", f"{warm * 1000:.0f} ms"),
            (f"lone-request latency p50 ({args.lone} runs)", f"{lone_p50 * 1000:.0f} ms "
             f"(min {min(lone) * 1000:.0f}, max {max(lone) * 1000:.0f})"),
            ("engine time per request", f"{engine * 1000:.0f} ms — {engine_src}"),
            ("CLI for comparison: `sdctl generate` steps + decode (0.1 s resolution)",
             f"{cli_engine * 1000:.0f} ms (`{cli_line}`)"),
            (f"HTTP layer overhead, lone request (latency - its engine time; {args.lone} runs)",
             f"p50 {overhead * 1000:.1f} ms, p99 {overhead_p99 * 1000:.1f} ms"),
            ("throughput under load", f"{len(loaded) / wall:.2f} requests/s "
                                      f"({wall:.1f} s for {n})"),
            ("service time per request under load (wall / n)", f"{wall / n * 1000:.0f} ms"),
            ("overhead per request under load ((wall - sum of engine times) / n)",
             f"{((wall - engine_sum) / n if engine_sum is not None else wall / n - engine) * 1000:.1f} ms"),
        ]
        if loaded:
            rows += [
                ("latency under load p50", f"{percentile(loaded, 50) * 1000:.0f} ms"),
                ("latency under load p99", f"{percentile(loaded, 99) * 1000:.0f} ms"),
                ("latency under load max", f"{max(loaded) * 1000:.0f} ms"),
            ]
        print(f"\n`sdctl serve` load: 64x64, {args.steps} steps, Euler a, {n} requests at once\n")
        print("| measure | value |")
        print("|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        if lost:
            print("\nlost requests:")
            for i, r in lost[:10]:
                print(f"  #{i}: {r and r[2]} {r and r[4]}")
            return 1
        return 0
    finally:
        if server:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
