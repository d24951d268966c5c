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

from pathlib import Path

import numpy as np
from diffusers.configuration_utils import ConfigMixin, register_to_config
from scipy.fft import dct, idct

TOKENIZER_NAME = "tokenizer.json"
_FIRST_CHAR = 0x100  # integers map to characters from here, clear of ASCII and whitespace
_MARGIN = 2  # room beyond the fitted coefficient range before clipping


class FastTokenizer(ConfigMixin):
    """See the module docstring. chunks (N, H, D) float <-> lists of token ids.

    Config is this signature (`.config.x`), saved by `save_pretrained` as `fast_config.json`
    (diffusers' `ConfigMixin`) beside the BPE's `tokenizer.json`. `vocab_size` is the BPE's
    requested size (`.vocab_size` is the fitted one); `low` and `high`, the range of rounded
    coefficients the BPE's alphabet covers, are set by `fit`."""

    config_name = "fast_config.json"

    @register_to_config
    def __init__(
        self,
        horizon: int,
        action_dim: int,
        scale: float = 10.0,
        vocab_size: int = 512,
        low: int | None = None,
        high: int | None = None,
    ):
        self._bpe = None

    # 1. the integer stream ----------------------------------------------------------------------
    def _check(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks, dtype=np.float64)
        shape = (self.config.horizon, self.config.action_dim)
        if chunks.ndim != 3 or chunks.shape[1:] != shape:
            raise ValueError(
                f"action chunks must be (N, {shape[0]}, {shape[1]}), got {chunks.shape}"
            )
        if not np.isfinite(chunks).all():
            raise ValueError("action chunks contain NaN or inf")
        return chunks

    def _coefficients(self, chunks: np.ndarray) -> np.ndarray:
        """(N, H, D) -> (N, H * D) rounded integers, frequency-major."""
        scaled = dct(chunks, axis=1, norm="ortho") * self.config.scale
        coefficients = np.rint(scaled).astype(np.int64)
        return coefficients.reshape(len(chunks), -1)

    def _to_text(self, integers: np.ndarray) -> str:
        low, high = self.config.low, self.config.high
        clipped = np.clip(integers, low, high) - low
        return "".join(chr(_FIRST_CHAR + int(v)) for v in clipped)

    # 2. fit / encode / decode -------------------------------------------------------------------
    def fit(self, chunks: np.ndarray) -> FastTokenizer:
        from tokenizers import Tokenizer, models, trainers

        integers = self._coefficients(self._check(chunks))
        low, high = int(integers.min()) - _MARGIN, int(integers.max()) + _MARGIN
        self.register_to_config(low=low, high=high)
        alphabet = [chr(_FIRST_CHAR + v) for v in range(high - low + 1)]
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=max(self.config.vocab_size, len(alphabet)),
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
        horizon, action_dim, low = self.config.horizon, self.config.action_dim, self.config.low
        size = horizon * action_dim
        rows = []
        for sequence in ids:
            text = "".join(self._bpe.id_to_token(int(i)) or "" for i in sequence)
            integers = np.array([ord(c) - _FIRST_CHAR + low for c in text[:size]], np.float64)
            rows.append(np.pad(integers, (0, size - len(integers))))
        coefficients = np.stack(rows).reshape(len(rows), horizon, action_dim) / self.config.scale
        return idct(coefficients, axis=1, norm="ortho").astype(np.float32)

    # 3. figures -------------------------------------------------------------------------------
    def quantisation_bound(self) -> float:
        """Bound on the per-dim L2 reconstruction error of one chunk (module docstring)."""
        return float(np.sqrt(self.config.horizon) * 0.5 / self.config.scale)

    def compression_ratio(self, chunks: np.ndarray) -> float:
        """Numbers per chunk (H * D) over the mean number of tokens per chunk."""
        lengths = [len(ids) for ids in self.encode(chunks)]
        return self.config.horizon * self.config.action_dim / float(np.mean(lengths))

    # 4. persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        self._require_fit()
        directory = Path(directory)
        self.save_config(directory)
        self._bpe.save(str(directory / TOKENIZER_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FastTokenizer:
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not (directory / TOKENIZER_NAME).is_file():
            raise FileNotFoundError(f"FAST tokenizer file missing: {directory / TOKENIZER_NAME}")
        tokenizer = cls.from_config(cls.load_config(directory))
        tokenizer._bpe = Tokenizer.from_file(str(directory / TOKENIZER_NAME))
        return tokenizer
