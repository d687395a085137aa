"""Decoding a Llama-family model at batch 1 a whole block a native call (``csrc/quant.c``,
``bitsmith_llama_block``).

transformers' eager forward spends about 11 ms a token on smollm2 in framework work alone (norms, rotary, cache
bookkeeping, ~30 ops a block: measured on a 2-core AVX2 EPYC with the matmuls taken out), more than llama.cpp's
whole step on the same machine. Decoding is bound by the bytes of weights it reads, so the step is one native
call a block: the same math as ``LlamaDecoderLayer`` for one new token (RMSNorm, q/k/v, rotary from the model's
own rotary embedding, grouped-query attention over a preallocated KV cache, o, SiLU-gated MLP), on the layer's
int4 codes as stored (read packed: a zero point a group, or a float min a group as GGUF's Q4_1 has) or its float32
weight.

    decoder = NativeDecoder(model, max_len=2048, activations="float32")   # or "q8"
    logits = decoder.prefill(input_ids)      # transformers' forward over the prompt; its K/V copied in
    logits = decoder.step(token)             # one token: embedding, every block natively, norm, head

``activations="float32"`` keeps every input in float32 (the w4a16 scheme's math, summed in another order).
``activations="q8"`` rounds the input of each int4 matmul to int8 in blocks of 32 (a scale a block, as
llama.cpp's Q8_0 does for its Q4_0/Q4_1 matmuls) and sums the products in integers: a different numeric, asked
for by name and reported, never chosen silently.

``unsupported(model)`` says why a model cannot run here (an architecture with other blocks, a layer on a
module this step does not read), or None.
"""

from __future__ import annotations

import ctypes
import inspect

import torch
from torch import nn

from bitsmith.nn import native
from bitsmith.nn.linear import IntxWeightOnlyLinear
from bitsmith.nn.linear_min import IntxMinWeightOnlyLinear

__all__ = ["NativeDecoder", "unsupported", "ACTIVATIONS"]

ACTIVATIONS = ("float32", "q8")
_FAMILIES = ("llama",)  # blocks LlamaDecoderLayer's way: RMSNorm, rotate_half rotary, SiLU-gated MLP
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _weight_problem(name: str, module: nn.Module) -> str | None:
    if isinstance(module, (IntxWeightOnlyLinear, IntxMinWeightOnlyLinear)):
        if module.bits != 4 or module.in_features % 2 or module.group_size % 32:
            return (f"{name} is {module.scheme}: the native decoder reads 4-bit codes in groups of a multiple of 32"
                    " over an even number of inputs")
        return None
    if type(module) is nn.Linear:
        return None
    return f"{name} runs on {type(module).__name__}, which the native decoder does not read (int4 or float32 only)"


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode on the native step, or None."""
    if not native.available():
        return f"bitsmith's native kernels are not available here ({native.status()})"
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        return f"the native decoder runs Llama-family blocks; this model is {family or type(model).__name__}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the native decoder's MLP is SiLU-gated; this model's is {config.hidden_act}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the native decoder needs model.model.layers and model.model.rotary_emb (transformers' Llama layout)"
    for index, layer in enumerate(inner.layers):
        for path in _PROJECTIONS:
            problem = _weight_problem(f"layers.{index}.{path}", layer.get_submodule(path))
            if problem:
                return problem
    return None


class _Matrix:
    """A layer's matrix for the native step; holds the tensors the pointers point at."""

    def __init__(self, module: nn.Module):
        bias = getattr(module, "bias", None)
        self.bias = bias.detach().float().contiguous() if bias is not None else None
        if isinstance(module, IntxWeightOnlyLinear):
            self.tensors = (module.weight_packed.contiguous(), module.weight_scale.float().contiguous(),
                            module.weight_zero_point.contiguous())
            packed, scale, zero = self.tensors
            self.struct = native.Weight(0, module.group_size, module.out_features, module.in_features,
                                        packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), None,
                                        self.bias.data_ptr() if self.bias is not None else None, None)
        elif isinstance(module, IntxMinWeightOnlyLinear):  # w = q * scale + min (GGUF's Q4_1)
            self.tensors = (module.weight_packed.contiguous(), module.weight_scale.float().contiguous(),
                            module.weight_min.float().contiguous())
            packed, scale, minimum = self.tensors
            self.struct = native.Weight(0, module.group_size, module.out_features, module.in_features,
                                        packed.data_ptr(), scale.data_ptr(), None, None,
                                        self.bias.data_ptr() if self.bias is not None else None, minimum.data_ptr())
        else:
            self.tensors = (module.weight.detach().float().contiguous(),)
            rows, cols = self.tensors[0].shape
            self.struct = native.Weight(1, 0, rows, cols, None, None, None, self.tensors[0].data_ptr(),
                                        self.bias.data_ptr() if self.bias is not None else None, None)
        self.rows = int(self.struct.rows)


