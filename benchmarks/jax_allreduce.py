"""What an all-reduce on every micro-batch costs under `keras.distribution`.

Usage:

    python benchmarks/jax_allreduce.py [--quick] [--devices N] [--markdown]

Under `keras.distribution.DataParallel` on JAX, XLA all-reduces the
gradient of every replicated weight inside Keras's backward pass, on every
micro-batch (README, "Distributed training"); per-device partial sums would
need only one all-reduce per update. On N devices (forced CPU devices
without accelerators: `XLA_FLAGS=--xla_force_host_platform_device_count=N`,
set here before JAX starts), for gradients of 1M to 16M float32
parameters, this times, interleaved over rounds, two jitted functions of
a gradient sharded like Keras's: the all-reduce of the gradient
(`jax.lax.psum` in `shard_map`), and the local accumulation `s = s + g`
that per-device sums would do instead, and reports their ratio. On forced
CPU devices the all-reduce moves memory only; across accelerators or hosts
each all-reduce also crosses the interconnect (a ring all-reduce sends
2(N-1)/N of the gradient's bytes per device), so the ratio here is a lower
bound. Prints `benchmark: ok` last; timings are never asserted.
"""

import argparse
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/jax_allreduce.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}"
    )
    # XLA's CPU thread pool has max(cores, devices) threads and a waiting
    # collective holds one: more threads, so that forced devices sharing few
    # cores cannot all wait (docs/distributed.md, "Forced CPU devices").
    os.environ.setdefault("PJRT_NPROC", str(4 * args.devices))
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    devices = jax.devices()[: args.devices]
    mesh = Mesh(np.array(devices), ("batch",))
    per_device = NamedSharding(mesh, PartitionSpec("batch"))
    sizes = (65_536,) if args.quick else (1_048_576, 4_194_304, 16_777_216)
    rounds = 2 if args.quick else 15
    calls = 2 if args.quick else 10

    def all_reduce(partials):
        # Each device holds its own partial gradient (one row of the
        # leading device axis); the result is their sum on every device.
        return jax.shard_map(
            lambda p: jax.lax.psum(p, "batch"),
            mesh=mesh,
            in_specs=PartitionSpec("batch"),
            out_specs=PartitionSpec("batch"),
        )(partials)

    def accumulate(sums, partials):
        return sums + partials

    print("# The cost of an all-reduce per micro-batch (JAX)")
    print()
    print(
        "command: "
        + shlex.join(["python", "benchmarks/jax_allreduce.py", *argv])
    )
    print(
        f"devices: {len(devices)} x {devices[0].platform} "
        f"(JAX {jax.__version__}); {rounds} interleaved rounds of {calls} "
        "calls, median per call"
    )
    print()
    rows = []
    for size in sizes:
        partials = jax.device_put(
            np.ones((len(devices), size), "float32"), per_device
        )
        sums = jax.device_put(
            np.zeros((len(devices), size), "float32"), per_device
        )
        reduce_fn = jax.jit(all_reduce)
        accumulate_fn = jax.jit(accumulate, donate_argnums=0)
        out = reduce_fn(partials)
        assert float(out[0, 0]) == len(devices)
        sums = accumulate_fn(sums, partials)
        times = {"all-reduce": [], "local sum": []}
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                out = reduce_fn(partials)
            out.block_until_ready()
            times["all-reduce"].append((time.perf_counter() - start) / calls)
            start = time.perf_counter()
            for _ in range(calls):
                sums = accumulate_fn(sums, partials)
            sums.block_until_ready()
            times["local sum"].append((time.perf_counter() - start) / calls)
        ratios = [
            a / b for a, b in zip(times["all-reduce"], times["local sum"])
        ]
        rows.append(
            [
                f"{size / 2**20:g}M",
                f"{statistics.median(times['all-reduce']) * 1e3:.2f}",
                f"{statistics.median(times['local sum']) * 1e3:.2f}",
                f"{statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f})",
            ]
        )
    print(
        report.format_table(
            [
                "parameters",
                "all-reduce ms",
                "local s + g ms",
                "ratio (min-max)",
            ],
            rows,
            args.markdown,
        )
    )
    print()
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
