"""The kernel source MLX generates around a `mx.fast.metal_kernel` body, reproduced for the emulator.

This follows `write_signature`, `write_template` and the attribute list of MLX's
`mlx/backend/metal/custom_kernel` (the version shipped with mlx 0.32): the same header-first
layout, `[[kernel]]` signature, buffer order, `<name>_shape/_strides/_ndim` when the body mentions
them, thread attributes when the body mentions them, and the explicit template instantiation.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements than this are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# (attribute, Metal type) in the order MLX lists them.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

TYPE_STRINGS: dict[mx.Dtype, str] = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
}

TemplateValue = int | bool | mx.Dtype


def type_string(dtype: mx.Dtype) -> str:
    if dtype not in TYPE_STRINGS:
        raise NotImplementedError(f"emulator: dtype {dtype} is not supported")
    return TYPE_STRINGS[dtype]


@dataclass(frozen=True)
class InputInfo:
    """What of an input the body uses: its `_shape`, `_strides`, `_ndim` companions."""

    name: str
    shape: bool
    strides: bool
    ndim: bool


def input_infos(input_names: list[str], source: str) -> list[InputInfo]:
    return [
        InputInfo(n, f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    ]


def used_attributes(source: str) -> list[tuple[str, str]]:
    return [(name, kind) for name, kind in METAL_ATTRIBUTES if name in source]


def _template_literal(value: TemplateValue) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # std::ostream prints bools as 0/1
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def template_definition(template: list[tuple[str, TemplateValue]]) -> str:
    return "<" + ", ".join(_template_literal(v) for _, v in template) + ">"


def kernel_name(
    name: str, template: list[tuple[str, TemplateValue]], inputs: list[mx.array], output_dtypes: list
) -> str:
    full = "custom_kernel_" + name
    if template:
        definition = template_definition(template)
        full += "_" + definition.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for arr in inputs:
        full += "_" + type_string(arr.dtype)
        if arr.ndim == 0:
            full += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            full += "c"
    for dtype in output_dtypes:
        full += "_" + type_string(dtype)
    return full


def write_kernel_source(
    func_name: str,
    header: str,
    source: str,
    infos: list[InputInfo],
    inputs: list[mx.array],
    output_names: list[str],
    output_dtypes: list,
    template: list[tuple[str, TemplateValue]],
    attributes: list[tuple[str, str]],
) -> str:
    """The full Metal source of one kernel instance, as MLX writes it."""
    parts = [header]
    if template:
        kinds = []
        for name, value in template:
            if isinstance(value, bool):
                kinds.append(f"bool {name}")
            elif isinstance(value, int):
                kinds.append(f"int {name}")
            else:
                kinds.append(f"typename {name}")
        parts.append("template <" + ", ".join(kinds) + ">\n")
    parts.append(f"[[kernel]] void {func_name}(\n")
    index = 0
    for info, arr in zip(infos, inputs, strict=True):
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        parts.append(f"  const {location} {type_string(arr.dtype)}{ref} {info.name} [[buffer({index})]],\n")
        index += 1
        if arr.ndim > 0:
            if info.shape:
                parts.append(f"  const constant int* {info.name}_shape [[buffer({index})]],\n")
                index += 1
            if info.strides:
                parts.append(f"  const constant int64_t* {info.name}_strides [[buffer({index})]],\n")
                index += 1
            if info.ndim:
                parts.append(f"  const constant int& {info.name}_ndim [[buffer({index})]],\n")
                index += 1
    for name, dtype in zip(output_names, output_dtypes, strict=True):
        parts.append(f"  device {type_string(dtype)}* {name} [[buffer({index})]]")
        # MLX compares the running buffer index (shape buffers included) with the array count.
        if index < len(inputs) + len(output_names) - 1 or attributes:
            parts.append(",\n")
        else:
            parts.append(") {\n")
        index += 1
    for i, (attr, kind) in enumerate(attributes):
        parts.append(f"  {kind} {attr} [[{attr}]]")
        parts.append(",\n" if i < len(attributes) - 1 else ") {\n")
    parts.append(source)
    parts.append("\n}\n")
    text = "".join(parts)
    if template:
        instance = func_name + template_definition(template)
        text += f'\ntemplate [[host_name("{func_name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return text
