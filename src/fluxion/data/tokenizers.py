"""Build small T5 / CLIP tokenizers offline (no downloads).

FLUX.1 conditions on two text encoders: a T5 (sentencepiece unigram tokenizer,
``tokenizer_2`` in diffusers folders) and a CLIP text model (byte-level BPE,
``tokenizer``).  Tests and toy checkpoints need tokenizers of the same *kind*
without fetching the real vocabularies, so this module builds them from
scratch:

* :func:`build_t5_tokenizer` trains a tiny sentencepiece unigram model
  (pad=0, eos=1, unk=2, no bos, as T5 does) and wraps it as a transformers T5
  tokenizer saved with ``save_pretrained``.
* :func:`build_clip_tokenizer` writes a byte-level CLIP BPE vocabulary
  (``vocab.json`` + ``merges.txt``) laid out like OpenAI's: 256 byte symbols,
  the same 256 with ``</w>``, merged tokens, then ``<|startoftext|>`` and
  ``<|endoftext|>`` as the last two ids (so the end-of-text id is the largest
  id, as in the real CLIP vocabulary).

It also contains a small pure-python reference of the CLIP BPE algorithm
(:func:`clip_bpe_reference_encode`), handy for checking any CLIP tokenizer
implementation against first principles.
"""

from __future__ import annotations

import io
import json
import random
import re
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "default_captions",
    "build_t5_tokenizer",
    "train_sentencepiece_unigram",
    "build_clip_tokenizer",
    "clip_bpe_vocab_and_merges",
    "clip_special_ids",
    "t5_special_ids",
    "bytes_to_unicode",
    "clip_bpe_reference_encode",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# CLIP's pre-tokenisation pattern (OpenAI simple_tokenizer / transformers).
_CLIP_PAT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""


# --------------------------------------------------------------------------------------
# corpus helper
# --------------------------------------------------------------------------------------

_ADJ = [
    "red", "blue", "green", "golden", "tiny", "huge", "fluffy", "shiny", "ancient", "modern",
    "wooden", "glass", "neon", "misty", "sunny", "dark", "bright", "quiet", "wild", "cozy",
]
_NOUN = [
    "cat", "dog", "robot", "castle", "forest", "river", "mountain", "city", "car", "bird",
    "flower", "dragon", "house", "ocean", "bridge", "lamp", "book", "garden", "ship", "tower",
]
_PLACE = [
    "on a table", "in the snow", "under the stars", "at sunset", "in a field", "near the sea",
    "on a hill", "inside a room", "in the rain", "by a lake", "in the desert", "on the moon",
]
_STYLE = [
    "a photo of", "a painting of", "an illustration of", "a close-up of", "a sketch of",
    "a render of", "a watercolor of", "a portrait of",
]
_EXTRA = [
    "", "", "highly detailed", "soft light", "4k", "cinematic", "pastel colors", "wide angle",
    "sharp focus", "oil on canvas",
]


