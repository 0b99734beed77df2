"""How fast host memory is page-locked for the GPU, and what that costs the GPU meanwhile (GPU).

    python benchmarks/pin_probe.py [--gib 4] [--out benchmarks/results/pin_probe.json]

A shared-memory segment (a file in /dev/shm, as the node cache makes them) is mapped three
ways: plain, MAP_POPULATE (its pages faulted in by mmap, a CPU-side cost) and with
MADV_HUGEPAGE; each is registered with cudaHostRegister (the replica's page-lock), timed,
registered again, and copied to and from the GPU. Then cudaHostAlloc of the same size, and
a loop of bf16 GEMMs on this thread while another thread registers a plain mapping (does
page-locking stall the process's GPU work?). Writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import mmap
import os
import threading
import time
from pathlib import Path

import torch

from benchmarks.decode_speed import finish


def register(ptr: int, num_bytes: int) -> float:
    start = time.perf_counter()
    err = torch.cuda.cudart().cudaHostRegister(ptr, num_bytes, 0)
    torch.cuda.synchronize()
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    return time.perf_counter() - start


def segment(num_bytes: int, variant: str):
    path = f"/dev/shm/pin_probe_{variant}_{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, num_bytes)
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if variant == "populate" else 0)
    start = time.perf_counter()
    m = mmap.mmap(fd, num_bytes, flags=flags)
    mapped_s = time.perf_counter() - start
    if variant == "hugepage":
        m.madvise(mmap.MADV_HUGEPAGE)
    os.close(fd)
    os.unlink(path)  # the mapping keeps it
    return m, mapped_s


def probe(num_bytes: int, variant: str) -> dict:
    m, mapped_s = segment(num_bytes, variant)
    host = torch.frombuffer(m, dtype=torch.uint8)
    first = register(host.data_ptr(), num_bytes)
    dev = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = time.perf_counter() - start
    start = time.perf_counter()
    host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    d2h = time.perf_counter() - start
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    again = register(host.data_ptr(), num_bytes)
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    del host, dev
    m.close()
    torch.cuda.empty_cache()
    gb = num_bytes / 1e9
    return {"mmap_s": mapped_s, "register_GBps": gb / first, "register_again_GBps": gb / again,
            "h2d_GBps": gb / h2d, "d2h_GBps": gb / d2h}


def gemm_ms(a: torch.Tensor, reps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def stall(num_bytes: int) -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms(a, 5)
    alone = gemm_ms(a, 50)
    m, _ = segment(num_bytes, "plain")
    host = torch.frombuffer(m, dtype=torch.uint8)
    locker = threading.Thread(target=register, args=(host.data_ptr(), num_bytes))
    start = time.perf_counter()
    locker.start()
    during = []
    while locker.is_alive():
        during.append(gemm_ms(a, 5))
    locker.join()
    out = {"gemm_ms_alone": alone, "gemm_ms_while_registering": during, "register_s": time.perf_counter() - start}
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    del host
    m.close()
    return out


def summarise(report: dict) -> None:
    print(f"{report['gpu']}, {report['gib']} GiB")
    for v in ("plain", "populate", "hugepage"):
        r = report[v]
        print(f"  {v:9s} mmap {r['mmap_s']:.2f} s, register {r['register_GBps']:.1f} GB/s (again "
              f"{r['register_again_GBps']:.1f}), H2D {r['h2d_GBps']:.0f} GB/s, D2H {r['d2h_GBps']:.0f} GB/s")
    s = report["stall"]
    print(f"  cudaHostAlloc {report['cudaHostAlloc_GBps']:.1f} GB/s; a {s['gemm_ms_alone']:.2f} ms GEMM took "
          f"{max(s['gemm_ms_while_registering']):.0f} ms while another thread registered ({s['register_s']:.1f} s)")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = ["plain", "populate", "hugepage"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(variants, [report[v]["register_GBps"] for v in variants], label="first register")
    ax.plot(variants, [report[v]["register_again_GBps"] for v in variants], "ko", label="register again")
    ax.set(ylabel="GB/s", title=f"{report['gpu']}: cudaHostRegister of {report['gib']} GiB of /dev/shm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pin_probe.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pin_probe.py needs a CUDA GPU")
    num_bytes = args.gib << 30
    report = {"gpu": torch.cuda.get_device_name(), "gib": args.gib}
    for variant in ("plain", "populate", "hugepage"):
        report[variant] = probe(num_bytes, variant)
    start = time.perf_counter()
    pinned = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    report["cudaHostAlloc_GBps"] = num_bytes / 1e9 / (time.perf_counter() - start)
    del pinned
    report["stall"] = stall(num_bytes)
    finish(report, args.out, summarise, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
