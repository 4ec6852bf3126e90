"""KV cache: grows in chunks, knows its length and size, and rewinds exactly."""

import torch

from coinfer.model import KVCache, load_slice


def test_grows_in_chunks_and_counts_bytes():
    c = KVCache(num_layers=3, num_kv_heads=2, head_dim=8, chunk=4)
    assert c.nbytes == 0 and c.length == 0
    c.reserve(3)
    assert c.capacity == 4 and c.nbytes == 2 * 3 * 2 * 4 * 8 * 4
    k = torch.randn(1, 2, 3, 8)
    for layer in range(3):
        ks, vs = c.update(layer, k, -k)
        assert ks.shape == (1, 2, 3, 8)
    c.advance(3)
    c.reserve(5)  # grows to 8, keeps what was written
    assert c.capacity == 8 and c.length == 3
    assert torch.equal(c.k[1][:, :, :3], k) and torch.equal(c.v[2][:, :, :3], -k)
    assert c.used_bytes == 2 * 3 * 2 * 3 * 8 * 4


def test_prefill_in_chunks_and_rewind_give_identical_logits(tiny_dir):
    m = load_slice(tiny_dir)
    ids = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        full = m(ids)
        c = m.new_cache(chunk=8)
        parts = [m(ids[:, a:b], c) for a, b in [(0, 20), (20, 21), (21, 50)]]
        assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5
        c.truncate(21)  # rewind and recompute the rest: same as the first time
        assert torch.equal(m(ids[:, 21:50], c), parts[2])
        assert c.length == 50
