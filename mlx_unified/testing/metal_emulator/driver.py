"""Runs `mx.fast.metal_kernel` bodies on the CPU: the emulator's Python side.

`metal_kernel(...)` takes the same arguments as `mx.fast.metal_kernel` and returns a callable
with the same call signature.  A call writes the kernel source exactly as MLX would
(`signature.py`), rewrites threadgroup declarations into per-threadgroup allocations, appends a
C entry point, compiles it once with the system C++ compiler against the Metal subset in
`include/metal_stdlib` (shared objects are cached by content hash), and runs every threadgroup
with real threads (`include/mxemu_runtime.h`).  Outputs are poisoned (all-ones bytes: NaN for
floating types) unless `init_value` is given, so elements a kernel forgets to write show up.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_unified.testing.metal_emulator import signature

INCLUDE_DIR = Path(__file__).parent / "include"
COMPILE_FLAGS = ("-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-Wno-attributes")
MAX_THREADS_PER_THREADGROUP = 1024

# Metal features the shim does not provide: refuse them by name with a clear message rather than
# leave it to a compiler error deep in the generated file (or, worse, to a look-alike).
UNSUPPORTED_FEATURES: tuple[tuple[str, str], ...] = (
    (r"\bsimdgroup_(matrix|load|store|multiply|multiply_accumulate)\b", "simdgroup matrices"),
    (r"\bsimd_(prefix_\w+|ballot|all|any|active_threads_mask|shuffle_rotate_\w+|and|or|xor|product)\b",
     "this SIMD-group function"),
    (r"\bquad_\w+\s*\(", "quad-group functions"),
    (r"\batomic(_\w+)?\b", "atomics"),
    (r"\b(texture\w*|sampler)\b", "textures"),
    (r"\bimageblock\b", "imageblocks"),
)

_NUMPY_STORAGE: dict[mx.Dtype, type] = {
    mx.bool_: np.bool_,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits: numpy has no bfloat16
    mx.float32: np.float32,
}

_THREADGROUP_DECLARATION = re.compile(
    r"\bthreadgroup\s+(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>[A-Za-z_]\w*)\s*"
    r"(?P<dims>(?:\[[^\]]+\])*)\s*;"
)


class EmulatorError(RuntimeError):
    """A kernel the emulator cannot build or that failed while running."""


def cache_dir() -> Path:
    root = os.environ.get("MLX_UNIFIED_EMULATOR_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "mlx_unified" / "emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_supported(text: str) -> None:
    for pattern, feature in UNSUPPORTED_FEATURES:
        match = re.search(pattern, text)
        if match:
            raise NotImplementedError(f"emulator: {feature} (`{match.group(0)}`) are not emulated")


def rewrite_threadgroup_declarations(text: str) -> str:
    """`threadgroup T name[N];` -> a reference into the running threadgroup's memory."""
    counter = iter(range(1 << 30))

    def replace(match: re.Match) -> str:
        kind, name, dims = match.group("type").strip(), match.group("name"), match.group("dims")
        ident = next(counter)
        return (
            f"auto& {name} = *reinterpret_cast<{kind}(*){dims}>("
            f"::mxemu::threadgroup_alloc(sizeof({kind}{dims}), alignof({kind}), {ident}));"
        )

    return _THREADGROUP_DECLARATION.sub(replace, text)


def _entry_point(
    func_name: str,
    template: list,
    infos: list[signature.InputInfo],
    inputs: list[mx.array],
    n_outputs: int,
    output_dtypes: list,
    attributes: list[tuple[str, str]],
) -> str:
    """`extern "C" mxemu_launch(buffers, grid, group, error, size)` calling the kernel per thread."""
    args = []
    slot = 0
    for info, arr in zip(infos, inputs, strict=True):
        ctype = signature.type_string(arr.dtype)
        if arr.ndim == 0:
            args.append(f"*static_cast<const {ctype}*>(b[{slot}])")
        else:
            args.append(f"static_cast<const {ctype}*>(b[{slot}])")
        slot += 1
        if arr.ndim > 0:
            for used, kind in ((info.shape, "const int*"), (info.strides, "const int64_t*")):
                if used:
                    args.append(f"static_cast<{kind}>(b[{slot}])")
                    slot += 1
            if info.ndim:
                args.append(f"*static_cast<const int*>(b[{slot}])")
                slot += 1
    for dtype in output_dtypes[:n_outputs]:
        args.append(f"static_cast<{signature.type_string(dtype)}*>(b[{slot}])")
        slot += 1
    for attr, kind in attributes:
        args.append(_attribute_expression(attr, kind))
    instance = func_name + (signature.template_definition(template) if template else "")
    call = f"{instance}(\n      " + ",\n      ".join(args) + ")"
    return (
        '\nextern "C" int mxemu_launch(void** b, const unsigned* grid, const unsigned* group,\n'
        "                            char* error, int error_size) {\n"
        "  return ::mxemu::run_grid(grid, group, error, error_size, [&](const ::mxemu::Attrs& a) {\n"
        f"    {call};\n"
        "  });\n"
        "}\n"
    )


