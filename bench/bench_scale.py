"""Galleries at scale, both back-ends side by side in one run, through the real HTTP API of live
uvicorn processes: the embedded store (SQLite + FAISS in the api process) and Milvus (catalog in
a private PostgreSQL started for the run), on real embeddings.

Data: the 60,000 CIFAR-10 images of ../shared/data/cifar10-jpeg.tar.gz and their horizontal
flips (120,000 images), embedded by models/default and cached in --cache (an .npz: the first
run embeds for a few minutes, later runs load it in a second). The gallery is the first --n of
them (originals first, then flips); the queries are --queries of the remaining flips, real
images that are not in the gallery. Recall@10 is measured against exact cosine neighbours in
the gallery (numpy). Random vectors would make recall meaningless (see PITFALLS.md).

Per back-end: batched adds (POST /indexes/{name}/vectors, --batch items each: the restore
route, vectors and pixels without embedding, so the model's speed is not what is timed) and
one-item adds (the same route), p50/p99; search p50/p99 at k=10 (one query per POST /search,
embeddings, default ef/nprobe) and recall@10; searches per second at --conns concurrent
keep-alive connections through one uvicorn vs split over two uvicorn replicas on the same
PostgreSQL + Milvus (embedded: one api process per data directory, so no second replica); for
Milvus, whether an add through one replica is found at once by a search on the other with
"consistency": "strong", and how long the default (bounded) takes to see it.

Then the embedded path's own scale, in-process (the storage layer, no HTTP): per factory the
time to build the gallery, to open it again (a restarted api: HNSW rebuilds its graph, IVF
re-adds its vectors), search p50/p99 at k=10 and recall@10.

    python bench/bench_scale.py                        # 100k items, both back-ends
    python bench/bench_scale.py --n 20000 --backends embedded

Milvus: --milvus-uri (default BYORL_MILVUS_URI or http://127.0.0.1:19530) must be running; the
run uses collections of its own prefix and deletes them. When nothing listens there, the run
starts a Milvus server of its own (`pip install milvus==2.3.5`) and stops it at the end: only
one fits a machine (fixed ports), so a running one is used, never a second started.
"""

import argparse
import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.live import (  # noqa: E402  (the test suite's process helpers)
    free_port,
    kill_group,
    start_milvus,
    start_postgres,
    start_process,
    uvicorn_argv,
    wait_ready,
)

ARCHIVE = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = Path(tempfile.gettempdir()) / "byorl-bench-scale" / "cifar10-flips-models-default.npz"
K = 10


def real_embeddings(cache: Path, model: Path, archive: Path) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, uint8 pixels) of the 60k CIFAR-10 images, then of their horizontal flips
    (120k), embedded by `model`; cached in `cache`."""
    if cache.exists():
        d = np.load(cache)
        return d["vectors"], d["pixels"]
    from byorl.model_dir import embed, load_onnx_session
    from byorl.training.data import load_images

    pixels = np.concatenate([load_images(str(archive), s).images.numpy()
                             for s in ("train", "test")])
    pixels = np.ascontiguousarray(np.concatenate([pixels, pixels[..., ::-1]]))
    start = time.perf_counter()
    x = embed(load_onnx_session(model, device="cpu"), pixels)
    print(f"embedded {len(x)} images in {time.perf_counter() - start:.0f} s", flush=True)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, vectors=x, pixels=pixels)
    return x, pixels


def exact_top(queries: np.ndarray, gallery: np.ndarray, k: int = K) -> np.ndarray:
    scores = queries @ gallery.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)


def recall(found: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e.tolist())) / K
                          for f, e in zip(found, exact, strict=True)]))


def pct(ms: list[float] | np.ndarray) -> str:
    return f"{np.percentile(ms, 50):.1f} / {np.percentile(ms, 99):.1f}"


class Api:
    """A keep-alive HTTP/1.1 connection to one replica (http.client: cheap on the client's
    side, which shares the cores with the servers)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.con = http.client.HTTPConnection(host, int(port), timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        try:
            self.con.request(method, path, body, {"Content-Type": "application/json"})
            r = self.con.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.con.close()  # the server closed an idle keep-alive connection: once more
            self.con.request(method, path, body, {"Content-Type": "application/json"})
            r = self.con.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else {})

    def ok(self, method: str, path: str, body=None) -> dict:
        status, out = self.call(method, path, json.dumps(body).encode() if body else None)
        assert status < 300, (status, out)
        return out


