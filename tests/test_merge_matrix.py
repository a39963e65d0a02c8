"""`merge` over every combination of its options on every kind of base: each combination gives
exactly the model the README defines, or refuses with a one-line reason and writes nothing.
None may exit 0 with another model, and none that has an exact answer may refuse.

The reference is computed here, without loratools, from the formats' definitions: every base
tensor's value (bitsandbytes 4-bit: quant_map[code]·absmax[block] over the flattened weight,
double quant undone, rounded to the quant state's dtype; FP8: e4m3(code)·scale_inv[block] in
float32, the block from config.json), plus scale·s·B@A in float64 (a PiSSA adapter with its
initial: scale·s·(B@A − B0@A0)), rounded once into the output dtype. Not bitsandbytes'
dequantize_4bit: its native CPU kernel is wrong on some CPUs and shapes.

Tolerances, and why: loratools computes ΔW and W+ΔW in float32 (the reference: float64), so
its sum is within E = 2^-20 (~1e-6) of the sum of the terms' magnitudes (|W| + |scale·s|·Σ|B||A|):
the float32 round-off of a rank-8 product and a sum. A float32 OUT must be within E. A bf16/fp16
OUT must be a faithful rounding of a value within E of the exact one (one of the two neighbours
that bracket it: at most one step of the output dtype beyond E; E matters only where W and ΔW
cancel, as PiSSA's −B0·A0 does), and ≥ 99% of each tensor the nearest value (ties to even): a
float32 intermediate may land on the other side of a rounding boundary, a truncation or a double
rounding through another dtype would not pass. Untouched tensors are exact: a cast of a known value.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.broken import split_safetensors
from tests.conftest import run_cli
from tests.quantized_models import (
    fp8_reference_dequant,
    qlora_adapter,
    reference_dequantize_4bit,
    save_bf16,
    save_bnb4,
    save_fp8,
    split_bnb4,
    tiny_causal_lm,
)

KINDS = ("bf16", "f16", "f32", "nf4", "fp4", "fp8")
LAYOUTS = ("dir", "sharded", "file")  # a directory with model.safetensors, with an index and 3 shards, a bare .safetensors
CASES = ("lora", "lora --initial", "pissa", "pissa --initial")  # the adapter, and whether --initial is given
DTYPES = (None, "float32", "float16", "bfloat16")
KEEP = (False, True)
SCALES = (1.0, -1.0, 0.5)
WORKERS = (1, 2)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]  # gate_proj and up_proj stay untouched
PISSA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # k_proj, o_proj and gate_proj stay untouched
FP8_BLOCK = [32, 48]  # 64 columns are a 48 and a cut 16-column block
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}
INDEX = "model.safetensors.index.json"
CRASH = "crashed: "  # marks an exception that is not a LoraToolsError


# ---- the inputs -----------------------------------------------------------------------------


def shard_by_layer(src: Path, out: Path) -> Path:
    """src's model.safetensors as three shards and an index (the embedding and layer 0, layer 1,
    the rest): a quantized weight stays in one shard with its scales and code maps."""
    tensors = load_file(str(src / "model.safetensors"))
    shards = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    place = {n: shards[0] if "embed_tokens" in n or ".layers.0." in n else shards[1] if ".layers.1." in n else shards[2] for n in tensors}
    out.mkdir()
    for shard in shards:
        save_file({n: t for n, t in tensors.items() if place[n] == shard}, str(out / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(place.items()))}, indent=2))
    for other in src.iterdir():
        if other.name != "model.safetensors":
            shutil.copyfile(other, out / other.name)
    return out


def pissa_adapters(values: dict[str, torch.Tensor], root: Path) -> tuple[Path, Path]:
    """(trained PiSSA adapter, the initial adapter PEFT saved before training, as PEFT's docs save
    it), initialised by PEFT from these base values (float32): an initial adapter belongs to its base."""
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm("llama").float()
    model.load_state_dict({name: value.float() for name, value in values.items()}, strict=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=PISSA_TARGETS))
    config = model.peft_config["default"]
    config.init_lora_weights = True
    model.save_pretrained(root / "initial")
    config.init_lora_weights = "pissa"
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(root / "trained")
    return root / "trained", root / "initial"


@dataclass
class Inputs:
    bases: dict[tuple[str, str], Path]  # (kind, layout) -> what merge is given
    adapters: dict[tuple[str, str], tuple[Path, Path | None]]  # (kind, case) -> (adapter, --initial)
    deltas: dict[tuple[str, str], dict[str, tuple[torch.Tensor, torch.Tensor]]]  # (kind, case) -> base weight -> (s·ΔW, s·Σ|B||A|), float64


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("matrix")
    dirs = {"bf16": save_bf16("llama", root / "bf16")}
    model = tiny_causal_lm("llama").float()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # float32 values that bf16 cannot hold, so a detour through bf16 shows
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
    model.save_pretrained(root / "f32")
    model.half().save_pretrained(root / "f16")
    dirs.update(f32=root / "f32", f16=root / "f16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs["nf4"] = save_bnb4(dirs["bf16"], root / "nf4", "nf4", double_quant=True)
        dirs["fp4"] = save_bnb4(dirs["bf16"], root / "fp4", "fp4", double_quant=False)
        lora = qlora_adapter(dirs["nf4"], root / "lora", seed=5, targets=LORA_TARGETS)
    dirs["fp8"] = save_fp8(dirs["bf16"], root / "fp8", block=FP8_BLOCK)
    bases, adapters, deltas = {}, {}, {}
    for kind, path in dirs.items():
        bases[kind, "dir"] = path
        bases[kind, "sharded"] = shard_by_layer(path, root / f"{kind}-sharded")
        bases[kind, "file"] = path / "model.safetensors"
        (root / f"pissa-{kind}").mkdir()
        pissa, initial = pissa_adapters(read_base(path, path).values, root / f"pissa-{kind}")
        adapters.update({(kind, "lora"): (lora, None), (kind, "lora --initial"): (lora, initial),
                         (kind, "pissa"): (pissa, None), (kind, "pissa --initial"): (pissa, initial)})
        deltas[kind, "lora"] = low_rank_delta([(lora, 1)])
        deltas[kind, "pissa --initial"] = low_rank_delta([(pissa, 1), (initial, -1)])
    return Inputs(bases, adapters, deltas)


def low_rank_delta(parts: list[tuple[Path, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Σ sign·s·B@A per base weight in float64, and Σ s·|B|@|A| (the magnitude float32 round-off scales with)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for adapter, sign in parts:
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
        s = config["lora_alpha"] / config["r"]
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                a, b = a.double(), tensors[key.replace(".lora_A.", ".lora_B.")].double()
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
                delta, size = out.get(name, (0, 0))
                out[name] = (delta + sign * s * (b @ a), size + s * (b.abs() @ a.abs()))
    return out


# ---- the reference: what every base tensor is, by the formats' definitions -----------------


@dataclass
class Base:
    path: Path  # as merge is given it
    shards: dict[str, list[str]]  # file -> its tensors in file order
    dtypes: dict[str, str]  # stored tensor -> dtype code
    tensors: dict[str, torch.Tensor]  # as stored
    values: dict[str, torch.Tensor]  # every weight's value (not the quantization tensors), in the dtype it is held in
    companions: set[str]  # scales, code maps, quant states
    fp8: dict[str, str]  # FP8 weight -> its scale tensor
    block: list[int]  # FP8 block size: the true one, also for a bare file that does not say it
    config: dict | None
    other_files: dict[str, bytes]  # beside the weights (config.json compared as JSON)

    @property
    def quantized(self) -> bool:
        return bool(self.companions)


def read_base(path: Path, config_dir: Path) -> Base:
    if path.is_file():
        files, config, other = {path.name: path}, None, {}
    else:
        names = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values())) if (path / INDEX).exists() else ["model.safetensors"]
        files = {n: path / n for n in names}
        config = json.loads((path / "config.json").read_text())
        other = {p.name: p.read_bytes() for p in path.iterdir() if p.name not in files and p.name not in (INDEX, "config.json")}
    shards, dtypes, tensors = {}, {}, {}
    for name, file in files.items():
        header, _ = split_safetensors(file)
        header.pop("__metadata__", None)
        shards[name] = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        dtypes.update({n: h["dtype"] for n, h in header.items()})
        tensors.update(load_file(str(file)))
    companions = {n for n in tensors if ".quant_state." in n or n.rpartition(".")[2] in BNB_PARTS or n.endswith("_scale_inv")}
    quant = json.loads((config_dir / "config.json").read_text()).get("quantization_config") or {}
    block = quant.get("weight_block_size") or [128, 128]
    fp8 = {n: n + "_scale_inv" for n in tensors if n + "_scale_inv" in tensors and dtypes[n] == "F8_E4M3"}
    bnb4, _ = split_bnb4(tensors)
    values = {w: reference_dequantize_4bit(packed, state) for w, (packed, state) in bnb4.items()}
    values.update({w: fp8_reference_dequant(tensors[w], tensors[scales], block) for w, scales in fp8.items()})
    values.update({n: t for n, t in tensors.items() if n not in values and n not in companions})
    return Base(path, shards, dtypes, tensors, values, companions, fp8, block, config, other)


# ---- what each combination must do ----------------------------------------------------------


class Combination(NamedTuple):
    kind: str
    layout: str
    case: str
    dtype: str | None
    keep: bool
    scale: float
    workers: int

    def __str__(self) -> str:
        return (f"{self.kind} {self.layout}: {self.case} --dtype {self.dtype} {'--keep-quantized ' if self.keep else ''}"
                f"--scale {self.scale} --workers {self.workers}")

    def must_refuse(self) -> list[str]:
        """The README's refusals that apply, each as a fragment its message must carry (any one)."""
        reasons = []
        if self.case == "lora --initial":
            reasons.append("--initial")  # only PiSSA/OLoRA/CorDA/LoRA-GA adapters have an initial adapter
        if self.case == "pissa":
            reasons.append("--initial")  # relative to the base PEFT rewrote: refused without its initial adapter
        if self.keep and self.kind != "fp8":
            reasons.append("--keep-quantized")  # FP8 only: a plain base has nothing to keep, 4-bit would round ΔW away
        return reasons

    def may_refuse(self) -> bool:
        """Where a refusal is acceptable though no README refusal applies: a bare FP8 .safetensors
        has no config.json to give its weight_block_size, so its 32x48 scales cannot be read as
        the 128x128 default. An output there must still be the exact model (of the true block size)."""
        return self.kind == "fp8" and self.layout == "file"


