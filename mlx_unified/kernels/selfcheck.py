"""Proves every kernel against its pure-MLX reference in seconds.

    python -m mlx_unified.kernels.selfcheck            # on Metal (a Mac)
    python -m mlx_unified.kernels.selfcheck --emulate  # on the CPU emulator (needs a C++ compiler)

Last line: `N kernels ok`; exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx

from mlx_unified.kernels.cases import all_cases, check
from mlx_unified.kernels.dispatch import KernelFactory


def run_selfcheck(factory: KernelFactory, out=sys.stdout) -> int:
    """Checks all cases; prints one line per case and the summary; returns the failure count."""
    failed: set[str] = set()
    kernels: list[str] = []
    for case in all_cases():
        if case.kernel_name not in kernels:
            kernels.append(case.kernel_name)
        start = time.perf_counter()
        try:
            error = check(case, factory)
            status = f"ok    rel.err {error:.2e}"
        except Exception as exc:  # report every failure, not just the first
            failed.add(case.kernel_name)
            status = f"FAIL  {str(exc).splitlines()[0][:200]}"
        elapsed = time.perf_counter() - start
        print(f"{case.kernel_name:34s} {str(case.dtype).split('.')[-1]:9s} {case.label:60s} "
              f"{status} ({elapsed:.2f}s)", file=out, flush=True)
    if failed:
        print(f"{len(failed)} of {len(kernels)} kernels FAILED: {', '.join(sorted(failed))}", file=out)
    else:
        print(f"{len(kernels)} kernels ok", file=out)
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulate", action="store_true", help="run the kernels on the CPU emulator")
    args = parser.parse_args(argv)
    if args.emulate:
        from mlx_unified.testing.metal_emulator import metal_kernel

        factory: KernelFactory = metal_kernel
    elif mx.metal.is_available():
        factory = mx.fast.metal_kernel
    else:
        print("Metal is not available here; use --emulate to check the kernels on the CPU emulator")
        return 2
    return 1 if run_selfcheck(factory) else 0


if __name__ == "__main__":
    sys.exit(main())
