"""fastlora's NF4 reading equals bitsandbytes' dequantize_4bit bit for bit (fp32 and half outputs)."""

import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from fastlora.formats.nf4 import NF4_TABLE, nf4_table
from fastlora.functions.nf4_weight import NF4Weight, UnsupportedQuantization


def _params4bit(n, k, blocksize, nested, quant_type="nf4"):
    packed, state = bnbF.quantize_4bit(torch.randn(n, k), blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True, quant_type=quant_type), packed, state


def test_table_matches_bitsandbytes():
    code = bnbF.get_4bit_type("nf4", device="cpu")
    assert torch.equal(nf4_table("cpu"), code.float())
    assert len(NF4_TABLE) == 16


# K not a multiple of the block size makes blocks cross rows; odd N*K leaves the last byte half used.
@pytest.mark.parametrize("n,k", [(7, 100), (5, 33), (16, 64), (3, 130), (1, 1), (9, 257)])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_bit_exact(n, k, blocksize, nested):
    weight, packed, state = _params4bit(n, k, blocksize, nested)
    nf4 = NF4Weight.from_params4bit(weight)
    assert nf4.shape == (n, k) and nf4.absmax.dtype == torch.float32
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        expected = bnbF.dequantize_4bit(packed, state)
        got = nf4.dequantize(dtype)
        assert got.dtype == dtype
        assert torch.equal(got, expected), f"max diff {(got.float() - expected.float()).abs().max()}"


def test_absmax_not_kept_and_read_anew_on_requantization():
    weight, packed, state = _params4bit(8, 128, 64, True)
    first = NF4Weight.from_params4bit(weight)
    # No fp32 copy is kept: the view holds the quant state's own uint8 codes, and each read resolves a fresh tensor.
    assert first.stored_absmax is state.absmax and first.stored_absmax.dtype == torch.uint8
    assert first.absmax is not first.absmax and torch.equal(first.absmax, bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset)

    # Requantize in place (what merging into a 4-bit base does): new codes and a new quant state.
    new_packed, new_state = bnbF.quantize_4bit(torch.randn(8, 128) * 3, blocksize=64, compress_statistics=True, quant_type="nf4")
    weight.data.copy_(new_packed)
    weight.quant_state = new_state
    again = NF4Weight.from_params4bit(weight)
    assert again.stored_absmax is new_state.absmax
    assert torch.equal(again.dequantize(), bnbF.dequantize_4bit(new_packed, new_state))


def test_fp4_is_refused():
    weight, _, _ = _params4bit(4, 64, 64, False, quant_type="fp4")
    with pytest.raises(UnsupportedQuantization, match="fp4"):
        NF4Weight.from_params4bit(weight)


def test_offset_read_once_per_quant_state_when_the_weight_is_rewrapped():
    """Issue 21 item 5: under FSDP2, bitsandbytes wraps the gathered codes in a new Params4bit on every forward
    (fix_4bit_weight_quant_state_from_module) with the module's same quant state. The nested absmax's offset (a
    device tensor: float() of it waits for a GPU) must be read once per quant state, not per call; an in-place change
    of the offset reads it again. The absmax itself is resolved per call (no fp32 copy kept: issue 18 item 4)."""
    import bitsandbytes as bnb

    from fastlora.functions import nf4_weight as nf4
    from tests.conftest import nf4_linear

    weight = nf4_linear(96, 40, bias=False, compute_dtype=torch.float32, nested=True).weight

    def rewrapped():  # what bitsandbytes does per forward under FSDP2
        return bnb.nn.Params4bit(weight.data, requires_grad=False, quant_state=weight.quant_state, bnb_quantized=True,
                                 quant_type="nf4", blocksize=weight.blocksize)  # fmt: skip

    before = nf4._OFFSETS.misses
    first = nf4.NF4Weight.from_params4bit(rewrapped())
    for _ in range(3):
        again = nf4.NF4Weight.from_params4bit(rewrapped())
        assert again.stored_absmax is first.stored_absmax and again.nested == first.nested
    assert nf4._OFFSETS.misses == before + 1
    torch.testing.assert_close(first.dequantize(), bnb.functional.dequantize_4bit(weight.data, weight.quant_state), rtol=0, atol=0)
    with torch.no_grad():
        weight.quant_state.offset.add_(1.0)
    moved = nf4.NF4Weight.from_params4bit(rewrapped())
    # the offset is a float32 tensor: compare with its stored value, not a float64 sum (which rounds differently)
    assert nf4._OFFSETS.misses == before + 2 and moved.nested.offset == weight.quant_state.offset.item()
