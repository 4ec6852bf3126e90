"""Streaming detokenization with stop strings, and parameter-sharing slice views."""

import pytest
import torch

from coinfer.model import load_slice
from coinfer.model.tokenizer import Tokenizer
from device_agent.text import TextAssembler


class FakeTokenizer:
    """Token i decodes to PIECES[i]: lets a test choose exactly where text splits."""

    PIECES = ["Hel", "lo", " wor", "ld", "!", " E", "ND", " more"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def run(stop, ids=range(8)):
    t = TextAssembler(FakeTokenizer(), stop)
    out = [t.push(i) for i in ids]
    return out, t.flush(), t.stopped


def test_no_stop_strings_streams_everything():
    out, rest, stopped = run([])
    assert "".join(out) == "Hello world! END more" and rest == "" and not stopped


def test_stop_string_across_tokens_is_held_back_then_dropped():
    out, rest, stopped = run([" END"])
    assert "".join(out) == "Hello world!" and stopped and rest == ""
    assert out[5] == ""  # " E" could start " END": held back, never emitted


def test_partial_match_that_fails_is_released():
    out, rest, stopped = run(["worm"])
    assert "".join(out) + rest == "Hello world! END more" and not stopped


def test_earliest_of_several_stops_wins():
    out, _, stopped = run(["more", "ld!"])
    assert "".join(out) == "Hello wor" and stopped


def test_multibyte_characters_are_emitted_whole(real_tokenizer_or_skip):
    tok = real_tokenizer_or_skip
    text = "Grüße aus Zürich: 東京 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    t = TextAssembler(tok)
    pieces = [t.push(i) for i in ids]
    assert "".join(pieces) + t.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture
def real_tokenizer_or_skip(real_model_dir):
    return Tokenizer(real_model_dir)


@pytest.mark.parametrize("start,stop", [(0, 0), (0, 2), (2, 6), (3, 3), (0, 6), (6, 6)])
def test_narrow_view_shares_parameters_and_matches_a_loaded_slice(tiny_dir, start, stop):
    whole = load_slice(tiny_dir)
    view = whole.narrow(start, stop)
    loaded = load_slice(tiny_dir, start, stop, embed=start == 0, head=stop == 6)
    assert (view.has_embed, view.has_head, view.num_layers) == (loaded.has_embed, loaded.has_head, stop - start)
    whole_ptrs = {p.data_ptr() for p in whole.parameters()}
    assert all(p.data_ptr() in whole_ptrs for p in view.parameters())
    x = torch.randint(0, 96, (1, 7)) if start == 0 else torch.randn(1, 7, 64)
    with torch.inference_mode():
        assert torch.equal(view(x, view.new_cache()), loaded(x, loaded.new_cache()))


def test_narrow_outside_the_slice_is_refused(tiny_dir):
    part = load_slice(tiny_dir, 2, 5, embed=False, head=False)
    with pytest.raises(ValueError):
        part.narrow(1, 4)
