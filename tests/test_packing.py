import pytest
import torch

from lowbit.formats.packing import pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 129])
def test_pack_round_trip_every_width(bits: int, k: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (5, k), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_row_bytes(k, bits))
    assert torch.equal(unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_really_packed(bits: int) -> None:
    # 1024 codes of b bits take exactly 1024*b/8 bytes
    codes = torch.zeros(3, 1024, dtype=torch.uint8)
    assert pack(codes, bits).numel() == 3 * 1024 * bits // 8


def test_nibble_layout_is_conventional() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert pack(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0]]


def test_three_bit_layout_little_endian() -> None:
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    word = 7 | (5 << 21)
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]


def test_unpack_rejects_wrong_row_size() -> None:
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(2, 5, dtype=torch.uint8), 4, 16)