class NativeDecoder:
    """Batch-1 decoding of a Llama-family ``model`` (see the module's docstring); ``max_len`` positions of cache."""

    def __init__(self, model: nn.Module, max_len: int = 2048, activations: str = "float32"):
        problem = unsupported(model)
        if problem:
            raise ValueError(problem)
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        self.model, self.max_len, self.q8 = model, int(max_len), int(activations == "q8")
        self.activations = activations
        config, inner = model.config, model.model
        self.dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or self.dim // self.n_heads
        self.blocks = []
        for layer in inner.layers:
            matrices = [_Matrix(layer.get_submodule(path)) for path in _PROJECTIONS]
            array = (native.Weight * 7)(*(m.struct for m in matrices))
            norms = (layer.input_layernorm.weight.detach().float().contiguous(),
                     layer.post_attention_layernorm.weight.detach().float().contiguous())
            eps = float(getattr(layer.input_layernorm, "variance_epsilon", getattr(config, "rms_norm_eps", 1e-6)))
            self.blocks.append((matrices, array, norms, eps))
        self.keys = torch.zeros(len(self.blocks), self.n_kv, self.max_len, self.head_dim)
        self.values = torch.zeros_like(self.keys)
        with torch.inference_mode():
            positions = torch.arange(self.max_len)[None]
            probe = torch.zeros(1, 1, self.dim)
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        head = model.get_output_embeddings()
        self.head = _Matrix(head) if _weight_problem("lm_head", head) is None else None
        self.head_module = head
        self.position = 0
        self._lib = native.library()

    def reset(self) -> None:
        self.position = 0

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt (1, T) through transformers' forward; its keys and values fill this cache. Returns the
        last position's logits (vocab,)."""
        from transformers import DynamicCache

        length = input_ids.shape[-1]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("the native decoder runs one sequence (batch 1)")
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} tokens leaves no room in a cache of {self.max_len} positions")
        with torch.inference_mode():
            cache = DynamicCache()
            # transformers 5 names it `cache`; earlier releases `past_key_values`
            name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{name: cache})
            for index, layer in enumerate(cache.layers):
                self.keys[index, :, :length] = layer.keys[0].float()
                self.values[index, :, :length] = layer.values[0].float()
        self.position = length
        return out.logits[0, -1].float()

    def step(self, token: int) -> torch.Tensor:
        """One token at the next position through every block natively. Returns its logits (vocab,)."""
        if self.position >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} positions is full")
        lib, threads, pos = self._lib, torch.get_num_threads(), self.position
        with torch.inference_mode():
            h = self.model.model.embed_tokens(torch.tensor([[token]]))[0, 0].float().contiguous()
            cos, sin = self.cos[pos], self.sin[pos]
            for index, (_, array, (norm1, norm2), eps) in enumerate(self.blocks):
                status = lib.bitsmith_llama_block(
                    h.data_ptr(), self.dim, norm1.data_ptr(), norm2.data_ptr(), eps, array, self.n_heads,
                    self.n_kv, self.head_dim, cos.data_ptr(), sin.data_ptr(), self.keys[index].data_ptr(),
                    self.values[index].data_ptr(), pos, self.max_len, self.q8, threads)
                if status:
                    raise MemoryError("the native decode step could not allocate its scratch memory")
            h = self.model.model.norm(h)
            if self.head is not None:
                logits = torch.empty(self.head.rows)
                lib.bitsmith_matvec(ctypes.byref(self.head.struct), h.contiguous().data_ptr(), logits.data_ptr(), self.q8, threads)
            else:
                logits = self.head_module(h[None])[0].float()
        self.position += 1
        return logits
