"""FAST action tokenizer (Pertsch et al. 2025): action chunks <-> short sequences of tokens,
so the VLM backbone can learn actions with its ordinary next-token loss.

encode: chunk (H, D), normalised -> DCT-II over time per dim (orthonormal) -> x scale, round ->
        flatten frequency-major (every dim's lowest frequency first) -> one character per integer
        -> BPE ids (variable length; smooth chunks have few non-zero high frequencies, so BPE
        merges the long zero runs)
decode: the inverse. A generated sequence of the wrong length is padded with zeros or cut, so
        decoding model output never fails.
Error bound: each rounded coefficient errs by at most 0.5 / scale and the orthonormal DCT keeps L2
norms, so per dim ||x - decode(encode(x))||_2 <= sqrt(H) * 0.5 / scale, for coefficients inside
the range seen by `fit` (outside it they are clipped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy.fft import dct, idct

CONFIG_NAME = "fast_config.json"
TOKENIZER_NAME = "tokenizer.json"
_FIRST_CHAR = 0x100  # integers map to characters from here, clear of ASCII and whitespace
_MARGIN = 2  # room beyond the fitted coefficient range before clipping


class FastTokenizer:
    """See the module docstring. chunks (N, H, D) float <-> lists of token ids."""

    def __init__(self, horizon: int, action_dim: int, scale: float = 10.0, vocab_size: int = 512):
        self.horizon, self.action_dim, self.scale = horizon, action_dim, scale
        self.requested_vocab_size = vocab_size
        self.low: int | None = None
        self.high: int | None = None
        self._bpe = None

    # 1. the integer stream ----------------------------------------------------------------------
    def _check(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks, dtype=np.float64)
        if chunks.ndim != 3 or chunks.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(
                f"action chunks must be (N, {self.horizon}, {self.action_dim}), got {chunks.shape}"
            )
        if not np.isfinite(chunks).all():
            raise ValueError("action chunks contain NaN or inf")
        return chunks

    def _coefficients(self, chunks: np.ndarray) -> np.ndarray:
        """(N, H, D) -> (N, H * D) rounded integers, frequency-major."""
        coefficients = np.rint(dct(chunks, axis=1, norm="ortho") * self.scale).astype(np.int64)
        return coefficients.reshape(len(chunks), -1)

    def _to_text(self, integers: np.ndarray) -> str:
        clipped = np.clip(integers, self.low, self.high) - self.low
        return "".join(chr(_FIRST_CHAR + int(v)) for v in clipped)

    # 2. fit / encode / decode -------------------------------------------------------------------
    def fit(self, chunks: np.ndarray) -> FastTokenizer:
        from tokenizers import Tokenizer, models, trainers

        integers = self._coefficients(self._check(chunks))
        self.low, self.high = int(integers.min()) - _MARGIN, int(integers.max()) + _MARGIN
        alphabet = [chr(_FIRST_CHAR + v) for v in range(self.high - self.low + 1)]
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=max(self.requested_vocab_size, len(alphabet)),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        bpe.train_from_iterator((self._to_text(row) for row in integers), trainer)
        self._bpe = bpe
        return self

    @property
    def vocab_size(self) -> int:
        self._require_fit()
        return self._bpe.get_vocab_size()

    def _require_fit(self) -> None:
        if self._bpe is None:
            raise RuntimeError("FastTokenizer is not fitted: call fit(chunks) or from_pretrained")

    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """(N, H, D) -> N lists of token ids in [0, vocab_size)."""
        self._require_fit()
        integers = self._coefficients(self._check(chunks))
        return [e.ids for e in self._bpe.encode_batch([self._to_text(row) for row in integers])]

    def decode(self, ids: list[list[int]]) -> np.ndarray:
        """N lists of token ids -> (N, H, D) float32."""
        self._require_fit()
        size = self.horizon * self.action_dim
        rows = []
        for sequence in ids:
            text = "".join(self._bpe.id_to_token(int(i)) or "" for i in sequence)
            integers = np.array([ord(c) - _FIRST_CHAR + self.low for c in text[:size]], np.float64)
            rows.append(np.pad(integers, (0, size - len(integers))))
        coefficients = np.stack(rows).reshape(len(rows), self.horizon, self.action_dim) / self.scale
        return idct(coefficients, axis=1, norm="ortho").astype(np.float32)

    # 3. figures -------------------------------------------------------------------------------
    def quantisation_bound(self) -> float:
        """Bound on the per-dim L2 reconstruction error of one chunk (module docstring)."""
        return float(np.sqrt(self.horizon) * 0.5 / self.scale)

    def compression_ratio(self, chunks: np.ndarray) -> float:
        """Numbers per chunk (H * D) over the mean number of tokens per chunk."""
        lengths = [len(ids) for ids in self.encode(chunks)]
        return self.horizon * self.action_dim / float(np.mean(lengths))

    # 4. persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        self._require_fit()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "horizon": self.horizon,
            "action_dim": self.action_dim,
            "scale": self.scale,
            "vocab_size": self.requested_vocab_size,
            "low": self.low,
            "high": self.high,
        }
        files = {CONFIG_NAME: json.dumps(config, indent=2), TOKENIZER_NAME: self._bpe.to_str()}
        for name, text in files.items():
            tmp = directory / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, directory / name)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FastTokenizer:
        from tokenizers import Tokenizer

        directory = Path(directory)
        for name in (CONFIG_NAME, TOKENIZER_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"FAST tokenizer file missing: {directory / name}")
        config = json.loads((directory / CONFIG_NAME).read_text())
        low, high = config.pop("low"), config.pop("high")
        tokenizer = cls(**config)
        tokenizer.low, tokenizer.high = low, high
        tokenizer._bpe = Tokenizer.from_file(str(directory / TOKENIZER_NAME))
        return tokenizer