def judge(base: Base, combo: Combination, delta: dict, out: Path, refusal: str | None, report: dict | None) -> list[str]:
    """What is wrong with one combination's outcome (a refusal's message, or the report and OUT).
    delta: base weight -> (s·ΔW, s·Σ|B||A|) of the adapter, float64."""
    reasons = combo.must_refuse()
    if refusal is not None and refusal.startswith(CRASH):
        return [f"raised something other than a LoraToolsError: {refusal.removeprefix(CRASH)}"]
    if refusal is not None:
        message = refusal.strip()
        problems = [] if message and "\n" not in message else [f"the refusal is not one line: {refusal!r}"]
        if any(out.parent.iterdir()):
            problems.append(f"refused but left {sorted(p.name for p in out.parent.iterdir())}")
        accepted = reasons + (["blocks"] if combo.may_refuse() else [])  # the block scales' message
        if reasons and not any(r in message for r in accepted):
            problems.append(f"refused for another reason than {accepted}: {message}")
        elif not reasons and not combo.may_refuse():
            problems.append(f"refused where the model is defined (over-cautious): {message}")
        return problems
    if reasons:
        exact = not check_output(base, combo, delta, out, report)
        return [f"exit 0 where it must refuse ({', '.join(reasons)}); the output is {'exact' if exact else 'another model'}"]
    return check_output(base, combo, delta, out, report)