def default_captions(n: int = 48, seed: int = 0) -> list[str]:
    """A deterministic list of ``n`` random-ish image captions (a tokenizer training corpus)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cap = f"{rng.choice(_STYLE)} a {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PLACE)}"
        if rng.random() < 0.5:
            cap += f" and a {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
        extra = rng.choice(_EXTRA)
        if extra:
            cap += f", {extra}"
        out.append(cap)
    return out


# --------------------------------------------------------------------------------------
# T5 (sentencepiece unigram)
# --------------------------------------------------------------------------------------


def train_sentencepiece_unigram(corpus: Sequence[str], vocab_size: int = 200) -> tuple[bytes, int]:
    """Train a T5-style sentencepiece unigram model in memory.

    Returns ``(model_proto_bytes, actual_vocab_size)``. Special ids follow T5:
    pad=0 (``<pad>``), eos=1 (``</s>``), unk=2 (``<unk>``), no bos.  If the corpus
    is too small for ``vocab_size`` the size is lowered to the largest value
    sentencepiece accepts.
    """
    import sentencepiece as spm

    sentences = [s for s in corpus if s and s.strip()]
    if not sentences:
        raise ValueError("corpus is empty")

    def _train(vs: int) -> bytes:
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            vocab_size=vs,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            character_coverage=1.0,
            byte_fallback=False,
            num_threads=1,
            minloglevel=2,
        )
        return buf.getvalue()

    vs = int(vocab_size)
    last_err: Exception | None = None
    for _ in range(8):
        try:
            proto = _train(vs)
            break
        except RuntimeError as err:  # "Vocabulary size too high (200). Please set it to a value <= 83."
            last_err = err
            m = re.search(r"<=\s*(\d+)", str(err))
            new_vs = int(m.group(1)) if m else vs // 2
            if new_vs >= vs or new_vs < 4:
                raise
            vs = new_vs
    else:  # pragma: no cover - defensive
        raise RuntimeError(f"could not train sentencepiece model: {last_err}")

    sp = spm.SentencePieceProcessor(model_proto=proto)
    return proto, sp.get_piece_size()


def build_t5_tokenizer(corpus: Sequence[str] | None, out_dir, vocab_size: int = 200, model_max_length: int = 512):
    """Train a tiny T5 sentencepiece tokenizer on ``corpus`` and save it to ``out_dir``.

    ``out_dir`` ends up with ``spiece.model`` (the raw sentencepiece model),
    ``tokenizer.json`` and ``tokenizer_config.json``, loadable offline with
    ``transformers.T5TokenizerFast.from_pretrained(out_dir)`` or
    ``AutoTokenizer.from_pretrained(out_dir)``.  No sentinel ``<extra_id_*>``
    tokens are added (``extra_ids=0``), so ``len(tokenizer)`` equals the
    sentencepiece vocabulary size and can be used as the T5 ``vocab_size``.
    """
    from transformers import T5TokenizerFast

    if corpus is None:
        corpus = default_captions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto, _ = train_sentencepiece_unigram(list(corpus), vocab_size)
    (out_dir / "spiece.model").write_bytes(proto)
    # Load through the directory (the portable path across transformers 4.x / 5.x:
    # the sentencepiece model is converted to a `tokenizers` Unigram model).
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(proto)
        tok = T5TokenizerFast.from_pretrained(tmp, extra_ids=0, model_max_length=model_max_length)
        tok.save_pretrained(str(out_dir))
    # reload from the final folder so the returned object is exactly what callers will load
    return T5TokenizerFast.from_pretrained(str(out_dir))


def t5_special_ids(tokenizer) -> tuple[int, int, int]:
    """(pad_id, eos_id, unk_id) of a T5 tokenizer; (0, 1, 2) for those built here."""
    return tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id


# --------------------------------------------------------------------------------------
# CLIP (byte-level BPE)
# --------------------------------------------------------------------------------------


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_symbols(word: str) -> list[str]:
    b2u = bytes_to_unicode()
    chars = [b2u[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def _bpe_word(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """OpenAI's CLIP BPE: repeatedly merge the lowest-ranked adjacent pair (all occurrences)."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        first, second = best
        new_word: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                new_word.append(first + second)
                i += 2
            else:
                new_word.append(word[i])
                i += 1
        word = new_word
    return word


