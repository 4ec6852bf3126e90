"""One encoded frame per codec (3 rows of a random hidden state of the tiny model's width), for
fuzzing the decoder and the edge."""

from __future__ import annotations

import torch

from coinfer.codec import CODECS, encode

D = 64  # the tiny model's hidden size
FRAMES = {name: encode(torch.randn(3, D, generator=torch.Generator().manual_seed(1)) * 3, name) for name in CODECS}
