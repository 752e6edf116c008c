"""CPU emulator for `mx.fast.metal_kernel` bodies (see driver.py)."""

from mlx_unified.testing.metal_emulator.driver import EmulatedKernel, EmulatorError, metal_kernel

__all__ = ["EmulatedKernel", "EmulatorError", "metal_kernel"]
