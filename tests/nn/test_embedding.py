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
