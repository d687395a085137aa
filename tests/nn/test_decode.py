"""The native decode step (nn/decode.py, csrc's bitsmith_llama_block) against transformers' forward of the same
model: float weights, int4 codes read packed, and the q8 path against the same model with each int4 layer's input
rounded to int8 in blocks of 32 in torch."""

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import Recipe
from bitsmith.nn import dispatch, native
from bitsmith.nn.decode import NativeDecoder, unsupported
from bitsmith.nn.linear import IntxWeightOnlyLinear
from bitsmith.nn.linear_min import IntxMinWeightOnlyLinear

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels here")


def _model(bias: bool = False):
    """A 2-block Llama whose widths (96, 160) leave a 32-column tail after the 64-column vector chunks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=80, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config).eval()
    if bias:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return model


def _int4(model, symmetric: bool = False, group: int = 32):
    scheme = {"weights": {"dtype": "int4", "granularity": group, "symmetric": symmetric}}
    bitsmith.run_stages(model, Recipe.model_validate({"version": 2, "name": "w4", "stages": [
        {"quantize": {"rules": [{"targets": ["Linear"], "scheme": scheme}]}}]}))
    assert isinstance(model.lm_head, IntxWeightOnlyLinear)
    return model


def _ids(length: int = 14) -> torch.Tensor:
    return torch.randint(0, 80, (1, length), generator=torch.Generator().manual_seed(3))


def _native_logits(model, ids: torch.Tensor, prompt: int, activations: str = "float32") -> torch.Tensor:
    """The logits predicting ids[prompt:], the prompt by prefill, the rest one native step a token."""
    decoder = NativeDecoder(model, max_len=32, activations=activations)
    rows = [decoder.prefill(ids[:, :prompt])]
    rows += [decoder.step(int(token)) for token in ids[0, prompt:-1]]
    return torch.stack(rows)


def _reference(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, prompt - 1:-1].float()


def _spread_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / (want.max() - want.min()))


@pytest.fixture
def exact_w4a16(monkeypatch):
    """transformers' forward on the fp32 dequantized weight (int4pack's bf16 activations would be the noise)."""
    monkeypatch.setenv("BITSMITH_KERNEL_W4A16", "dequant-fp32")
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.mark.parametrize("bias", [False, True])
def test_float_model_steps_are_transformers_forward(bias):
    model, ids = _model(bias), _ids()
    assert _spread_error(_native_logits(model, ids, 5), _reference(model, ids, 5)) < 1e-5


@pytest.mark.parametrize("symmetric,group", [(False, 32), (True, 32), (False, 64), (False, 96)])
def test_int4_codes_read_packed_give_the_dequantized_forward(exact_w4a16, symmetric, group):
    """Group 32: two groups a 64-column chunk; 64: one; 96: chunks that straddle groups, and a short last group."""
    model, ids = _int4(_model(bias=True), symmetric, group), _ids()
    want = _reference(model, ids, 4)
    assert _spread_error(_native_logits(model, ids, 4), want) < 1e-5
    # the q8 path is another numeric: close, not equal
    q8 = _spread_error(_native_logits(model, ids, 4, "q8"), want)
    assert 1e-6 < q8 < 0.05, q8


def _round_inputs_to_int8_blocks(model):
    """Each int4 layer's input rounded to int8 in blocks of 32 (scale amax / 127, half to even), in torch."""

    def hook(module, args):
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        codes = torch.where(scale > 0, torch.round(blocks / scale), torch.zeros_like(blocks))
        return (codes * scale).reshape(x.shape),

    for module in model.modules():
        if isinstance(module, (IntxWeightOnlyLinear, IntxMinWeightOnlyLinear)):
            module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("group", [32, 64, 96])
def test_q8_is_int4_times_inputs_rounded_to_int8_blocks(exact_w4a16, group):
    model, ids = _int4(_model(bias=True), group=group), _ids()
    unrounded = _reference(model, ids, 6)
    _round_inputs_to_int8_blocks(model)  # the prefill runs transformers' forward: it rounds there too
    native_q8, want = _native_logits(model, ids, 6, "q8"), _reference(model, ids, 6)
    assert _spread_error(native_q8, want) < 1e-5
    assert _spread_error(native_q8, unrounded) > 1e-4  # the rounding is there to see


