"""LayerDrop selection against the paper's table (method.md section 3)."""

import pytest

from iisan.core.errors import ConfigError
from iisan.extract.layerdrop import even_blocks, select_layers, spec_tag


@pytest.mark.parametrize(
    "n_layers, blocks",
    [
        (32, [1, 7, 13, 19, 25, 31]),
        (28, [2, 7, 12, 17, 22, 27]),
        (80, [4, 19, 34, 49, 64, 79]),
        (24, [3, 7, 11, 15, 19, 23]),
    ],
)
def test_asymmetric_llm_taps_match_the_authors_runs(n_layers, blocks):
    # an LLM against a 12-layer image encoder keeps 12/2 = 6 taps
    assert even_blocks(n_layers, 6) == blocks
    # hidden_states index = block + 1; the embedding output (index 0) is tapped first by convention
    assert select_layers(n_layers, {"n": 6}) == [0] + [b + 1 for b in blocks]
    assert select_layers(n_layers, {"n": 6, "embedding": False}) == [b + 1 for b in blocks]


def test_symmetric_is_every_second_layer_plus_embedding():
    assert select_layers(12, {}) == [0, 2, 4, 6, 8, 10, 12]  # the authors' VS taps
    assert select_layers(24, {"n": 12, "embedding": False}) == list(range(2, 25, 2))


def test_ablation_schemes():
    assert select_layers(12, {"scheme": "all"}) == list(range(13))
    assert select_layers(12, {"scheme": "all", "embedding": False}) == list(range(1, 13))
    assert select_layers(24, {"scheme": "all", "span": "top", "embedding": False}) == list(range(13, 25))
    assert select_layers(24, {"scheme": "all", "span": "bottom", "embedding": False}) == list(range(1, 13))
    assert select_layers(24, {"n": 6, "span": "top", "embedding": False}) == [14, 16, 18, 20, 22, 24]
    assert select_layers(24, {"n": 6, "span": "bottom", "embedding": False}) == [2, 4, 6, 8, 10, 12]
    for n in (2, 3, 4, 6, 12):  # Table VII's block counts on a 12-layer encoder
        taps = select_layers(12, {"n": n, "embedding": False})
        assert len(taps) == n and taps[-1] == 12
    assert select_layers(12, {"n": 3, "embedding": False}) == [2, 7, 12]
    assert select_layers(12, [0, 5, 12]) == [0, 5, 12]


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"n": 13}, "between 1 and the model's 12 layers"),
        ({"scheme": "odd"}, "layers.scheme='odd'"),
        ({"span": "middle"}, "layers.span='middle'"),
        ([0, 13], "distinct hidden-state indices in 0..12"),
        ([3, 3], "distinct"),
    ],
)
def test_bad_selection_is_rejected(spec, match):
    with pytest.raises(ConfigError, match=match):
        select_layers(12, spec)


def test_spec_tag_needs_no_model():
    assert spec_tag({}) == "evenhalf"
    assert spec_tag({"n": 6}) == "even6"
    assert spec_tag({"scheme": "all"}) == "all"
    assert spec_tag({"n": 6, "span": "top", "embedding": False}) == "even6-top-noemb"
    assert spec_tag([0, 2, 4]) == "x0-2-4"
