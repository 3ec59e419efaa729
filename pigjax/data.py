"""Training text for language-model runs: paragraphs, a byte-level BPE tokenizer, fixed windows.

- Paragraphs come from RULER's hotpotqa.json (Wikipedia paragraphs, CC BY-SA 4.0, docs/algorithm.md §5) or a
  plain text file (paragraphs separated by blank lines).
- `split` puts a paragraph in validation iff a hash of its text says so (about `val_fraction`),
  so the split does not depend on order and never changes when paragraphs are added.
- `prepare` trains a ByteLevel BPE tokenizer on the training split (end-of-text is the one special
  token), tokenizes both splits and caches all of it in a directory, so it happens once.
- `Packer` concatenates paragraphs (EOS after each) and cuts the stream into windows of
  seq_len + 1 tokens with stride seq_len (inputs are window[:-1], targets window[1:]). The order
  is a function of (seed, step) alone, so a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from pigjax.atomic import atomic_directory
from pigjax.errors import PigjaxError

EOS = "<|endoftext|>"
_CACHE_VERSION = 1


class DataError(PigjaxError):
    """Training data that is missing, malformed or too small for the requested windows."""


def hotpotqa_paragraphs(path=None) -> list[str]:
    """The distinct Wikipedia paragraphs of hotpotqa.json (its `context` entries are
    [title, [sentence, ...]]; a paragraph is its sentences joined), in first-seen order."""
    if path is None:
        from pigjax import assets

        path = assets.eval_data_path("hotpotqa.json")
    try:
        records = json.loads(Path(path).read_text())
        seen, out = set(), []
        for record in records:
            for _title, sentences in record["context"]:
                text = "".join(sentences).strip()
                if text and text not in seen:
                    seen.add(text)
                    out.append(text)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read Wikipedia paragraphs from {path}: {type(e).__name__}: {e}") from None
    return out


def text_file_paragraphs(path) -> list[str]:
    """Paragraphs of a UTF-8 text file, separated by blank lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read paragraphs from {path}: {e}") from None
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def is_validation(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def split(paragraphs: list[str], val_fraction: float = 0.015) -> tuple[list[str], list[str]]:
    """(train, validation), each in the input order; a paragraph's side depends on its text only."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    val = [is_validation(p, val_fraction) for p in paragraphs]
    return [p for p, v in zip(paragraphs, val) if not v], [p for p, v in zip(paragraphs, val) if v]


def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """A ByteLevel BPE tokenizer trained on `texts`, as a transformers PreTrainedTokenizerFast
    whose eos (and pad) token is EOS, so it saves and loads with a pigjax checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise DataError(f"vocab_size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Paragraphs as one flat token array: paragraph i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # [N] int32
    offsets: np.ndarray  # [P + 1] int64

    @property
    def num_paragraphs(self) -> int:
        return len(self.offsets) - 1

    def paragraph(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def encode(cls, tokenizer, texts: list[str]) -> "Tokenized":
        ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        offsets = np.zeros(len(ids) + 1, np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        flat = np.fromiter((t for x in ids for t in x), np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train: Tokenized
    val: Tokenized
    source: str

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def default_cache_dir(source: str, vocab_size: int) -> Path:
    from pigjax import assets

    name = "hotpotqa" if source == "hotpotqa" else Path(source).stem
    return assets.checkpoints_dir() / "data" / f"{name}-bpe{vocab_size}"


def prepare(source: str = "hotpotqa", cache_dir=None, *, vocab_size: int = 8192, val_fraction: float = 0.015,
            log=print) -> Corpus:
    """Paragraphs of `source` ("hotpotqa" or a text file), split, tokenized by a BPE tokenizer
    trained on the training split; everything is cached in `cache_dir` and reused when the source
    file, vocabulary size and validation fraction are unchanged."""
    from transformers import PreTrainedTokenizerFast

    path = None if source == "hotpotqa" else Path(source)
    if path is not None and not path.is_file():
        raise DataError(f"data file {path} does not exist (use 'hotpotqa' or a text file of paragraphs)")
    if path is None:
        from pigjax import assets

        src_file = assets.eval_data_path("hotpotqa.json")
    else:
        src_file = path
    stat = src_file.stat()
    key = {"version": _CACHE_VERSION, "source": str(src_file.resolve()), "size": stat.st_size,
           "vocab_size": vocab_size, "val_fraction": val_fraction}
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(source, vocab_size)
    meta_file = cache_dir / "data.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("key") == key:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(cache_dir / "tokenizer"))
        parts = {}
        for name in ("train", "val"):
            with np.load(cache_dir / f"{name}.npz") as z:
                parts[name] = Tokenized(z["tokens"], z["offsets"])
        return Corpus(tokenizer, parts["train"], parts["val"], str(src_file))

    paragraphs = hotpotqa_paragraphs(src_file) if path is None else text_file_paragraphs(path)
    train, val = split(paragraphs, val_fraction)
    if not train or not val:
        raise DataError(f"{src_file}: {len(paragraphs)} paragraphs give {len(train)} training and "
                        f"{len(val)} validation paragraphs; both must be non-empty")
    log(f"data: {len(train)} training and {len(val)} validation paragraphs from {src_file}; "
        f"training a {vocab_size}-token BPE tokenizer ...")
    tokenizer = train_tokenizer(train, vocab_size)
    parts = {"train": Tokenized.encode(tokenizer, train), "val": Tokenized.encode(tokenizer, val)}
    log(f"data: {len(parts['train'].tokens):,} training and {len(parts['val'].tokens):,} validation tokens; "
        f"cached in {cache_dir}")
    with atomic_directory(cache_dir) as tmp:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for name, part in parts.items():
            np.savez(tmp / f"{name}.npz", tokens=part.tokens, offsets=part.offsets)
        counts = {name: {"paragraphs": part.num_paragraphs, "tokens": int(len(part.tokens))}
                  for name, part in parts.items()}
        (tmp / "data.json").write_text(json.dumps({"key": key, **counts}, indent=2))
    return Corpus(tokenizer, parts["train"], parts["val"], str(src_file))


class Packer:
    """Windows of seq_len + 1 tokens cut with stride seq_len from the paragraphs joined by EOS.

    shuffle=True (training): epoch e joins the paragraphs in the order of a permutation drawn from
    (seed, e) and visits its windows in another such permutation; window g of the run is window
    g mod W of epoch g // W (W windows per epoch), and `batch(step)` holds windows
    step·batch_size ... step·batch_size + batch_size - 1. shuffle=False (validation): one pass in
    paragraph order.
    """

    def __init__(self, data: Tokenized, seq_len: int, eos_id: int, *, seed: int = 0, shuffle: bool = True):
        self.data, self.seq_len, self.eos_id, self.seed, self.shuffle = data, seq_len, eos_id, seed, shuffle
        total = len(data.tokens) + data.num_paragraphs  # one EOS after each paragraph
        self.windows_per_epoch = (total - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise DataError(f"{total} tokens do not fill one window of {seq_len + 1} tokens")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(token stream, window order) of an epoch; the two most recent are kept."""
        if epoch not in self._epochs:
            d, n = self.data, self.data.num_paragraphs
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            eos = np.array([self.eos_id], np.int32)
            stream = np.concatenate([x for i in order for x in (d.paragraph(i), eos)])
            windows = rng.permutation(self.windows_per_epoch) if self.shuffle else np.arange(self.windows_per_epoch)
            self._epochs = {k: v for k, v in self._epochs.items() if k == epoch - 1}
            self._epochs[epoch] = (stream, windows)
        return self._epochs[epoch]

    def window(self, g: int) -> np.ndarray:
        """Window g of the run: [seq_len + 1] int32."""
        epoch, j = divmod(g, self.windows_per_epoch)
        stream, windows = self._epoch(epoch)
        start = int(windows[j]) * self.seq_len
        return stream[start:start + self.seq_len + 1]

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """[batch_size, seq_len + 1] int32: windows step·batch_size ... of the run."""
        return np.stack([self.window(step * batch_size + i) for i in range(batch_size)])
