"""What `bitsmith compress` saves for every built-in recipe, recorded once and compared after every change.

The reference (tests/data/pipeline_reference.json) was written by the code before the stage pipeline
(issue 9) replaced the fixed quantization chain: per case (model, recipe, in memory or --offload) every saved
tensor's shape, dtype, sha256 prefix and float64 sum, and the machine it was recorded on. On that kind of
machine (same CPU flags, torch and thread count) every tensor must be byte-identical; elsewhere names, shapes
and dtypes must match (the zoo's trained docs-lm and GEMM rounding differ by CPU kind: see the test).

    python tests/pipeline_reference.py           # rewrite the reference (only when a change is meant to
                                                 # change saved tensors, and say so in the commit)
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

REFERENCE = Path(__file__).parent / "data" / "pipeline_reference.json"
CALIB_SAMPLES = 16  # small: the reference is about equality, not quality
MODELS = ("docs-lm", "minilm")
OFFLOAD_RECIPES = ("w4a16", "w8a16", "gptq-w4a16", "gptq-w3a16", "awq-w4a16", "bf16", "fp16", "w8a8-dynamic")


def machine() -> dict:
    from bitsmith.nn import cpu

    return {"flags": cpu.summary()["flags"], "torch": torch.__version__, "threads": torch.get_num_threads()}


def digest_dir(path: Path) -> dict[str, list]:
    """Tensor name -> [shape, dtype, sha256[:16], float64 sum] over every safetensors file of ``path``."""
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key).contiguous()
                raw = tensor.view(torch.uint8) if tensor.numel() else tensor
                sha = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
                found[key] = [list(tensor.shape), str(tensor.dtype), sha, float(tensor.double().sum())]
    return found


OLD_STAGES = {"quantize", "smooth", "fold_batchnorm", "equalize"}  # what the chain before issue 9 could do
NEWER_FORMATS = {"fp8-w", "nf4", "mxfp4", "ternary"}  # quantize-only, but their formats came after the chain
NEWER_RECIPES = {"gptq-q4_0", "gptq-q4_1", "awq-q4_1", "imatrix-q4_0"}  # old stages and formats, recipes written after the reference was recorded


def covered(recipe: str) -> bool:
    """Whether the reference records this built-in recipe: the old chain could run it."""
    import bitsmith

    return recipe not in NEWER_FORMATS | NEWER_RECIPES and {s.stage for s in bitsmith.load_recipe(recipe).stages} <= OLD_STAGES


def cases() -> list[tuple[str, str, bool]]:
    import bitsmith

    recipes = sorted(n for n in bitsmith.builtin_recipes() if covered(n))
    out = [(model, recipe, False) for model in MODELS for recipe in recipes]
    return out + [("docs-lm", recipe, True) for recipe in OFFLOAD_RECIPES]


def case_key(model: str, recipe: str, offload: bool) -> str:
    return f"{model}/{recipe}{' --offload' if offload else ''}"


def run_case(model: str, recipe: str, offload: bool, out: Path) -> dict[str, list]:
    import bitsmith
    from bitsmith.api.compress import compress_offloaded

    if offload:
        compress_offloaded(model, recipe, out, calib_samples=CALIB_SAMPLES)
    else:
        bitsmith.compress(model, recipe, out, calib_samples=CALIB_SAMPLES, repeats=1)
    return digest_dir(out)


def record() -> None:
    torch.set_num_threads(2)  # as tests/conftest.py
    result = {"machine": machine(), "calib_samples": CALIB_SAMPLES, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (model, recipe, offload) in enumerate(cases()):
            key = case_key(model, recipe, offload)
            print(key, file=sys.stderr)
            result["cases"][key] = run_case(model, recipe, offload, Path(tmp) / str(index))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record()