def vectors_body(keys, vectors, pixels, model_id, sha) -> bytes:
    return json.dumps({"keys": keys, "model_id": model_id, "onnx_sha256": sha,
                       "vectors": base64.b64encode(vectors.astype("<f4").tobytes()).decode(),
                       "pixels": base64.b64encode(pixels.tobytes()).decode()}).encode()


def search_body(name: str, q: np.ndarray, k: int = K, **extra) -> bytes:
    return json.dumps({"index": name, "embeddings": [q.tolist()], "k": k, **extra}).encode()


def keys_of(answer: dict) -> list[str]:
    return [h["key"] for h in answer["results"][0]]


def cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def milvus_pid(uri: str) -> str | None:
    """The pid listening on the Milvus port (ss), to account for its CPU."""
    port = uri.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                         text=True).stdout
    match = re.search(r"pid=(\d+)", out)
    return match[1] if match else None


def throughput(urls: list[str], bodies: list[bytes], conns: int, seconds: float,
               pids: dict[str, int | str] | None = None) -> float:
    """Searches per second at `conns` keep-alive connections spread over `urls`; with `pids`
    (name -> pid), prints the cores each used meanwhile (and the client's, the machine's)."""
    done, stop, errors = [0] * conns, threading.Event(), []

    def client(i: int):
        api = Api(urls[i % len(urls)])
        j = i
        try:
            while not stop.is_set():
                api.con.request("POST", "/search", bodies[j % len(bodies)],
                                {"Content-Type": "application/json"})
                r = api.con.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
                done[i] += 1
                j += conns
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    time.sleep(1)  # warm
    pids = {"client": "self", **(pids or {})}
    cpu = {name: cpu_s(pid) for name, pid in pids.items()}
    busy = machine_busy()
    before, start = sum(done), time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - start
    rate = (sum(done) - before) / wall
    used = {name: (cpu_s(pid) - cpu[name]) / wall for name, pid in pids.items()}
    after = machine_busy()
    used["machine"] = (after[0] - busy[0]) / (after[1] - busy[1]) * os.cpu_count()
    print("    cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in used.items())
          + f" of {os.cpu_count()}", flush=True)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return rate


class Stack:
    def __init__(self, tmp: Path, model: Path, settings: dict[str, str]):
        self.tmp, self.procs = tmp, []
        self.env = {**os.environ, "BYORL_MODEL_DIR": str(model.resolve()),
                    "BYORL_DATA_DIR": str(tmp / "data"), "BYORL_REDIS_URL": "",
                    "BYORL_THREADS": "1", "OMP_NUM_THREADS": "1",
                    **{f"BYORL_{k.upper()}": v for k, v in settings.items()}}

    def replica(self) -> str:
        port = free_port()
        self.procs.append(start_process(uvicorn_argv(port), self.env,
                                        self.tmp / f"api-{len(self.procs)}.log", self.tmp))
        wait_ready(url := f"http://127.0.0.1:{port}")
        return url

    def stop(self) -> None:
        for p in self.procs:
            kill_group(p, 15)
        self.procs = []