def _attribute_expression(attr: str, kind: str) -> str:
    direct = {
        "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
        "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
        "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
        "simdgroups_per_threadgroup", "thread_index_in_quadgroup", "quadgroup_index_in_threadgroup",
        "quadgroups_per_threadgroup",
    }
    # Every threadgroup is whole (the driver refuses non-uniform grids), so the dispatched sizes
    # equal the actual ones and the grid starts at zero.
    aliases = {
        "dispatch_threads_per_threadgroup": "a.threads_per_threadgroup",
        "dispatch_simdgroups_per_threadgroup": "a.simdgroups_per_threadgroup",
        "dispatch_quadgroups_per_threadgroup": "a.quadgroups_per_threadgroup",
        "grid_size": "a.threads_per_grid",
        "grid_origin": "::mxemu::Uint3{0, 0, 0}",
        "threads_per_simdgroup": "::mxemu::kSimdWidth",
        "thread_execution_width": "::mxemu::kSimdWidth",
    }
    expr = f"a.{attr}" if attr in direct else aliases[attr]
    return f"{kind}({expr})"


_build_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def _run_compiler(args: list[str], what: str, text: str = "") -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        numbered = "\n".join(f"{i + 1:4d}| {line}" for i, line in enumerate(text.splitlines()))
        raise EmulatorError(f"emulator: {what} failed to compile:\n{result.stderr}\n--- source ---\n{numbered}")


def _precompiled_include_dir(compiler: str, shim_key: str) -> Path:
    """A copy of the shim headers with `metal_stdlib` precompiled: halves every kernel's build."""
    target = cache_dir() / f"include-{shim_key}"
    if (target / "metal_stdlib.gch").exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        staged = Path(tmp) / "include"
        shutil.copytree(INCLUDE_DIR, staged)
        flags = [f for f in COMPILE_FLAGS if f != "-shared"]
        _run_compiler(
            [compiler, *flags, "-x", "c++-header", str(staged / "metal_stdlib"), "-o",
             str(staged / "metal_stdlib.gch")],
            "the metal_stdlib shim",
        )
        try:
            os.replace(staged, target)
        except OSError:  # another process published it first
            pass
    return target