def out_dtype(base: Base, name: str, dtype: str | None, keep: bool) -> str:
    """The dtype code the README gives tensor `name` of OUT."""
    if keep and (name in base.fp8 or name in base.companions):
        return base.dtypes[name]  # FP8 codes stay FP8, scales F32, whatever --dtype says
    if dtype is not None:
        return CODES[getattr(torch, dtype)]
    if base.quantized and not keep:
        return "BF16"  # a dequantized base: one precision, bfloat16
    return CODES[base.values[name].dtype]


def check_output(base: Base, combo: Combination, delta: dict, out: Path, report: dict | None) -> list[str]:
    dtype, keep, scale = combo.dtype, combo.keep, combo.scale
    problems: list[str] = []
    expected_map = {n: s for s, names in base.shards.items() for n in names if keep or n not in base.companions}
    if not out.exists():
        return ["succeeded but wrote no OUT"]
    if base.path.is_file():
        if not out.is_file():
            return [f"OUT is not a single file: {out}"]
        files = {base.path.name: out}
    else:
        present = sorted(p.name for p in out.iterdir())
        wanted = sorted([*base.shards, *base.other_files, "config.json"] + ([INDEX] if (base.path / INDEX).exists() else []))
        if present != wanted:
            return [f"OUT holds {present}, not {wanted}"]
        files = {s: out / s for s in base.shards}
        problems += [f"{n} differs from BASE's" for n, data in base.other_files.items() if (out / n).read_bytes() != data]
        config = json.loads((out / "config.json").read_text())
        if config != expected_config(base, dtype, keep):
            problems.append(f"config.json: {diff(config, expected_config(base, dtype, keep))}")
    written, total = {}, 0
    for shard, file in files.items():
        try:
            header, _ = split_safetensors(file)
            load_file(str(file))
        except Exception as exc:  # noqa: BLE001  (a broken file is this combination's failure, not the test's)
            problems.append(f"{shard} is not a readable safetensors file: {exc}")
            continue
        header.pop("__metadata__", None)
        entries = [(n, header[n]["dtype"], tuple(header[n]["shape"])) for n in sorted(header, key=lambda n: header[n]["data_offsets"][0])]
        want = [(n, out_dtype(base, n, dtype, keep), tuple(base.values[n].shape if n in base.values else base.tensors[n].shape))
                for n in base.shards[shard] if n in expected_map]
        if entries != want:
            problems.append(f"{shard}: tensors {[e for e in entries if e not in want][:3]} where {[w for w in want if w not in entries][:3]} "
                            f"were expected (or another order)")
            continue
        total += sum(h["data_offsets"][1] - h["data_offsets"][0] for h in header.values())
        written.update(load_file(str(file)))
    if base.path.is_dir() and (base.path / INDEX).exists():
        index = json.loads((out / INDEX).read_text())
        if index["weight_map"] != expected_map:
            problems.append("the index's weight_map is not BASE's (less the dropped quantization tensors)")
        if index["metadata"]["total_size"] != total:
            problems.append(f"the index's total_size {index['metadata']['total_size']} is not {total}")
    if report is not None:
        if report["workers"] != min(combo.workers, len(base.shards)) or report["keep_quantized"] != keep:
            problems.append(f"report says workers {report['workers']}, keep_quantized {report['keep_quantized']}")
    if problems:
        return problems
    for name, tensor in written.items():
        if keep and name in base.fp8:
            problems += check_fp8_kept(base, name, tensor, written[base.fp8[name]], delta.get(name), scale)
        elif name in base.companions:
            continue  # a kept scale: checked with its weight
        elif name in delta:
            d, size = delta[name]
            exact = base.values[name].double() + scale * d
            problem = rounding_problem(tensor, exact, base.values[name].double().abs() + abs(scale) * size)
            if problem:
                problems.append(f"{name}: {problem}")
        elif not torch.equal(tensor, base.values[name].to(tensor.dtype)):
            problems.append(f"{name} (untouched): not BASE's value cast to {CODES[tensor.dtype]}")
    return problems


