"""The HTTP side of deploy/smoke.sh: wait for readiness, classify the examples, compare, merge, load.

Run with the project's interpreter (it uses httpx): ``.venv/bin/python deploy/smoke_client.py CMD ...``.
Every command prints one line of JSON (or a message) and exits 0 on success, 1 on a failed check.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx


def _readyz(url: str) -> tuple[int, dict]:
    try:
        r = httpx.get(f"{url}/readyz", timeout=5)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError) as e:
        return 0, {"error": {"message": f"{type(e).__name__}: {e}"}}


def wait_ready(args: argparse.Namespace) -> int:
    """Poll /readyz until 200 (or, with --expect-error, until a 503 naming that text)."""
    start, last = time.monotonic(), (0, {})
    while time.monotonic() - start < args.timeout:
        last = _readyz(args.url)
        code, body = last
        if args.expect_error is None and code == 200:
            print(
                json.dumps({"seconds": round(time.monotonic() - start, 2), "model_version": body.get("model_version")})
            )
            return 0
        if args.expect_error is not None and code == 503 and args.expect_error in json.dumps(body):
            print(json.dumps({"seconds": round(time.monotonic() - start, 2), "error": body["error"]["message"][:300]}))
            return 0
        time.sleep(args.poll)
    print(f"not ready after {args.timeout:g} s; last /readyz: {last}", file=sys.stderr)
    return 1


def _answers(url: str, examples: Path) -> dict[str, dict]:
    """Every example image classified routed (the gate picks the task) and with its task given (top 3)."""
    out = {}
    with httpx.Client(timeout=60) as client:
        for path in sorted(examples.glob("*.png")):
            task = path.stem
            for mode, data in (("routed", {}), ("given", {"task": task, "top_k": "3"})):
                r = client.post(f"{url}/v1/classify", files={"image": (path.name, path.read_bytes())}, data=data)
                r.raise_for_status()
                body = r.json()
                out[f"{task}/{mode}"] = {"model_version": body["model_version"], "predictions": body["predictions"]}
    return out


def classify(args: argparse.Namespace) -> int:
    answers = _answers(args.url, Path(args.examples))
    if not answers:
        print(f"no example images in {args.examples}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(answers, indent=1, sort_keys=True))
    routed = {k: v["predictions"][0]["task"]["name"] for k, v in answers.items() if k.endswith("/routed")}
    print(json.dumps({"requests": len(answers), "routed_to": routed}))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Same tasks and classes; probabilities equal to ``--tol`` (0: bit-equal)."""
    a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())
    if sorted(a) != sorted(b):
        print(f"different requests: {sorted(a)} vs {sorted(b)}", file=sys.stderr)
        return 1
    worst, mismatched = 0.0, []
    for key in sorted(a):
        pa, pb = a[key]["predictions"], b[key]["predictions"]
        labels = [(p["task"]["name"], [c["index"] for c in p["top_k"]]) for p in pa]
        if labels != [(p["task"]["name"], [c["index"] for c in p["top_k"]]) for p in pb]:
            mismatched.append(key)
            continue
        for p, q in zip(pa, pb):
            for c, d in zip(p["top_k"], q["top_k"]):
                worst = max(worst, abs(c["probability"] - d["probability"]))
    exact = not mismatched and all(a[k]["predictions"] == b[k]["predictions"] for k in a)
    print(json.dumps({"requests": len(a), "mismatched": mismatched, "max_score_diff": worst, "bit_equal": exact}))
    return 0 if not mismatched and worst <= args.tol else 1


