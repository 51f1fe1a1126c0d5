"""LN tuning's query cache: keys computed where the batch lives (exact integer projections), the same queries."""

import hashlib

import torch

from retain.config import load_config
from retain.engine import build_run, run
from retain.models import query
from retain.models.query import image_keys, key_weights

CPU = torch.device("cpu")


def _method(tiny, **extra):
    cfg = load_config(None, tiny(**{"method.name": "ln_tuning", **extra}))
    torch.manual_seed(0)
    scenario, method = build_run(cfg, CPU)
    method.setup()
    return scenario, method


def _images(scenario, n=6):
    return torch.stack([scenario.tasks[1].test[i][0] for i in range(n)])  # (n, 3, 16, 16)


def _blake2b(x):
    """The previous key: a content hash of each sample's bytes on the host."""
    raw = x.cpu().contiguous().flatten(1).view(torch.uint8).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in raw]


def test_cached_queries_equal_the_uncached_ones_and_hit_in_any_order_or_batch_size(tiny):
    scenario, method = _method(tiny)
    x = _images(scenario)
    expected = method.queries(x, cache=False)
    assert method.frozen_images == len(x)
    assert torch.equal(method.queries(x), expected) and method.frozen_images == 2 * len(x)  # first sight: misses
    perm = torch.tensor([4, 0, 5, 2])
    assert torch.equal(method.queries(x[perm]), expected[perm])  # another order and batch size
    for i in range(len(x)):
        assert torch.equal(method.queries(x[i : i + 1]), expected[i : i + 1])  # batch of one
    assert torch.equal(method.queries(torch.cat([x, x])), torch.cat([expected, expected]))
    assert method.frozen_images == 2 * len(x) and len(method.query_cache) == len(x)  # all hits


def test_one_pixel_changed_by_one_level_misses(tiny):
    scenario, method = _method(tiny)
    x = _images(scenario)
    method.queries(x)
    y = x.clone()
    y[3, 1, 7, 9] += 1 / 255
    seen = method.frozen_images
    out = method.queries(y)
    assert method.frozen_images == seen + 1 and len(method.query_cache) == len(x) + 1  # only the changed image
    assert torch.equal(out, method.queries(y, cache=False))
    assert not torch.equal(out[3], method.queries(x[3:4])[0])


def test_keys_do_not_touch_the_global_rng():
    x = torch.rand(5, 3, 8, 8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    weights = {}
    image_keys(x, weights)  # draws the projections
    assert len(weights) == 1 and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(key_weights(384, CPU), key_weights(384, CPU))  # fixed, whatever the global seed


def test_keys_are_exact_whatever_the_batch_chunking_and_dtype(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 224, 224, generator=gen)
    x[0].view(torch.int32).fill_(-(2**31) + 2**15)  # bits 0x80008000: every word -2^15, the largest |key|
    weights = {}
    keys = image_keys(x, weights)
    words = x.flatten(1).view(torch.int16).long()  # (B, n)
    (w,) = weights.values()  # (n, k)
    bits = 38 - (words.shape[1] - 1).bit_length()
    assert w.shape[1] * bits >= 112 and w.max() < 2**bits and w.shape[1] == 6  # 224 px float32: b = 19, k = 6
    assert (words[0] == -(2**15)).all()
    exact = words @ w.long()  # int64: no rounding anywhere
    head = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    assert keys == [head + row.tobytes() for row in exact.double().numpy()]
    assert [image_keys(x[i : i + 1], weights)[0] for i in range(len(x))] == keys  # batch of one
    assert image_keys(x.flip(0), weights) == keys[::-1]
    monkeypatch.setattr(query, "KEY_CHUNK", {"cpu": 1000})  # many chunks, another summation order
    assert image_keys(x, weights) == keys
    assert image_keys(x.contiguous(memory_format=torch.channels_last), weights) == keys  # keyed in logical order
    assert len(set(keys)) == len(keys)
    # the same values in another dtype are another image; uint8 images with an odd byte count are keyed by bytes
    assert image_keys(x[:2].double(), weights)[0] != keys[0]
    odd = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=gen)
    assert len(set(image_keys(torch.cat([odd, odd]), weights))) == 4


def test_hits_and_misses_are_the_content_hashs(tiny):
    """Same pattern of hits as the previous key (blake2b of the bytes), so the same queries are returned."""
    scenario, method = _method(tiny)
    x = torch.cat([_images(scenario), _images(scenario)[:3]])
    x[7, 0, 0, 0] = x[7, 0, 0, 0].nextafter(torch.tensor(2.0))  # one ulp
    x[8, 2, 15, 15] = -x[8, 2, 15, 15]
    new = image_keys(x, method.query.key_weights)
    old = _blake2b(x)
    assert [new.index(k) for k in new] == [old.index(k) for k in old]


def test_run_metrics_equal_with_and_without_the_cache(tiny):
    over = {"method.name": "ln_tuning", "train.optimizer": "adam"}
    cached = run(load_config(None, tiny(name="cached", **over)), log=lambda *_: None)
    plain = run(load_config(None, tiny(name="plain", **over, **{"method.cache_queries": "false"})),
                log=lambda *_: None)  # fmt: skip
    for key in ("accuracy_matrix", "task_id_accuracy"):
        assert cached[key] == plain[key], key