def expected_config(base: Base, dtype: str | None, keep: bool) -> dict:
    config = dict(base.config)
    if base.quantized and not keep:
        config.pop("quantization_config", None)  # OUT loads as a plain model
        dtype = dtype or "bfloat16"
    if dtype is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
            config[key] = dtype
    return config


def diff(have: dict, want: dict) -> str:
    keys = sorted(k for k in have.keys() | want.keys() if have.get(k, "<absent>") != want.get(k, "<absent>"))
    return ", ".join(f"{k}: {have.get(k, '<absent>')!r} (want {want.get(k, '<absent>')!r})" for k in keys)


def ordered(t: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude bits as integers in the order of the values (neighbours differ by 1; ±0 are 0)."""
    bits = t.view(torch.uint8 if t.element_size() == 1 else torch.int16).long()
    sign = 0x80 if t.element_size() == 1 else 0x8000
    bits = bits & (2 * sign - 1)
    magnitude = bits & (sign - 1)
    return torch.where(bits & sign != 0, -magnitude, magnitude)


def rounding_problem(ours: torch.Tensor, exact: torch.Tensor, size: torch.Tensor) -> str | None:
    """None if `ours` is `exact` (float64) computed in float32 and rounded once into ours.dtype,
    within the module docstring's tolerance; size: Σ of the magnitudes of the terms."""
    error = 2.0**-20 * size  # float32 round-off of the product and the sum
    if ours.dtype == torch.float32:
        worst = float(((ours.double() - exact).abs() / size).max())
        return None if worst <= 2.0**-20 else f"float32 error {worst:.2e} of the terms' magnitude (allowed 2^-20)"
    # a faithful rounding of some value within `error` of the exact one: between the neighbour
    # below exact - error and the neighbour above exact + error, at most one step of the dtype outside
    low, high = exact - error, exact + error
    low_near, high_near = low.float().to(ours.dtype), high.float().to(ours.dtype)
    floor = ordered(low_near) - (low_near.double() > low).long()
    ceil = ordered(high_near) + (high_near.double() < high).long()
    key = ordered(ours)
    outside = (key < floor) | (key > ceil) | ~torch.isfinite(ours.double())
    if outside.any():
        steps = int(torch.maximum(floor - key, key - ceil).max())
        return f"{int(outside.sum())} values more than one {CODES[ours.dtype]} step off the exact value (up to {steps + 1} steps)"
    share = float((key == ordered(exact.float().to(ours.dtype))).double().mean())
    if share < 0.99:
        return f"only {share:.1%} rounded to nearest (a rounding other than one round-to-nearest?)"
    return None


def check_fp8_kept(base: Base, name: str, codes: torch.Tensor, scales: torch.Tensor, delta, scale: float) -> list[str]:
    """--keep-quantized: an untouched FP8 weight and its scales are BASE's bytes; a changed one is
    W+ΔW quantized again as the README says (scale = block amax / 448, codes to nearest e4m3)."""
    stored, stored_scales = base.tensors[name], base.tensors[base.fp8[name]]
    if delta is None:
        same = torch.equal(codes.view(torch.uint8), stored.view(torch.uint8)) and torch.equal(scales.view(torch.uint8), stored_scales.view(torch.uint8))
        return [] if same else [f"{name} (untouched FP8): codes or scales are not BASE's bytes"]
    d, size = delta
    exact = base.values[name].double() + scale * d
    magnitude = base.values[name].double().abs() + abs(scale) * size
    rows, cols = exact.shape
    br, bc = base.block

    def per_block(t: torch.Tensor) -> torch.Tensor:  # max over each block (edge blocks cut)
        padded = torch.zeros(-(-rows // br) * br, -(-cols // bc) * bc, dtype=t.dtype)
        padded[:rows, :cols] = t
        return padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc).amax(dim=(1, 3))

    problems = []
    amax = per_block(exact.abs())
    tolerance = 2.0**-20 * per_block(magnitude) + 2.0**-23 * amax
    if scales.shape != stored_scales.shape or not ((scales.double() * 448 - amax).abs() <= tolerance).all():
        return [f"{name}: new scales are not block amax / 448"]
    expanded = scales.double().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    problem = rounding_problem(codes, exact / expanded, magnitude / expanded)
    if problem:
        problems.append(f"{name} (re-quantized codes): {problem}")
    if not (per_block(codes.float().abs()) == 448).all():
        problems.append(f"{name}: a block whose largest code is not 448")
    return problems


# ---- running the matrix ---------------------------------------------------------------------


# The merges run through the library (loratools.merge) in lean processes (one per core, up to 4) that import
# loratools only, started once: each merge forks its workers, and forking this test process
# (torch, transformers, PEFT and the models loaded) costs several times the merge of a tiny model.
# Each adapter is loaded once per process (reading it is a tenth of a tiny merge), and torch
# runs one thread in each: on tiny matrices its thread pool costs 40x the work.
DRIVER = """
import json, sys
import loratools
from loratools.errors import LoraToolsError
adapters = {}  # path -> the adapter loaded once (merge takes a path or a loaded Adapter)
for line in sys.stdin:
    jobs = line.strip()
    results = []
    for job in json.load(open(jobs)):
        for key in ("adapter", "initial"):
            if job[key] is not None and job[key] not in adapters:
                adapters[job[key]] = loratools.load_adapter(job[key])
            job[key] = adapters.get(job[key])
        try:
            results.append({"report": loratools.merge(**job).to_dict()})
        except LoraToolsError as exc:
            results.append({"refusal": str(exc)})
        except Exception as exc:  # not a loratools error: reported with the combination
            results.append({"refusal": "%s%s: %s" % (sys.argv[1], type(exc).__name__, exc)})
    json.dump(results, open(jobs + ".out", "w"))
    print(jobs, flush=True)
"""


DRIVER_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("drivers")
    procs = []
    for i in range(max(1, min(4, len(os.sched_getaffinity(0))))):
        with open(logs / f"{i}.log", "w") as log:
            procs.append((subprocess.Popen([sys.executable, "-c", DRIVER, CRASH], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=log, text=True, env=DRIVER_ENV), logs / f"{i}.log"))
    yield procs
    for proc, _ in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


def run_library(drivers, jobs: list[dict], tmp_path: Path) -> list[tuple[str | None, dict | None]]:
    """(refusal message, None) or (None, report) for every job (loratools.merge's arguments)."""
    parts = len(drivers)
    for i, (proc, _) in enumerate(drivers):
        (tmp_path / f"jobs-{i}.json").write_text(json.dumps(jobs[i::parts], default=str))
        proc.stdin.write(f"{tmp_path / f'jobs-{i}.json'}\n")
        proc.stdin.flush()
    results: list = [None] * len(jobs)
    for i, (proc, log) in enumerate(drivers):
        assert proc.stdout.readline().strip() == str(tmp_path / f"jobs-{i}.json"), log.read_text()
        results[i::parts] = [(r.get("refusal"), r.get("report")) for r in json.loads((tmp_path / f"jobs-{i}.json.out").read_text())]
    return results


def read_all(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() else {"": path.read_bytes()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_option_combination_is_exact_or_refused(inputs, drivers, kind, layout, tmp_path):
    """4 adapter cases × 4 dtypes × keep_quantized × 3 scales × 2 worker counts on this base
    (192 merges); the output with 2 workers is byte-identical to 1 worker's."""
    base = read_base(inputs.bases[kind, layout], inputs.bases[kind, "dir"])
    combos = [Combination(kind, layout, *options) for options in itertools.product(CASES, DTYPES, KEEP, SCALES, WORKERS)]
    assert len(combos) == 192 and [c.workers for c in combos[:2]] == [1, 2]
    jobs = []
    for number, combo in enumerate(combos):
        out = tmp_path / str(number) / ("merged.safetensors" if layout == "file" else "merged")
        out.parent.mkdir()
        adapter, initial = inputs.adapters[kind, combo.case]
        jobs.append(dict(base=inputs.bases[kind, layout], adapter=adapter, out=out, device="cpu", scale=combo.scale,
                         dtype=combo.dtype, workers=combo.workers, keep_quantized=combo.keep, initial=initial))
    results = run_library(drivers, jobs, tmp_path)
    failures, wrong = [], 0
    try:
        for number, (combo, job, (refusal, report)) in enumerate(zip(combos, jobs, results)):
            delta = inputs.deltas.get((kind, combo.case), {})
            if combo.workers == 1:
                problems = judge(base, combo, delta, job["out"], refusal, report)
            elif (refusal is None) != (results[number - 1][0] is None):
                problems = ["--workers 1 and 2 disagree on refusing"]
            elif refusal is None:  # the same files as with one worker, which were checked against the reference
                same = read_all(job["out"]) == read_all(jobs[number - 1]["out"])
                problems = [] if same else ["not byte-identical to the output with --workers 1"]
            else:
                problems = judge(base, combo, delta, job["out"], refusal, report)
            failures += [f"{combo}: {p}" for p in problems]
            wrong += bool(problems)
    finally:
        for job in jobs:
            shutil.rmtree(job["out"].parent)
    assert not failures, f"{wrong} of {len(combos)} combinations wrong:\n" + "\n".join(failures)


CLI_COMBINATIONS = [
    # kind, layout, case, dtype, keep_quantized, scale, workers
    ("fp8", "sharded", "lora", "bfloat16", True, 0.5, 2),
    ("fp8", "dir", "pissa --initial", "float32", True, -1.0, 1),
    ("nf4", "file", "pissa --initial", "float16", False, -1.0, 2),
    ("fp4", "sharded", "lora", None, False, 1.0, 2),
    ("f32", "dir", "lora", "bfloat16", False, 0.5, 1),
    ("nf4", "dir", "lora", None, True, 1.0, 1),
    ("bf16", "sharded", "lora --initial", None, False, 1.0, 2),
    ("f16", "file", "pissa", "float32", False, 1.0, 1),
]


@pytest.mark.parametrize("kind,layout,case,dtype,keep,scale,workers", CLI_COMBINATIONS)
def test_combinations_through_the_command(inputs, tmp_path, kind, layout, case, dtype, keep, scale, workers):
    """The same judgement for a few combinations as a user types them: exit 0 with the exact
    model, or exit 1/2 with one `Error:` line, no traceback and nothing written."""
    adapter, initial = inputs.adapters[kind, case]
    out = tmp_path / "o" / ("merged.safetensors" if layout == "file" else "merged")
    out.parent.mkdir()
    args = ["merge", inputs.bases[kind, layout], adapter, out, "--device", "cpu", "--scale", str(scale), "--workers", str(workers), "--json"]
    args += (["--dtype", dtype] if dtype else []) + (["--keep-quantized"] if keep else []) + (["--initial", initial] if initial else [])
    result = run_cli(*args)
    refusal = report = None
    if result.returncode == 0:
        report = json.loads(result.stdout)
    else:
        lines = result.stderr.strip().splitlines()
        assert result.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        refusal = lines[0].removeprefix("Error: ")
    base = read_base(inputs.bases[kind, layout], inputs.bases[kind, "dir"])
    combo = Combination(kind, layout, case, dtype, keep, scale, workers)
    problems = judge(base, combo, inputs.deltas.get((kind, case), {}), out, refusal, report)
    assert not problems, problems