def port_open(uri: str) -> bool:
    host, port = uri.split("://")[-1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def wait_milvus_indexed(settings: dict[str, str], name: str, n: int) -> float:
    """Flush the gallery's collection and wait until its index covers n rows (Milvus searches
    growing segments by brute force): the seconds it took."""
    from byorl.service.settings import Settings
    from byorl.service.storage.milvus_galleries import MilvusGalleries

    start = time.perf_counter()
    g = MilvusGalleries(Settings(data_dir=Path(tempfile.mkdtemp()), **settings))
    try:
        collection = g.get(name).collection
        g.client.flush(collection)
        while int(g.client.describe_index(collection, "vector").get("indexed_rows", 0)) < n:
            time.sleep(1)
    finally:
        g.close()
    return time.perf_counter() - start


def consistency(a: Api, b: Api, name: str, fresh: np.ndarray, pixels: np.ndarray, model_id,
                sha, rounds: int) -> dict:
    """Adds through replica a, searches for each new item through replica b: with strong
    consistency at once (found / rounds, ms), with the default by polling (seconds until
    found)."""
    strong, strong_ms, delays = 0, [], []
    for i in range(2 * rounds):
        key = f"c-{uuid.uuid4().hex[:8]}"
        status, out = a.call("POST", f"/indexes/{name}/vectors",
                             vectors_body([key], fresh[i:i + 1], pixels[i:i + 1], model_id, sha))
        assert status == 201, out
        start = time.perf_counter()
        if i < rounds:
            status, out = b.call("POST", "/search", search_body(name, fresh[i], 1,
                                                                consistency="strong"))
            strong_ms.append(1e3 * (time.perf_counter() - start))
            strong += keys_of(out) == [key]
            continue
        while True:
            status, out = b.call("POST", "/search", search_body(name, fresh[i], 1))
            if keys_of(out) == [key]:
                delays.append(time.perf_counter() - start)
                break
            if time.perf_counter() - start > 60:
                delays.append(float("inf"))
                break
            time.sleep(0.02)
    return {"strong": strong, "rounds": rounds, "strong_ms": strong_ms, "delays": delays}


def bench_backend(backend: str, args, vectors, pixels, queries, exact) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"byorl-scale-{backend}-"))
    settings: dict[str, str] = {}
    pg = None
    if backend == "milvus":
        db_url, pg, _ = start_postgres(tmp / "postgres.log")
        settings = {"milvus_uri": args.milvus_uri, "database_url": db_url,
                    "milvus_prefix": f"scale{uuid.uuid4().hex[:8]}_"}
    stack = Stack(tmp, args.model, settings)
    out: dict = {"backend": backend}
    try:
        url = stack.replica()
        a = Api(url)
        name = "scale"
        model_id = a.ok("POST", "/indexes", {"name": name, "factory": args.factory})["model_id"]
        sha = json.loads((args.model / "card.json").read_text())["onnx_sha256"]
        n = len(vectors)
        batch_ms, start = [], time.perf_counter()
        for s in range(0, n, args.batch):
            body = vectors_body([f"i{j}" for j in range(s, min(n, s + args.batch))],
                                vectors[s:s + args.batch], pixels[s:s + args.batch], model_id, sha)
            t = time.perf_counter()
            status, answer = a.call("POST", f"/indexes/{name}/vectors", body)
            assert status == 201, answer
            batch_ms.append(1e3 * (time.perf_counter() - t))
        out["load_s"] = time.perf_counter() - start
        out["batch_ms"] = batch_ms
        print(f"{backend}: {n} items loaded in {out['load_s']:.0f} s", flush=True)
        if backend == "milvus":
            out["index_s"] = wait_milvus_indexed(settings, name, n)
            print(f"  indexed after {out['index_s']:.0f} s more", flush=True)
        bodies = [search_body(name, q) for q in queries]
        for body in bodies[:10]:  # warm
            a.call("POST", "/search", body)
        search_ms, found = [], []
        for body in bodies:
            t = time.perf_counter()
            status, answer = a.call("POST", "/search", body)
            search_ms.append(1e3 * (time.perf_counter() - t))
            assert status == 200, answer
            found.append([int(k[1:]) for k in keys_of(answer)])
        out["search_ms"], out["recall"] = search_ms, recall(found, exact)
        print(f"  search {pct(search_ms)} ms, recall@10 {out['recall']:.3f}", flush=True)
        pids = {"api1": stack.procs[0].pid}
        if backend == "milvus" and (server_pid := milvus_pid(args.milvus_uri)):
            pids["milvus"] = server_pid
        out["qps1"] = throughput([url], bodies, args.conns, args.seconds, pids)
        print(f"  {out['qps1']:.0f} searches/s through one replica", flush=True)
        fresh = np.random.default_rng(1).standard_normal((args.single + 40, vectors.shape[1]))
        fresh = (fresh / np.linalg.norm(fresh, axis=1, keepdims=True)).astype(np.float32)
        one_pixels = pixels[: len(fresh)]
        if backend == "milvus":
            url2 = stack.replica()
            pids["api2"] = stack.procs[1].pid
            out["qps2"] = throughput([url, url2], bodies, args.conns, args.seconds, pids)
            out["qps1_again"] = throughput([url], bodies, args.conns, args.seconds, pids)
            print(f"  {out['qps2']:.0f} searches/s over two replicas "
                  f"(one again: {out['qps1_again']:.0f})", flush=True)
            out["consistency"] = consistency(a, Api(url2), name, fresh[args.single:],
                                             one_pixels[args.single:], model_id, sha,
                                             args.rounds)
            print(f"  consistency {out['consistency']}", flush=True)
        single_ms = []
        for i in range(args.single):
            body = vectors_body([f"s{i}"], fresh[i:i + 1], one_pixels[i:i + 1], model_id, sha)
            t = time.perf_counter()
            status, answer = a.call("POST", f"/indexes/{name}/vectors", body)
            single_ms.append(1e3 * (time.perf_counter() - t))
            assert status == 201, answer
        out["single_ms"] = single_ms
        a.call("DELETE", f"/indexes/{name}")
    finally:
        stack.stop()
        if pg is not None:
            kill_group(pg, 15)
    return out