def _with_mins(model):
    """Every int4 layer as GGUF's Q4_1 form, w = q * scale + min (min = -zero * scale in fp16)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, IntxWeightOnlyLinear):
            twin = IntxMinWeightOnlyLinear(module.in_features, module.out_features, module.bias is not None, 4,
                                           module.group_size)
            twin.weight_packed.copy_(module.weight_packed)
            twin.weight_scale.copy_(module.weight_scale)
            twin.weight_min.copy_((-module.weight_zero_point.float() * module.weight_scale.float()).half())
            if module.bias is not None:
                twin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, twin)
    return model


def test_int4_with_a_float_min_a_group_as_gguf_q4_1(exact_w4a16):
    model, ids = _with_mins(_int4(_model(bias=True))), _ids()
    assert isinstance(model.model.layers[0].mlp.down_proj, IntxMinWeightOnlyLinear)
    assert _spread_error(_native_logits(model, ids, 4), _reference(model, ids, 4)) < 1e-5
    _round_inputs_to_int8_blocks(model)
    assert _spread_error(_native_logits(model, ids, 4, "q8"), _reference(model, ids, 4)) < 1e-5


def test_greedy_native_generation_is_transformers_generation():
    model, ids = _model(), _ids(5)
    with torch.inference_mode():
        want = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:]
    decoder = NativeDecoder(model, max_len=32)
    logits, got = decoder.prefill(ids), []
    for _ in range(12):
        got.append(int(logits.argmax()))
        logits = decoder.step(got[-1])
    assert got == want.tolist()


def test_what_the_native_step_cannot_run_is_named():
    model = _model()
    bitsmith.run_stages(model, Recipe.model_validate({"version": 2, "name": "w8", "stages": [
        {"quantize": {"rules": [{"targets": [r"re:.*layers\.1\.mlp\.up_proj"],
                                 "scheme": {"weights": {"dtype": "int8"}}}]}}]}))
    assert "layers.1.mlp.up_proj runs on Int8WeightOnlyLinear" in unsupported(model)
    with pytest.raises(ValueError, match="up_proj"):
        NativeDecoder(model)
    three = _model()
    bitsmith.run_stages(three, Recipe.model_validate({"version": 2, "name": "w3", "stages": [
        {"quantize": {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int3", "granularity": 32}}}]}}]}))
    assert "4-bit codes" in unsupported(three)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "Llama-family" in unsupported(gpt2) and "gpt2" in unsupported(gpt2)


def test_a_full_cache_and_a_second_sequence_are_refused():
    model = _model()
    decoder = NativeDecoder(model, max_len=8)
    with pytest.raises(ValueError, match="batch 1"):
        decoder.prefill(_ids(4).repeat(2, 1))
    with pytest.raises(ValueError, match="no room"):
        decoder.prefill(_ids(8))
    decoder.prefill(_ids(6))
    decoder.step(1), decoder.step(2)
    with pytest.raises(ValueError, match="full"):
        decoder.step(3)


def test_the_plain_c_build_computes_what_the_avx2_build_does(tmp_path):
    """A CPU without AVX2 runs the plain C loops (the library built without -march=native): int4 matmuls, float32
    and q8 inputs, zero points and mins, whole 64-column chunks, tails and straddled groups, agree with this build."""
    import ctypes
    import subprocess

    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    target = tmp_path / "plain.so"
    flags = [f for f in native._FLAGS if f != "-march=native"]
    subprocess.run([compiler, *flags, "-o", str(target), str(native._SOURCE)], check=True, capture_output=True)
    plain = ctypes.CDLL(str(target))
    native._declare(plain)
    fast = native.library()
    torch.manual_seed(0)
    for rows, cols, group in [(40, 96, 32), (64, 576, 32), (33, 1536, 128), (16, 160, 96)]:
        packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8)
        scale = torch.rand(rows, -(-cols // group)) + 0.1
        zero = torch.randint(0, 16, scale.shape, dtype=torch.uint8)
        minimum, x = torch.randn(scale.shape), torch.randn(cols)
        for mins in (False, True):
            weight = native.Weight(0, group, rows, cols, packed.data_ptr(), scale.data_ptr(),
                                   None if mins else zero.data_ptr(), None, None,
                                   minimum.data_ptr() if mins else None)
            for q8 in (0, 1):
                ours, theirs = torch.empty(rows), torch.empty(rows)
                fast.bitsmith_matvec(ctypes.byref(weight), x.data_ptr(), ours.data_ptr(), q8, 2)
                plain.bitsmith_matvec(ctypes.byref(weight), x.data_ptr(), theirs.data_ptr(), q8, 2)
                # measured: at most 6.4e-7 of the largest output (the sums in another order)
                assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), (rows, cols, group, mins, q8)
