"""The fused native per-token quantization agrees with the eager torch reference."""

import pytest
import torch

from bitsmith.nn import kernels, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler to build the native kernels")


@pytest.mark.parametrize("rows,cols", [(1, 7), (37, 384), (600, 1536)])
def test_quantize_per_token_matches_eager(rows, cols):
    torch.manual_seed(0)
    x = torch.randn(rows, cols) * 5
    codes, scale = native.quantize_per_token_u8(x)
    ref_codes, ref_scale = kernels.quantize_per_token(x)
    assert torch.equal(scale, ref_scale)
    # both round half to even; they may differ by one code only where x * 127 / amax lands on a tie
    diff = (codes.to(torch.int16) - ref_codes.to(torch.int16)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_zero_rows_and_extremes():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    codes, scale = native.quantize_per_token_u8(x)
    assert codes.tolist() == [[128, 128, 128], [255, 1, 192]]
    assert scale[0, 0] > 0  # floored, never a division by zero


@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_rows_add_bias(with_bias):
    out = torch.randn(50, 33)
    scale, bias = torch.rand(50, 1), torch.randn(33) if with_bias else None
    expected = out * scale + (bias if with_bias else 0)
    assert torch.allclose(native.scale_rows_add_bias(out.clone(), scale, bias), expected, atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("BITSMITH_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert not native.available()
    finally:
        monkeypatch.delenv("BITSMITH_NATIVE")
        native._library.cache_clear()
    assert native.available()


@pytest.mark.parametrize("rows,cols", [(1, 7), (37, 384)])
def test_per_token_split_matches_eager_split(rows, cols):
    torch.manual_seed(0)
    x = torch.randn(rows, cols) * 5
    codes, scale = native.quantize_per_token_split_u8(x)
    eager_codes, eager_scale = native.quantize_per_token_u8(x)
    assert torch.equal(scale, eager_scale)
    assert torch.equal(codes, kernels.split_codes(eager_codes, 128))


@pytest.mark.parametrize("zero,block,smooth", [(128, 16, False), (37, 16, False), (200, 8, True)])
def test_static_split_matches_eager_split(zero, block, smooth):
    torch.manual_seed(0)
    x = torch.randn(9, 32) * 3
    multiplier = torch.rand(32) + 0.5 if smooth else None
    scale = 0.05
    codes = native.quantize_static_split_u8(x, scale, zero, block, multiplier)
    plain = torch.clamp(torch.round(x * (multiplier if smooth else 1.0 / scale)) + zero, 0, 255).to(torch.uint8)
    assert torch.equal(codes, kernels.split_codes(plain, zero, block))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols,group", [(64, 32), (200, 64)])
def test_dequantize_packed_matches_affine(bits, cols, group):
    from bitsmith.formats.affine import dequantize_affine
    from bitsmith.formats.packing import pack_codes

    torch.manual_seed(bits)
    rows, groups = 5, -(-cols // group)
    codes = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8)
    scale = torch.rand(rows, groups) + 0.1
    zero = torch.randint(0, 2**bits, (rows, groups), dtype=torch.uint8)
    out = native.dequantize_packed(pack_codes(codes.flatten(), bits), bits, rows, cols, group, scale, zero)
    assert torch.equal(out, dequantize_affine(codes, (1, group), scale, zero.to(torch.int32)))


def test_build_key_status_and_a_corrupt_cache(tmp_path, monkeypatch):
    """The build is keyed by source, compiler and CPU flags; a cached library whose bytes do not match
    its recorded checksum is rebuilt, never loaded; a failing compiler's error is reported."""
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available() and "built with" in native.status()
        (built,) = (tmp_path / "kernels").glob("quant-*.so")
        assert (built.parent / (built.name + ".sha256")).read_text().strip() == native._sha256(built)
        built.unlink()  # a new file: the loaded library keeps its own pages
        built.write_bytes(b"not a library")
        native._library.cache_clear()
        assert native.available()  # rebuilt: loading the corrupt file would have failed
        broken = tmp_path / "cc"
        broken.write_text("#!/bin/sh\necho 'quant.c:1:1: error: this compiler is broken' >&2\nexit 1\n")
        broken.chmod(0o755)
        monkeypatch.setenv("CC", str(broken))
        native._library.cache_clear()
        assert not native.available()
        assert native.status() == "build failed: cc failed: quant.c:1:1: error: this compiler is broken"
    finally:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.delenv("BITSMITH_CACHE")
        native._library.cache_clear()
    assert native.available()
