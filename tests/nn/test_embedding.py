import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.nn.embedding import HalfEmbedding, QuantizedEmbedding
from conftest import sqnr_db


def test_int8_embedding_rows_match_dequantized_table():
    torch.manual_seed(0)
    table = nn.Embedding(1000, 64, padding_idx=0)
    module = QuantizedEmbedding.from_quantized(quantize_weight_rtn(table.weight, 8, "channel", True), 0)
    ids = torch.randint(0, 1000, (4, 9))
    assert torch.equal(module(ids), module.dequantize()[ids])
    assert sqnr_db(table(ids), module(ids)) > 42.0  # 44.4
    assert module.weight_codes.dtype == torch.uint8  # 1 byte per value on disk


def test_int4_embedding_is_packed():
    torch.manual_seed(0)
    table = nn.Embedding(100, 64)
    module = QuantizedEmbedding.from_quantized(quantize_weight_rtn(table.weight, 4, "channel", False), None)
    assert module.weight_packed.numel() == 100 * 64 // 2
    ids = torch.arange(100)
    assert sqnr_db(table(ids), module(ids)) > 19.0  # 20.8


def test_half_embedding():
    table = nn.Embedding(50, 16)
    ids = torch.arange(50)
    assert sqnr_db(table(ids), HalfEmbedding.from_float(table, "bf16")(ids)) > 53.0  # 55.5


def test_grouped_int4_embedding_beats_per_row_and_matches_its_dequantized_table():
    """One scale and zero point per 32 values of a row: rows whose halves differ in range keep more."""
    torch.manual_seed(0)
    table = nn.Embedding(200, 96)
    with torch.no_grad():
        table.weight[:, :32] *= 8.0  # a wide first group: a per-row range spends the codes on it
        table.weight[7] = 0.0  # a padding row: its groups' scales stay positive in fp16
    ids = torch.randint(0, 200, (3, 11))
    per_row = QuantizedEmbedding.from_quantized(quantize_weight_rtn(table.weight, 4, "channel", False), None)
    grouped = QuantizedEmbedding.from_quantized(quantize_weight_rtn(table.weight, 4, 32, False), None)
    assert grouped.weight_scale.shape == (200, 3) and grouped.weight_packed.numel() == 200 * 96 // 2
    assert torch.equal(grouped(ids), grouped.dequantize()[ids])
    assert sqnr_db(table(ids), grouped(ids)) > sqnr_db(table(ids), per_row(ids)) + 3.0  # 23.1 against 18.4
    assert grouped.scheme == "int4 g32" and "per-32 scale" in grouped.kernel()
    assert grouped.weight_scale.dtype == torch.float16 and bool((grouped.weight_scale > 0).all())
    assert grouped.storage_problem() is None and not grouped.dequantize()[7].any()


def test_grouped_embedding_refuses_a_group_that_does_not_divide_the_row():
    import pytest

    with pytest.raises(ValueError, match="groups of 40 do not divide the embedding's 96 values"):
        QuantizedEmbedding(10, 96, 4, None, 40)