def clip_bpe_vocab_and_merges(words: Iterable[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level CLIP BPE in which every listed word is one token.

    Order of ids: 256 byte symbols, the 256 byte symbols with ``</w>``, one token
    per merge (in merge order), then ``<|startoftext|>`` and ``<|endoftext|>``.
    Words are lower-cased; they must be made of letters only (CLIP's
    pre-tokeniser splits digits and punctuation into separate pieces).
    """
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab_list)

    for raw in words or []:
        word = raw.strip().lower()
        if not word:
            continue
        if not re.fullmatch(r"[^\W\d_]+", word):
            raise ValueError(f"CLIP tokenizer words must be letters only, got {raw!r}")
        # segmentation with the merges so far (new merges rank after all existing ones,
        # so earlier words keep tokenising to a single token)
        segs = _bpe_word(_word_symbols(word), ranks)
        cur = segs[0]
        for nxt in segs[1:]:
            pair = (cur, nxt)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            cur = cur + nxt
            if cur not in known:
                known.add(cur)
                vocab_list.append(cur)
        final = _bpe_word(_word_symbols(word), ranks)
        if len(final) != 1:  # pragma: no cover - degenerate interaction between words
            raise ValueError(f"could not make {word!r} a single CLIP token (got {final})")

    vocab_list += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(out_dir, words: Sequence[str] | None = None, model_max_length: int = 77):
    """Write a byte-level CLIP BPE tokenizer to ``out_dir`` and return it loaded.

    ``out_dir`` gets ``vocab.json`` + ``merges.txt`` (the classic CLIP files) plus
    what ``save_pretrained`` writes (``tokenizer_config.json``, ``tokenizer.json``
    with recent transformers).  Pad token is ``<|endoftext|>`` as in FLUX's CLIP
    tokenizer; bos/eos are the last two ids (see :func:`clip_special_ids`).
    """
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab_and_merges(words)

    def _write_files(d: Path) -> None:
        with open(d / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(d / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for a, b in merges:
                f.write(f"{a} {b}\n")

    kwargs = dict(
        model_max_length=model_max_length,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _write_files(Path(tmp))
        tok = CLIPTokenizer.from_pretrained(tmp, **kwargs)
        tok.save_pretrained(str(out_dir))
    # make sure the classic files are there (and are ours) whatever save_pretrained wrote
    _write_files(out_dir)
    return CLIPTokenizer.from_pretrained(str(out_dir))


def clip_special_ids(tokenizer) -> tuple[int, int, int]:
    """(bos_id, eos_id, pad_id) of a CLIP tokenizer, for a consistent ``CLIPTextConfig``."""
    return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id


def clip_bpe_reference_encode(
    text: str,
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    add_special_tokens: bool = True,
) -> list[int]:
    """Pure-python CLIP tokenisation (OpenAI ``simple_tokenizer`` algorithm, without ftfy).

    Whitespace is collapsed and text lower-cased; words are split with CLIP's
    regex, mapped byte-wise to unicode symbols, the last symbol suffixed with
    ``</w>``, and BPE-merged by rank.  Symbols missing from ``vocab`` map to
    the unk (``<|endoftext|>``) id.
    """
    ranks = {tuple(m): i for i, m in enumerate(merges)}
    b2u = bytes_to_unicode()
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    unk = vocab[CLIP_EOS]
    ids: list[int] = []
    for piece in re.findall(_CLIP_PAT, text):
        if piece in (CLIP_BOS, CLIP_EOS):
            ids.append(vocab[piece])
            continue
        chars = [b2u[b] for b in piece.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + "</w>"]
        ids.extend(vocab.get(s, unk) for s in _bpe_word(symbols, ranks))
    if add_special_tokens:
        ids = [vocab[CLIP_BOS]] + ids + [vocab[CLIP_EOS]]
    return ids


def build_word_t5_tokenizer(words: Sequence[str], out_dir, model_max_length: int = 512):
    """A T5 (unigram, metaspace) tokenizer whose pieces are whole words, with single characters as fallback.

    For a small closed vocabulary (fluxion-mini's captions) sentencepiece training prunes towards characters;
    whole-word pieces give the small text encoder one token per word. Built with `tokenizers` and saved as
    tokenizer.json, which `T5TokenizerFast.from_pretrained` / `AutoTokenizer` load offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    word_pieces = [("\u2581" + w, -1.0) for w in sorted(set(words))]
    chars = sorted({ch for w in words for ch in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    char_pieces = [("\u2581", -10.0)] + [(c, -10.0) for c in chars]
    tok = Tokenizer(models.Unigram(specials + word_pieces + char_pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
    fast.save_pretrained(str(out_dir))
    return T5TokenizerFast.from_pretrained(str(out_dir))
