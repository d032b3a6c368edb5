"""SentencePiece subword models: training, loading, batch encode/decode, fingerprint.

Special ids are fixed for every model mtkit trains, so that tensors can be padded with zeros:
    PAD_ID = 0 (<pad>)   UNK_ID = 1 (<unk>)   BOS_ID = 2 (<s>)   EOS_ID = 3 (</s>)
A joint vocabulary is one model for both languages (files spm.model/.vocab); separate vocabularies
are src.model and tgt.model.

A model brought in from elsewhere (mtkit import marian) may number its vocabulary its own way: a
Marian model has a source and a target SentencePiece model whose pieces map, through one shared
vocabulary (vocab.json), to ids that are not SentencePiece's, with its own special ids (</s> is 0,
<pad> is the last id and also starts the decoder, as Marian does). The Tokenizer then carries that
vocabulary (file vocab.json) and maps pieces to its ids; everything else asks the tokenizer for
ids and pieces and never assumes the numbers above.
"""

import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from mtkit.errors import MtkitError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Tab, line breaks (those str.splitlines knows: \n \r \v \f \x1c-\x1e \x85 U+2028 U+2029) and
# the other C0/C1 controls, with any spaces around them: what may not appear inside an output line.
_BREAKS = re.compile(r" *[\x00-\x1f\x7f-\x9f\u2028\u2029][\x00-\x20\x7f-\x9f\u2028\u2029]*")


def train_model(sentences: Iterable[str], *, model_type: str, vocab_size: int, character_coverage: float,
                byte_fallback: bool, threads: int, what: str = "", symbols: Sequence[str] = ()) -> bytes:
    """Train a SentencePiece model; returns the serialized model. symbols: pieces that are always
    whole (target-language tags), never cut or merged."""
    out = io.BytesIO()
    extra = {"user_defined_symbols": list(symbols)} if symbols else {}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=out, model_type=model_type,
            vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=byte_fallback,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            # mtkit normalizes text itself (corpus.normalize); SentencePiece's NFKC would change
            # characters the references keep, and detokenized output would differ from them.
            normalization_rule_name="identity",
            input_sentence_size=0,  # the caller samples, reproducibly
            num_threads=threads, minloglevel=2, **extra,
        )
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size, what) from None
    return out.getvalue()


def _training_error(message: str, vocab_size: int, what: str) -> MtkitError:
    detail = re.sub(r"^.*?\] ", "", message.strip())  # drop SentencePiece's source-location prefix
    too_high = re.search(r"<= (\d+)", detail)
    on = f" on {what}" if what else ""
    if "too high" in detail and too_high:
        return MtkitError(f"tokenizer.vocab_size {vocab_size} cannot be reached{on}: "
                          f"this corpus supports at most {too_high.group(1)} pieces",
                          hint=f"set tokenizer.vocab_size to {too_high.group(1)} or less")
    return MtkitError(f"SentencePiece training failed{on}: {detail}",
                      hint="check tokenizer.vocab_size and tokenizer.character_coverage")


