"""Quantized weights in a safetensors checkpoint, found from headers (no torch).

Two layouts, as the tools that make them save them:

- bitsandbytes 4-bit (transformers + bitsandbytes `save_pretrained`): `X.weight` is U8, two
  4-bit codes per byte, and beside it `X.weight.absmax` (one scale per block of `blocksize`
  values), `X.weight.quant_map` (the 16 code values), and a small U8 tensor
  `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) holding JSON: quant_type, blocksize,
  dtype, shape. With double quant, absmax is itself U8, quantized in blocks of
  `nested_blocksize` with `X.weight.nested_absmax`, `X.weight.nested_quant_map` and a float
  `nested_offset`.
- block-scaled FP8 (DeepSeek-V3, Qwen3-FP8, transformers' fine-grained FP8): `X.weight` is
  F8_E4M3 and `X.weight_scale_inv` (F32) holds one scale per block of the weight
  (config.json `quantization_config.weight_block_size`, 128x128 by default).
- MXFP4 (gpt-oss experts, transformers' `quant_method: mxfp4`): the parameter `X` (E, in, out) is
  not stored; `X_blocks` U8 (E, out, in/32, 16) holds its e2m1 codes, 32 per block, two per byte,
  and `X_scales` U8 (E, out, in/32) one power-of-two exponent (bias 127) per block
  (ops/dequant_mxfp4.py decodes them).

`find_quantized` maps each quantized weight's name to a `QuantizedWeight` that says how to
read it (ops/dequant.py does the arithmetic) and which tensors belong to it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..errors import FormatError, UnsupportedError
from .json_text import parse_json
from .safetensors_header import Header, TensorInfo
from .tensors import SafetensorsStore, raw_values

BNB_STATE = ".quant_state.bitsandbytes__"
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BNB_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
FP8_SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv
FP8_DEFAULT_BLOCK = (128, 128)
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"  # X -> X_blocks, X_scales
MXFP4_BLOCK = 32  # values per scale: 16 bytes
MAX_STATE_BYTES = 1 << 16  # a quant state is ~200 bytes of JSON


@dataclass(frozen=True)
class QuantizedWeight:
    name: str  # the weight's name, e.g. model.layers.0.mlp.down_proj.weight
    scheme: str  # "nf4", "fp4", "fp8" or "mxfp4"
    shape: tuple[int, ...]  # the dequantized shape
    dtype: str  # the dtype the dequantized values are given in (bnb: its quant state's; FP8, MXFP4: BF16)
    block: tuple[int, ...]  # bnb: (blocksize,) over the flattened weight; FP8: (rows, cols); MXFP4: (32,)
    parts: dict[str, str] = field(default_factory=dict)  # role -> tensor name (besides `name`)
    # MXFP4: "blocks" holds the codes, and `name` itself is not stored (the model's parameter name)
    nested_blocksize: int = 0  # bnb double quant: absmax block size (0: no double quant)
    nested_offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_blocksize > 0

    @property
    def stored(self) -> str:
        """The stored tensor that holds the codes (the weight's own name but for MXFP4)."""
        return self.parts.get("blocks", self.name)

    def describe(self) -> str:
        if self.scheme == "mxfp4":
            return "mxfp4 e2m1, 32-value blocks with power-of-two scales"
        if self.scheme == "fp8":
            return f"fp8 e4m3, {self.block[0]}x{self.block[1]} block scales"
        return f"{self.scheme}, {'double quant, ' if self.nested else ''}blocksize {self.block[0]}"


def find_quantized(headers: dict[str, Header], weight_map: dict[str, str], config: dict | None,
                   path_of) -> dict[str, QuantizedWeight]:
    """Every quantized weight of a checkpoint. headers: shard -> header; path_of(shard) -> file.
    Raises FormatError for a quant state that does not describe its tensors."""
    found: dict[str, QuantizedWeight] = {}
    for name, shard in weight_map.items():
        info = headers[shard].tensors[name]
        if BNB_STATE in name:
            weight = _bnb_weight(name, info, headers, weight_map, path_of)
            found[weight.name] = weight
        elif name.endswith(".weight" + FP8_SCALE):
            weight = _fp8_weight(name[: -len(FP8_SCALE)], headers, weight_map, config, path_of)
            if weight is not None:
                found[weight.name] = weight
        elif name.endswith(MXFP4_BLOCKS) and info.dtype == "U8":
            weight = _mxfp4_weight(name[: -len(MXFP4_BLOCKS)], headers, weight_map, config)
            found[weight.name] = weight
    owned = {part for w in found.values() for part in w.parts.values()}
    for name in weight_map:
        if name.rpartition(".")[2] in BNB_PARTS and name.rpartition(".")[0] not in found and name not in owned:
            raise FormatError(f"{name}: a bitsandbytes quantization tensor without its weight's quant_state; "
                              "the checkpoint is incomplete", code="quant-state")
    return found


def companions(quantized: dict[str, QuantizedWeight]) -> set[str]:
    """Names of the tensors that belong to quantized weights (all but the weights themselves)."""
    return {part for w in quantized.values() for part in w.parts.values()}


def _bnb_weight(state_name: str, info: TensorInfo, headers, weight_map, path_of) -> QuantizedWeight:
    name, _, suffix = state_name.partition(BNB_STATE)
    where = f"{name} (bitsandbytes 4-bit)"
    if suffix not in ("nf4", "fp4"):
        raise UnsupportedError(f"{where}: quant type {suffix!r}; loratools reads nf4 and fp4", code="quant-state")
    if info.dtype != "U8" or not 0 < info.end - info.start <= MAX_STATE_BYTES:
        raise FormatError(f"{state_name}: expected a small U8 tensor of JSON", code="quant-state")
    state = _read_state(state_name, headers[weight_map[state_name]], path_of(weight_map[state_name]))
    quant_type, blocksize, dtype, shape = (state.get(k) for k in ("quant_type", "blocksize", "dtype", "shape"))
    if quant_type != suffix:
        raise FormatError(f"{where}: quant state says {quant_type!r} but is saved as {suffix}", code="quant-state")
    if not _is_int(blocksize) or blocksize not in BNB_BLOCKSIZES:
        raise FormatError(f"{where}: blocksize {blocksize!r} is not one bitsandbytes uses", code="quant-state")
    if not isinstance(dtype, str) or dtype not in BNB_DTYPES:
        raise FormatError(f"{where}: dtype {dtype!r}, expected bfloat16, float16 or float32", code="quant-state")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {shape!r} in the quant state is not a list of sizes", code="quant-state")
    numel = math.prod(shape)
    blocks = -(-numel // blocksize)
    parts = {"state": state_name}
    for role in BNB_PARTS:
        if f"{name}.{role}" in weight_map:
            parts[role] = f"{name}.{role}"
    nested = "nested_absmax" in parts
    expect = {
        name: ("U8", ((numel + 1) // 2,)),
        "absmax": ("U8" if nested else "F32", (blocks,)),
        "quant_map": ("F32", (16,)),
    }
    nested_blocksize = offset = 0
    if nested:
        nested_blocksize, offset = state.get("nested_blocksize"), state.get("nested_offset")
        if not _is_int(nested_blocksize) or nested_blocksize not in BNB_BLOCKSIZES or not _finite_number(offset):
            raise FormatError(f"{where}: double quant without a valid nested_blocksize and nested_offset", code="quant-state")
        if state.get("nested_dtype", "float32") != "float32":
            raise UnsupportedError(f"{where}: nested dtype {state.get('nested_dtype')!r}; loratools reads float32", code="quant-state")
        expect["nested_absmax"] = ("F32", (-(-blocks // nested_blocksize),))
        expect["nested_quant_map"] = ("F32", (256,))
    for role, (want_dtype, want_numel) in expect.items():
        tensor = role if role == name else parts.get(role)
        if tensor is None or tensor not in weight_map:
            raise FormatError(f"{where}: {role} is missing from the checkpoint", code="quant-state")
        have = headers[weight_map[tensor]].tensors[tensor]
        if have.dtype != want_dtype or have.numel != want_numel[0]:
            raise FormatError(f"{where}: {tensor} is {have.dtype}{list(have.shape)}, the quant state "
                              f"({quant_type}, shape {shape}, blocksize {blocksize}) needs {want_dtype} with {want_numel[0]} values",
                              code="quant-state")
    # Every value is code·absmax (absmax itself code·nested_absmax + offset with double quant): a
    # NaN/Inf scale or code value makes its block NaN/Inf, which merge would refuse as non-finite
    # output; said when the base is opened, validate --base and info --base say it too.
    for role in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        tensor = parts.get(role)
        if tensor is not None and expect.get(role, ("",))[0] == "F32":
            shard = weight_map[tensor]
            if not raw_values(SafetensorsStore(path_of(shard), headers[shard]), tensor)[0]:
                raise FormatError(f"{tensor}: a bitsandbytes {role} value is NaN or Inf, so {name} is not finite where "
                                  "it applies; the checkpoint is corrupt", code="quant-state")
    return QuantizedWeight(name, quant_type, tuple(shape), BNB_DTYPES[dtype], (blocksize,), parts,
                           int(nested_blocksize), float(offset))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(value) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _read_state(state_name: str, header: Header, path: str | os.PathLike) -> dict:
    raw = SafetensorsStore(path, header).raw(state_name).tobytes()
    try:
        state = parse_json(raw)
    except ValueError as exc:
        raise FormatError(f"{state_name}: the quant state is not JSON ({exc})", code="quant-state") from None
    if not isinstance(state, dict):
        raise FormatError(f"{state_name}: the quant state is not a JSON object", code="quant-state")
    return state


def _fp8_weight(name: str, headers, weight_map, config: dict | None, path_of) -> QuantizedWeight | None:
    scale_name = name + FP8_SCALE
    if name not in weight_map:
        raise FormatError(f"{scale_name}: a block scale without its weight {name}", code="quant-state")
    weight = headers[weight_map[name]].tensors[name]
    scale = headers[weight_map[scale_name]].tensors[scale_name]
    if weight.dtype not in ("F8_E4M3", "F8_E5M2"):
        return None  # a scale beside an unquantized weight is not ours to interpret
    if weight.dtype != "F8_E4M3":
        raise UnsupportedError(f"{name}: {weight.dtype} with block scales; loratools reads e4m3 (F8_E4M3)", code="quant-state")
    quant = (config or {}).get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or FP8_DEFAULT_BLOCK)
    if len(weight.shape) != 2 or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise FormatError(f"{name}: FP8 block scales need a 2-D weight and a 2-D weight_block_size, got "
                          f"{list(weight.shape)} and {list(block)}", code="quant-state")
    want = tuple(-(-d // b) for d, b in zip(weight.shape, block))
    if scale.dtype not in ("F32", "BF16") or scale.shape != want:
        raise FormatError(f"{scale_name} is {scale.dtype}{list(scale.shape)}; {list(weight.shape)} in "
                          f"{block[0]}x{block[1]} blocks needs F32{list(want)}", code="quant-state")
    # The scales are part of every weight's value (one per block, small): a NaN/Inf one makes its
    # block NaN/Inf, which merge would refuse as an overflow; said here, validate --base says it too.
    shard = weight_map[scale_name]
    if not raw_values(SafetensorsStore(path_of(shard), headers[shard]), scale_name)[0]:
        raise FormatError(f"{scale_name}: a block scale is NaN or Inf, so {name} is not finite where it applies; "
                          "the checkpoint is corrupt", code="quant-state")
    return QuantizedWeight(name, "fp8", weight.shape, "BF16", block, {"scale_inv": scale_name})


def _mxfp4_weight(name: str, headers, weight_map, config: dict | None) -> QuantizedWeight:
    """X_blocks (E, out, in/32, 16) and X_scales (E, out, in/32), both U8, as transformers saves
    gpt-oss experts: the parameter X is (E, in, out)."""
    blocks, scales = name + MXFP4_BLOCKS, name + MXFP4_SCALES
    where = f"{name} (mxfp4)"
    method = ((config or {}).get("quantization_config") or {}).get("quant_method", "mxfp4")
    if method != "mxfp4":
        raise FormatError(f"{where}: {blocks} is packed like MXFP4 but config.json's quant_method is {method!r}",
                          code="quant-state")
    if scales not in weight_map:
        raise FormatError(f"{where}: {blocks} without {scales}; the checkpoint is incomplete", code="quant-state")
    if name in weight_map:
        raise FormatError(f"{where}: the checkpoint stores {name} beside its MXFP4 blocks", code="quant-state")
    have, scale = headers[weight_map[blocks]].tensors[blocks], headers[weight_map[scales]].tensors[scales]
    if len(have.shape) != 4 or have.shape[3] != MXFP4_BLOCK // 2 or scale.dtype != "U8" or scale.shape != have.shape[:3]:
        raise FormatError(f"{where}: {blocks} is U8{list(have.shape)} and {scales} {scale.dtype}{list(scale.shape)}; "
                          f"MXFP4 experts need U8 (E, out, in/{MXFP4_BLOCK}, {MXFP4_BLOCK // 2}) and U8 (E, out, in/{MXFP4_BLOCK})",
                          code="quant-state")
    experts, out, groups, _ = have.shape
    return QuantizedWeight(name, "mxfp4", (experts, groups * MXFP4_BLOCK, out), "BF16", (MXFP4_BLOCK,),
                           {"blocks": blocks, "scales": scales})