def compile_source(text: str) -> ctypes.CDLL:
    """Compiles (or reuses) the shared object for one complete C++ translation unit."""
    compiler = os.environ.get("CXX", "g++")
    shim = b"".join(p.read_bytes() for p in sorted(INCLUDE_DIR.iterdir()))
    key = hashlib.sha256(
        text.encode() + shim + compiler.encode() + " ".join(COMPILE_FLAGS).encode()
    ).hexdigest()[:24]
    with _build_lock:
        if key in _loaded:
            return _loaded[key]
        target = cache_dir() / f"kernel-{key}.so"
        if not target.exists():
            if shutil.which(compiler) is None:
                raise EmulatorError(f"emulator: C++ compiler `{compiler}` not found (set CXX)")
            shim_key = hashlib.sha256(shim + compiler.encode() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
            include = _precompiled_include_dir(compiler, shim_key)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernel.cpp"
                src.write_text(text)
                out = Path(tmp) / "kernel.so"
                _run_compiler([compiler, *COMPILE_FLAGS, "-I", str(include), str(src), "-o", str(out)], "kernel", text)
                # Atomic publish: a concurrent process never loads a half-written object.
                staged = target.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(out, staged)
                os.replace(staged, target)
        library = ctypes.CDLL(str(target))
        library.mxemu_launch.restype = ctypes.c_int
        library.mxemu_launch.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        _loaded[key] = library
        return library


def to_numpy(arr: mx.array) -> np.ndarray:
    """Row-contiguous host copy with the array's exact bytes (bfloat16 as raw uint16)."""
    if arr.dtype not in _NUMPY_STORAGE:
        raise NotImplementedError(f"emulator: dtype {arr.dtype} is not supported")
    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return np.ascontiguousarray(np.array(arr))


def from_numpy(buffer: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(buffer)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def _output_buffer(shape: Sequence[int], dtype: mx.Dtype, init_value: float | None) -> np.ndarray:
    buffer = np.empty(tuple(shape), dtype=_NUMPY_STORAGE[dtype])
    if init_value is None:
        buffer.view(np.uint8)[...] = 0xFF
    else:
        buffer[...] = to_numpy(mx.full((), init_value, dtype=dtype))
    return buffer


class EmulatedKernel:
    """Callable with `mx.fast.metal_kernel`'s call signature, running on the CPU."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
    ) -> None:
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise NotImplementedError("emulator: atomic outputs are not emulated")
        check_supported(header + "\n" + source)
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        # Inputs always reach the kernel row-contiguous, with strides that say so; a body that
        # honours `_strides` reads the same values either way.
        self.ensure_row_contiguous = ensure_row_contiguous
        self.infos = signature.input_infos(self.input_names, source)
        self.attributes = signature.used_attributes(source)

    def metal_source(self, inputs: list[mx.array], output_dtypes: list, template: list) -> str:
        func_name = signature.kernel_name(self.name, template, inputs, output_dtypes)
        return signature.write_kernel_source(
            func_name, self.header, self.source, self.infos, inputs,
            self.output_names, output_dtypes, template, self.attributes,
        )

    def cpp_source(self, inputs: list[mx.array], output_dtypes: list, template: list) -> str:
        func_name = signature.kernel_name(self.name, template, inputs, output_dtypes)
        body = rewrite_threadgroup_declarations(self.metal_source(inputs, output_dtypes, template))
        entry = _entry_point(
            func_name, template, self.infos, inputs, len(self.output_names), output_dtypes, self.attributes
        )
        return "#include <metal_stdlib>\n" + body + entry

    def __call__(
        self,
        *,
        inputs: Sequence[mx.array],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[tuple[str, signature.TemplateValue]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: object | None = None,
    ) -> list[mx.array]:
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        template = list(template or [])
        output_dtypes = list(output_dtypes)
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)}")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError("[metal_kernel] output_shapes/output_dtypes do not match output_names")
        group = tuple(min(t, g) for t, g in zip(threadgroup, grid, strict=True))
        if any(g <= 0 for g in grid) or any(t <= 0 for t in group):
            raise ValueError(f"emulator: empty grid {grid} or threadgroup {threadgroup}")
        if group[0] * group[1] * group[2] > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"emulator: threadgroup {group} exceeds {MAX_THREADS_PER_THREADGROUP} threads")
        if any(g % t for g, t in zip(grid, group, strict=True)):
            raise NotImplementedError(
                f"emulator: non-uniform threadgroups (grid {grid} not a multiple of threadgroup {group})"
            )
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n"
                  f"{self.metal_source(inputs, output_dtypes, template)}\n```")
        library = compile_source(self.cpp_source(inputs, output_dtypes, template))

        keep_alive: list[np.ndarray] = []
        pointers: list[int] = []
        for info, arr in zip(self.infos, inputs, strict=True):
            host = to_numpy(arr)
            keep_alive.append(host)
            pointers.append(host.ctypes.data)
            if arr.ndim > 0:
                companions = []
                if info.shape:
                    companions.append(np.array(arr.shape, dtype=np.int32))
                if info.strides:
                    companions.append(np.array([s // host.itemsize for s in host.strides], dtype=np.int64))
                if info.ndim:
                    companions.append(np.array(arr.ndim, dtype=np.int32))
                for c in companions:
                    keep_alive.append(c)
                    pointers.append(c.ctypes.data)
        outputs = [_output_buffer(s, d, init_value) for s, d in zip(output_shapes, output_dtypes, strict=True)]
        pointers += [o.ctypes.data for o in outputs]

        buffers = (ctypes.c_void_p * max(1, len(pointers)))(*pointers)
        grid_c = (ctypes.c_uint * 3)(*grid)
        group_c = (ctypes.c_uint * 3)(*group)
        error = ctypes.create_string_buffer(4096)
        status = library.mxemu_launch(buffers, grid_c, group_c, error, len(error))
        if status != 0:
            raise EmulatorError(f"emulator: kernel `{self.name}` failed: {error.value.decode()}")
        return [from_numpy(o, d) for o, d in zip(outputs, output_dtypes, strict=True)]


# Drop-in for `mx.fast.metal_kernel` that runs on the CPU emulator: the class takes the same arguments.
metal_kernel = EmulatedKernel
