"""Convert the released checkpoint to the MLX layout mlx-vlm and mlx-lm load (their names, their
quantization section), optionally quantized, streaming tensor by tensor.

    python convert.py --hf-path google/gemma-4-12B-it --mlx-path gemma-4-12b-4bit -q
    python convert.py --hf-path SRC --mlx-path DST -q --quant-predicate mixed_4_6   # mlx-vlm's recipe
    python convert.py --hf-path DST --mlx-path back-to-bf16 --dequantize
    python convert.py --plan --memory 16GB

Flags follow mlx-vlm's and mlx-lm's `convert`, and the same flags write the same files as
`mlx_vlm.convert` (tensor for tensor). It prints what it quantized and refuses -q that would quantize
nothing. Memory stays bounded by one block of rows
(`safetensors_stream.BLOCK_BYTES`), whatever the model size. The steps, one module each:
`planning` (check the source, lay out the output shards), `recipes` (which module gets which bits),
`conversion` (stream the blocks into the shards), `safetensors_stream` (tensors read a slice at a
time; the format itself, checked, is `mlx_unified.safetensors_format`), `estimate` (memory a converted model needs, the `--plan` table) and `command` (the flags).
The converter reads weight names and shapes from `mlx_unified.checkpoint`; it never builds the model.
"""

from mlx_unified.convert.command import main
from mlx_unified.convert.conversion import convert
from mlx_unified.convert.planning import ConvertError

__all__ = ["ConvertError", "convert", "main"]