def merge(args: argparse.Namespace) -> int:
    """POST /v1/merge through ``url`` and follow the job through the same url until it ends."""
    auth = {"authorization": f"Bearer {args.token}"}
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{args.url}/v1/merge", json={"method": args.method}, headers=auth)
        if r.status_code != 202:
            print(f"merge not accepted: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        job_id, start, polls, not_found = r.json()["id"], time.monotonic(), 0, 0
        while time.monotonic() - start < args.timeout:
            r = client.get(f"{args.url}/v1/merge/{job_id}", headers=auth)
            polls += 1
            not_found += r.status_code == 404
            if r.status_code == 200 and r.json()["state"] in ("succeeded", "failed"):
                job = r.json()
                print(
                    json.dumps(
                        {
                            "state": job["state"],
                            "version": job["version"],
                            "error": job["error"],
                            "seconds": job["seconds"],
                            "status_polls": polls,
                            "status_404": not_found,
                        }
                    )
                )
                return 0 if job["state"] == "succeeded" else 1
            time.sleep(0.2)
    print(f"merge job {job_id} not done after {args.timeout:g} s", file=sys.stderr)
    return 1


def converge(args: argparse.Namespace) -> int:
    """Seconds until every replica's /readyz names ``--version``."""
    start = time.monotonic()
    seen: dict[str, float] = {}
    while time.monotonic() - start < args.timeout:
        for url in args.replicas:
            if url not in seen and _readyz(url)[1].get("model_version") == args.version:
                seen[url] = round(time.monotonic() - start, 2)
        if len(seen) == len(args.replicas):
            print(json.dumps({"version": args.version, "seconds": max(seen.values()), "per_replica": seen}))
            return 0
        time.sleep(0.1)
    print(f"not every replica serves {args.version} after {args.timeout:g} s: {seen}", file=sys.stderr)
    return 1


def load(args: argparse.Namespace) -> int:
    """``--threads`` clients classifying the examples (task given: any bundle answers) through ``url`` for
    ``--seconds``; failures = anything but 200."""
    images = [(p.stem, p.read_bytes()) for p in sorted(Path(args.examples).glob("*.png"))]
    stop = time.monotonic() + args.seconds
    ok, failed, errors = [0], [0], []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = i
            while time.monotonic() < stop:
                try:
                    task, image = images[n % len(images)]
                    r = c.post(f"{args.url}/v1/classify", files={"image": ("x.png", image)}, data={"task": task})
                    good = r.status_code == 200
                    why = f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    good, why = False, f"{type(e).__name__}: {e}"
                with lock:
                    if good:
                        ok[0] += 1
                    else:
                        failed[0] += 1
                        errors.append(why)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    if args.started:  # tell the shell when the load runs (it kills a replica then)
        Path(args.started).touch()
    for t in threads:
        t.join()
    print(json.dumps({"ok": ok[0], "failed": failed[0], "first_errors": errors[:3]}))
    return 0 if failed[0] == 0 and ok[0] > 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-ready")
    w.add_argument("url")
    w.add_argument("--timeout", type=float, default=120)
    w.add_argument("--poll", type=float, default=0.1)
    w.add_argument("--expect-error", default=None, help="wait for a 503 whose body contains this text instead")
    c = sub.add_parser("classify")
    c.add_argument("url")
    c.add_argument("--examples", required=True)
    c.add_argument("--out", required=True)
    k = sub.add_parser("compare")
    k.add_argument("a")
    k.add_argument("b")
    k.add_argument("--tol", type=float, default=0.0)
    m = sub.add_parser("merge")
    m.add_argument("url")
    m.add_argument("--token", required=True)
    m.add_argument("--method", default="emr")
    m.add_argument("--timeout", type=float, default=600)
    v = sub.add_parser("converge")
    v.add_argument("version")
    v.add_argument("replicas", nargs="+")
    v.add_argument("--timeout", type=float, default=60)
    lo = sub.add_parser("load")
    lo.add_argument("url")
    lo.add_argument("--examples", required=True)
    lo.add_argument("--threads", type=int, default=4)
    lo.add_argument("--seconds", type=float, default=20)
    lo.add_argument("--started", default=None)
    args = p.parse_args()
    return {
        "wait-ready": wait_ready,
        "classify": classify,
        "compare": compare,
        "merge": merge,
        "converge": converge,
        "load": load,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