def bench_embedded_storage(factory: str, vectors, pixels, queries, exact) -> dict:
    """The embedded store in-process: build, close, reopen (as a restarted api), search."""
    from byorl.service.storage.galleries import Galleries

    root = Path(tempfile.mkdtemp(prefix="byorl-scale-store-"))
    g = Galleries(root)
    g.create("g", vectors.shape[1], "m", factory)
    start, bounds = time.perf_counter(), [0, *range(50_000, len(vectors), 10_000), len(vectors)]
    for s, e in zip(bounds, bounds[1:], strict=False):  # the first 50k train IVF types
        g.add("g", [f"i{j}" for j in range(s, e)], vectors[s:e], pixels[np.arange(s, e)
                                                                         % len(pixels)], None, "m")
    build = time.perf_counter() - start
    g.close()
    start = time.perf_counter()
    g = Galleries(root)
    opened = time.perf_counter() - start
    index = g.get("g")
    ms, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q[None], K)[0]
        ms.append(1e3 * (time.perf_counter() - t))
        found.append([int(h.key[1:]) for h in hits])
    g.close()
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return {"factory": factory, "build_s": build, "open_s": opened, "search_ms": ms,
            "recall": recall(found, exact)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="gallery items (at most 119,000)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=1000, help="items per batched add")
    p.add_argument("--single", type=int, default=100, help="timed one-item adds")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15, help="per throughput measurement")
    p.add_argument("--rounds", type=int, default=5, help="consistency probes of each kind")
    p.add_argument("--factory", default="HNSW16", help="the galleries' index (Milvus default)")
    p.add_argument("--backends", nargs="*", default=["embedded", "milvus"])
    p.add_argument("--store-factories", nargs="*", default=["Flat", "HNSW16", "IVF256,Flat"],
                   help="embedded store in-process: build, reopen, search")
    p.add_argument("--store-n", type=int, default=0,
                   help="items of the in-process embedded store (default --n): beyond the real "
                        "embeddings, jittered copies of them (noise of norm 0.1, renormalised)")
    p.add_argument("--milvus-uri", default=os.environ.get("BYORL_MILVUS_URI",
                                                          "http://127.0.0.1:19530"))
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--archive", type=Path, default=ARCHIVE)
    p.add_argument("--cache", type=Path, default=CACHE)
    args = p.parse_args()
    pool, pool_pixels = real_embeddings(args.cache, args.model, args.archive)
    assert args.n + args.queries <= len(pool), f"at most {len(pool) - args.queries} items"
    vectors, pixels = pool[:args.n], pool_pixels[:args.n]
    pick = np.random.default_rng(0).choice(np.arange(args.n, len(pool)), args.queries, False)
    queries, exact = pool[pick], exact_top(pool[pick], vectors)
    print(f"{args.n} gallery items, {args.queries} held-out queries (flips), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    server = None
    if "milvus" in args.backends and not port_open(args.milvus_uri):
        # none running: start one for this run (one per machine: fixed ports)
        args.milvus_uri, server = start_milvus(Path(tempfile.mkdtemp(prefix="byorl-milvus-")))
        print(f"started a Milvus server at {args.milvus_uri}", flush=True)
    try:
        results = [bench_backend(b, args, vectors, pixels, queries, exact)
                   for b in args.backends]
    finally:
        if server is not None:
            server.stop()
    store, store_n = [], args.store_n or args.n
    if store_n > args.n:  # the real embeddings, then jittered copies of them (see --store-n)
        rng = np.random.default_rng(2)
        extra = vectors[rng.integers(0, args.n, store_n - args.n)]
        extra += rng.normal(0, 0.1 / np.sqrt(vectors.shape[1]), extra.shape).astype(np.float32)
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
        vectors = np.concatenate([vectors, extra])
        del extra
        exact = exact_top(queries, vectors)
    for factory in args.store_factories:
        store.append(bench_embedded_storage(factory, vectors, pixels, queries, exact))
        r = store[-1]
        print(f"store {factory}: build {r['build_s']:.1f} s, open {r['open_s']:.2f} s, "
              f"search {pct(r['search_ms'])} ms, recall {r['recall']:.3f}", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    if results:
        print(f"| {args.n:,} items, {args.factory}, real embeddings | "
              + " | ".join(r["backend"] for r in results) + " |")
        print("|---|" + "---|" * len(results))
        rows = [
            (f"batched add ({args.batch} items) p50 / p99 ms", lambda r: pct(r["batch_ms"])),
            ("bulk load (s)", lambda r: f"{r['load_s']:.0f}" + (
                f" + {r['index_s']:.0f} indexing" if "index_s" in r else "")),
            ("one-item add p50 / p99 ms", lambda r: pct(r["single_ms"])),
            ("search k=10 p50 / p99 ms (one client)", lambda r: pct(r["search_ms"])),
            ("recall@10 vs exact", lambda r: f"{r['recall']:.3f}"),
            (f"searches/s, {args.conns} connections, 1 replica", lambda r: f"{r['qps1']:.0f}"),
            (f"searches/s, {args.conns} connections, 2 replicas", lambda r: (
                f"{r['qps2']:.0f} ({r['qps2'] / r['qps1_again']:.2f}x; 1 replica again: "
                f"{r['qps1_again']:.0f})") if "qps2" in r else "n/a: one api process per data dir"),
            ("add on replica 1, strong search on replica 2", lambda r: (
                f"found {r['consistency']['strong']}/{r['consistency']['rounds']}, "
                f"{pct(r['consistency']['strong_ms'])} ms") if "consistency" in r
                else "n/a (one process: found at once)"),
            ("same, default (bounded): seen after (s)", lambda r: (
                ", ".join(f"{d:.2f}" for d in r["consistency"]["delays"])) if "consistency" in r
                else "n/a"),
        ]
        for label, cell in rows:
            print(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    if store:
        print(f"\n| embedded store, {store_n:,} items (in-process) | build (s) | open (s) | "
              "search p50 / p99 ms | recall@10 |")
        print("|---|---|---|---|---|")
        for r in store:
            print(f"| {r['factory']} | {r['build_s']:.1f} | {r['open_s']:.2f} | "
                  f"{pct(r['search_ms'])} | {r['recall']:.3f} |")


if __name__ == "__main__":
    main()
