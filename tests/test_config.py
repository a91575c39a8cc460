import pytest

from nsa_compile import NSAConfig, NSAConfigError


def test_presets_hold_the_published_numbers():
    v = NSAConfig.preset("videonsa")
    assert (v.block_size, v.block_stride, v.selection_block_size, v.top_n, v.window_size) == (64, 64, 64, 32, 256)
    assert (v.gate, v.gate_temperature, v.gate_init) == ("mlp", 0.3, (0.5, 0.5, 0.5))
    p = NSAConfig.preset("paper")
    assert (p.block_size, p.block_stride, p.selection_block_size, p.top_n, p.window_size) == (32, 16, 64, 16, 512)
    assert v.name == "videonsa" and NSAConfig().name == "custom"


def test_dict_round_trip_and_options():
    c = NSAConfig.from_dict({"preset": "paper", "top_n": 4, "modalities": ["video", "image"]})
    assert c.top_n == 4 and c.block_stride == 16 and c.modalities == ("video", "image")
    assert NSAConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0}, "block_size must be an int ≥ 1"),
    ({"window_size": -1}, "window_size must be an int ≥ 0"),
    ({"block_size": 16, "block_stride": 32}, "must not exceed block_size"),
    ({"gate": "softmax"}, "gate must be one of"),
    ({"gate_init": (0.5, 2.0, 0.5)}, "gate_init"),
    ({"modalities": ("audio",)}, "modalities"),
    ({"inner_backend": "tvm"}, "inner_backend"),
    ({"gate_temperature": 0.0}, "gate_temperature"),
])
def test_invalid_fields_are_named(kwargs, match):
    with pytest.raises(NSAConfigError, match=match):
        NSAConfig(**kwargs)


def test_unknown_preset_and_option():
    with pytest.raises(NSAConfigError, match="known presets"):
        NSAConfig.preset("nope")
    with pytest.raises(NSAConfigError, match="unknown NSAConfig option"):
        NSAConfig.from_dict({"topn": 3})


def test_dense_equivalent():
    d = NSAConfig.preset("videonsa").dense_equivalent()
    assert d.gate == "constant" and d.gate_init == (0.0, 1.0, 0.0) and d.top_n >= 1 << 30
