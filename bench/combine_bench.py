"""Benchmark `loratools combine --method svd --rank 64` on two 7B-shaped r=64 adapters (32
layers x 7 projections, hidden 4096, intermediate 11008, bf16) against PEFT's dense svd
combination (`add_weighted_adapter(..., combination_type="svd")`), in this run.

    .venv/bin/python bench/combine_bench.py [--workdir DIR]

PEFT needs the model in memory; a 7B model does not fit this benchmark's budget, so PEFT's
combination is timed on one module of each of the three shapes (a one-layer model holding just
that projection, with both adapters' real factors) and multiplied by the module counts, as the
output says. The same modules are compared for equal ΔW.
"""

from __future__ import annotations

import subprocess
import time

import torch

import loratools
from common import LORATOOLS, make_7b_adapter, scratch
from loratools.ops.combine import combine_adapters



def peft_svd_one_module(adapters, path: str) -> tuple[float, torch.Tensor]:
    """PEFT's svd combination for one module, on a model holding only that projection."""
    from peft import LoraConfig, get_peft_model

    module = adapters[0].modules[path]
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(module.in_features, module.out_features, bias=False))
    config = LoraConfig(r=module.rank, lora_alpha=module.alpha, target_modules=["proj"])
    peft_model = get_peft_model(model, config, adapter_name="a0")
    peft_model.add_adapter("a1", config)
    layer = peft_model.base_model.model.proj
    for i, adapter in enumerate(adapters):
        a, b = adapter.factors(path)
        layer.lora_A[f"a{i}"].weight.data = a.float()
        layer.lora_B[f"a{i}"].weight.data = b.float()
    start = time.perf_counter()
    peft_model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "m", combination_type="svd", svd_rank=64)
    seconds = time.perf_counter() - start
    return seconds, layer.get_delta_weight("m")


def main() -> None:
    with scratch(__doc__.splitlines()[0], "lt-combine-") as work:
        paths = [make_7b_adapter(work / name, 64, seed) for seed, name in enumerate("ab", start=1)]
        adapters = [loratools.load_adapter(p) for p in paths]
        start = time.perf_counter()
        combined, _ = combine_adapters(adapters, method="svd", rank=64)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([LORATOOLS, "combine", *map(str, paths), "--out", str(work / "out"), "--method", "svd", "--rank", "64"],
                       check=True, stdout=subprocess.DEVNULL)
        cli_s = time.perf_counter() - start
        by_shape: dict[tuple, list[str]] = {}
        for p, m in adapters[0].modules.items():
            by_shape.setdefault(m.weight_shape, []).append(p)
        peft_total, worst = 0.0, 0.0
        for shape, group in by_shape.items():
            seconds, reference = peft_svd_one_module(adapters, group[0])
            peft_total += seconds * len(group)
            a, b = (t.float() for t in combined.factors(group[0]))
            ours = b @ a  # scaling 1
            worst = max(worst, float((ours - reference).abs().max() / reference.abs().max()))
            print(f"  PEFT svd combination of one {shape[0]}x{shape[1]} module: {seconds:6.2f} s  (x{len(group)} modules)")
        print(f"two adapters: {len(adapters[0].modules)} modules each, r=64, bf16")
        print(f"  loratools combine --method svd --rank 64   {ours_s:7.2f} s in-process ({cli_s:.2f} s CLI incl. load + save)")
        print(f"  PEFT add_weighted_adapter svd (extrapolated) {peft_total:6.0f} s")
        print(f"  max |ΔW ours - ΔW PEFT| / max |ΔW| on the sampled modules: {worst:.2e}")
        print("ratio:")
        print(f"  PEFT / loratools   {peft_total / ours_s:7.0f}x   (target >= 50x)")


if __name__ == "__main__":
    main()