class Tokenizer:
    """The source and target subword models of one experiment (the same model when joint), and
    the special ids."""

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None, vocab: bytes | None = None):
        """vocab: a vocabulary of the model's own that both sides' pieces map into, as the JSON of
        {piece: id} (a Marian model's vocab.json); without it the ids are SentencePiece's."""
        self.joint = tgt_model is None
        self.protos = (src_model,) if self.joint else (src_model, tgt_model)  # what checkpoints embed
        self.src = spm.SentencePieceProcessor(model_proto=src_model)
        self.tgt = self.src if self.joint else spm.SentencePieceProcessor(model_proto=tgt_model)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
        self.pieces = None  # id -> piece, when the ids are not SentencePiece's
        if vocab is not None:
            self.protos += (vocab,)
            self._map(json.loads(vocab))
        self.fingerprint = hashlib.sha256(b"".join(self.protos)).hexdigest()

    def _map(self, vocab: dict[str, int]) -> None:
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("the vocabulary's ids are not 0, 1, ... without gaps")
        self.vocab, self.pieces = vocab, sorted(vocab, key=vocab.get)
        # Marian's decoder starts from <pad>, and has no <s>.
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = vocab["<pad>"], vocab["<unk>"], vocab["<pad>"], vocab["</s>"]

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        if (folder / "spm.model").is_file():
            return cls((folder / "spm.model").read_bytes())
        if (folder / "src.model").is_file() and (folder / "tgt.model").is_file():
            vocab = folder / "vocab.json"
            return cls((folder / "src.model").read_bytes(), (folder / "tgt.model").read_bytes(),
                       vocab.read_bytes() if vocab.is_file() else None)
        raise MtkitError(f"no tokenizer in {folder} (expected spm.model, or src.model and tgt.model)",
                         hint="train one first: mtkit tokenizer train CONFIG")

    def save(self, folder: Path) -> None:
        names = ("spm",) if self.joint else ("src", "tgt")
        for name, proto, sp in zip(names, self.protos, (self.src, self.tgt)):
            (folder / f"{name}.model").write_bytes(proto)
            # The .vocab listing is for people: one piece and its score per line, id = line - 1.
            vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
            (folder / f"{name}.vocab").write_text(vocab, encoding="utf-8")
        if self.pieces is not None:
            (folder / "vocab.json").write_bytes(self.protos[2])

    @property
    def one_vocabulary(self) -> bool:
        """Do source and target ids name the same pieces (so that their embeddings can be shared)?"""
        return self.joint or self.pieces is not None

    @property
    def src_vocab_size(self) -> int:
        return len(self.pieces) if self.pieces is not None else self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return len(self.pieces) if self.pieces is not None else self.tgt.get_piece_size()

    def encode_src(self, lines: Sequence[str], threads: int = 1, sampling: float = 0.0, seed: int = 0) -> list[list[int]]:
        """sampling > 0: each line cut one of its many ways, drawn (subword regularization); the
        same lines, sampling and seed give the same cuts."""
        return self._encode(self.src, lines, threads, sampling, seed)

    def encode_tgt(self, lines: Sequence[str], threads: int = 1, sampling: float = 0.0, seed: int = 0) -> list[list[int]]:
        return self._encode(self.tgt, lines, threads, sampling, seed)

    def _encode(self, sp: spm.SentencePieceProcessor, lines: Sequence[str], threads: int,
                sampling: float = 0.0, seed: int = 0) -> list[list[int]]:
        how = {"num_threads": threads}
        if sampling:
            # SentencePiece encodes a list on fresh threads, each drawing from the process-wide
            # seed from the start: a call's cuts depend on that seed alone (and on the thread
            # count, so one thread), and two calls with one seed draw the same.
            spm.set_random_generator_seed(seed)
            how = {"enable_sampling": True, "alpha": sampling, "nbest_size": -1, "num_threads": 1}
        if self.pieces is None:
            return sp.encode(list(lines), out_type=int, **how)
        # Through the vocabulary by the pieces' text, as Marian does: a character SentencePiece
        # does not know comes out as itself, and has an id when the vocabulary holds it. A
        # multilingual Marian model is told the target language by a first token such as >>fra<<,
        # which is one piece of the vocabulary, never cut by SentencePiece.
        codes = [line[:line.find("<<") + 2] if line.startswith(">>") and "<<" in line else "" for line in lines]
        rows = sp.encode([line[len(code):] for line, code in zip(lines, codes)], out_type=str, **how)
        unk = self.unk_id
        return [[self.vocab.get(p, unk) for p in ([code] if code else []) + row] for code, row in zip(codes, rows)]

    def src_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.pieces[i] for i in ids] if self.pieces is not None else self.src.id_to_piece(list(ids))

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.pieces[i] for i in ids] if self.pieces is not None else self.tgt.id_to_piece(list(ids))

    def tgt_ids(self, pieces: Sequence[str]) -> list[int]:
        """Target pieces -> ids (what CTranslate2 hands back are pieces)."""
        if self.pieces is None:
            return self.tgt.piece_to_id(list(pieces))
        return [self.vocab.get(p, self.unk_id) for p in pieces]

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Output ids -> one line of text each. A model with byte_fallback can emit the pieces of
        any byte, <0x0A> (a newline) and <0x09> (a tab) among them; they would split an output
        line or a TSV row, so every line break, tab and control character becomes a space (the
        training text had none: corpus.normalize made them spaces)."""
        if self.pieces is not None:
            texts = self.tgt.decode([self.tgt_pieces(seq) for seq in ids])
        else:
            texts = self.tgt.decode([list(map(int, seq)) for seq in ids])
        # strip: a model may end on a lone word-boundary piece, which decodes to a trailing space.
        return [_BREAKS.sub(" ", text).strip() for text in texts]
