"""The experiment config: one YAML file, one pydantic section per stage.

This module is the only home of defaults. `load_config(path, overrides)` reads the YAML, merges
`--set a.b=c` overrides, validates, and turns every mistake into one message that names the file,
the line, the dotted key and the fix (the text side of that: config_text.py). `configs/base.yaml`
documents every key.
"""

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from mtkit.config_text import Checked, all_keys, apply_override, config_error, divisors_near, key_lines
from mtkit.errors import MtkitError

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
# A split is a file prefix / split name / file path (one string), or two aligned text files.
SplitSpec = Union[str, tuple[str, str]]
LANGUAGE = r"^[A-Za-z0-9_]+$"  # a language code has no '-': it would split a direction (use pt_br)


class Section(Checked):
    model_config = ConfigDict(frozen=True)


class ExperimentSection(Section):
    name: str = "experiment"
    workdir: Path | None = None  # None: runs/<name>
    seed: int = 1


class CorpusSpec(Section):
    """One entry of data.corpora: a folder of {split}.{lang} text files, the direction read from
    it, its split names, and its weight in training's draw."""

    dir: Path
    src: Annotated[str, Field(pattern=LANGUAGE)]
    tgt: Annotated[str, Field(pattern=LANGUAGE)]
    train: SplitSpec = "train"
    valid: SplitSpec = "valid"
    test: SplitSpec = "test"
    weight: Annotated[float, Field(gt=0.0)] = 1.0


class DataSection(Section):
    format: Literal["text", "tsv", "hf", "demo"] = "text"
    dir: Path = Path("data")
    src: str | None = None
    tgt: str | None = None
    # Several translation directions over one folder of {split}.{lang} files, e.g. [de-en, fr-en], instead
    # of src/tgt: one model for all (with a target-language tag when it has more than one target language).
    directions: tuple[str, ...] = ()
    # ... or several corpora, each in its own folder: [{dir, src, tgt, train, valid, test, weight}].
    corpora: tuple[CorpusSpec, ...] = ()
    # With several directions, how train batches draw from them: 1 = as their sizes are; T > 1
    # draws direction d with probability proportional to weight_d * size_d ** (1 / T).
    temperature: Annotated[float, Field(ge=1.0)] = 1.0
    # Languages of the directions also trained to restore their own sentences from a noisy copy
    # (corpus.noised), which teaches a multilingual model to read its tag: zero-shot (docs/data.md);
    # denoise_weight: their weight in the draw, against that of the direction their text is from.
    denoise: tuple[Annotated[str, Field(pattern=LANGUAGE)], ...] = ()
    denoise_weight: Annotated[float, Field(gt=0.0)] = 1.0
    # Directions without pairs (zero-shot) learned from the model's own translations while it trains
    # (backtranslation.py): e.g. [de-fr, fr-de] when it trains de<->en and fr<->en.
    backtranslate: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+-[A-Za-z0-9_]+$")], ...] = ()
    train: SplitSpec = "train"
    valid: SplitSpec = "valid"
    test: SplitSpec = "test"
    hf_dataset: str | None = None
    hf_config: str | None = None
    streaming: bool = False
    src_field: str | None = None
    tgt_field: str | None = None
    encoding_errors: Literal["strict", "replace"] = "strict"
    min_len: PositiveInt = 1
    max_len: PositiveInt = 100
    max_ratio: Annotated[float, Field(ge=1.0)] = 3.0
    dedup: bool = True
    # Subword regularization: train on copies of the train split each cut by SentencePiece's sampling (BPE-dropout's
    # merge-drop probability for bpe, the smoothing alpha for unigram), a new copy each epoch; 0 = one deterministic
    # cut; valid, test and translation never sample. sampled_sides: "src" leaves the decoder one spelling a word.
    subword_sampling: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    sampled_copies: PositiveInt = 16
    sampled_sides: Literal["both", "src", "tgt"] = "both"

    @model_validator(mode="after")
    def _check(self) -> "DataSection":
        if self.directions and self.corpora:
            raise ValueError("give data.directions (one folder) or data.corpora (a folder each), not both")
        if self.directions or self.corpora:
            key = "data.directions" if self.directions else "data.corpora"
            if self.src is not None or self.tgt is not None:
                raise ValueError(f"give data.src and data.tgt (one direction) or {key} (several), not both")
            if self.format != "text" and not (self.format == "demo" and self.directions):
                raise ValueError(f"{key} reads {{split}}.{{lang}} files: it needs data.format: text (or demo, directions)")
            for direction in self.directions:
                if not re.fullmatch(r"[A-Za-z0-9_]+-[A-Za-z0-9_]+", direction):
                    raise ValueError(f"data.directions: {direction!r} is not a direction: write source-target, "
                                     f"e.g. de-en (a language code without '-', e.g. pt_br)")
            if len(set(self.names)) < len(self.names):
                raise ValueError(f"{key} names a direction twice: {', '.join(self.names)}")
            for p in self.parts:
                if p.src == p.tgt:
                    raise ValueError(f"{key}: {p.src}-{p.tgt} translates a language into itself (see data.denoise)")
            if unknown := sorted(set(self.denoise) - {lang for p in self.parts for lang in (p.src, p.tgt)}):
                raise ValueError(f"data.denoise: {', '.join(unknown)} is in none of the directions, whose files give its text")
            if self.denoise_weight != 1.0 and not self.denoise:
                raise ValueError("data.denoise_weight weighs data.denoise's copies in the draw: set data.denoise too (e.g. [de, fr])")
            for d in self.backtranslate:
                if len(set(d.split("-"))) < 2 or not set(d.split("-")) <= set(self.targets):
                    raise ValueError(f"data.backtranslate: {d} needs two of the model's target languages ({', '.join(self.targets)})")
            return self._check_lengths()
        if extra := [k for k in ("temperature", "denoise", "denoise_weight", "backtranslate") if getattr(self, k) not in (1.0, ())]:
            raise ValueError(f"data.{extra[0]} is for several directions: it needs data.directions or data.corpora")
        if self.src is None and self.tgt is None:
            raise ValueError("data.src and data.tgt name the languages (e.g. de and en), or data.directions "
                             "several directions (e.g. [de-en, fr-en])")
        if self.src is None or self.tgt is None:
            raise ValueError(f"`data.{'tgt' if self.tgt is None else 'src'}` is required (with "
                             f"data.{'src' if self.tgt is None else 'tgt'}): the other language's code")
        if self.src == self.tgt:
            raise ValueError(f"data.src and data.tgt are both {self.src!r}; they must differ")
        return self._check_lengths()

    def _check_lengths(self) -> "DataSection":
        if self.min_len > self.max_len:
            raise ValueError(f"data.min_len ({self.min_len}) is above data.max_len ({self.max_len})")
        if self.streaming and self.format != "hf":
            raise ValueError("data.streaming reads HF datasets: it needs data.format: hf")
        if self.sampled_sides != "both" and not self.subword_sampling:
            raise ValueError(f"data.sampled_sides: {self.sampled_sides} samples nothing while data.subword_sampling is 0: "
                             f"set it too (0.1 is usual)")
        if self.format == "demo" and not {lang for pair in self.pairs for lang in pair} <= {"en", "vs", "sv"}:
            raise ValueError("the demo corpus has languages en, vs and sv (Veshi backwards): set data.src/data.tgt "
                             "or data.directions to them")
        return self

    @property
    def parts(self) -> list[CorpusSpec]:
        """Each direction with its folder and split names (data.corpora, or data.directions in data.dir); [] for one pair."""
        return list(self.corpora) or [self._corpus(*d.split("-")) for d in self.directions]

    def _corpus(self, src: str, tgt: str) -> CorpusSpec:
        return CorpusSpec(dir=self.dir, src=src, tgt=tgt, train=self.train, valid=self.valid, test=self.test)

    @property
    def denoising(self) -> list[CorpusSpec]:
        """data.denoise's languages, each into itself (train only), from the first direction's folder that has it."""
        return [(p := next(p for p in self.parts if lang in (p.src, p.tgt))).model_copy(
                update={"src": lang, "tgt": lang, "weight": p.weight * self.denoise_weight}) for lang in dict.fromkeys(self.denoise)]

    @property
    def names(self) -> list[str]:
        """The directions' names, e.g. ['de-en', 'fr-en']; [] for a single pair."""
        return [f"{p.src}-{p.tgt}" for p in self.parts]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (source, target) languages of every direction, or src and tgt."""
        return [(p.src, p.tgt) for p in [*self.parts, *self.denoising]] or [(self.src, self.tgt)]

    languages = property(lambda self: {"directions": self.names} if self.names else {"src": self.src, "tgt": self.tgt},
                         doc="The languages as the stages record them (a single pair as it always was).")

    targets = property(lambda self: sorted({tgt for _, tgt in self.pairs}), doc="The target languages.")

    tagged = property(lambda self: len(self.targets) > 1, doc="A model of several target languages is told which by a tag "
                      "before the source, <2xx> (Johnson et al. 2017).")

    def source_args(self, split: str, direction: str | None = None) -> dict:
        """What corpus.source_for needs to find `split`, as plain values: of every direction, or of one
        (untagged: a translator adds the tag). A direction not trained (zero-shot) is read from data.dir."""
        one = self._corpus(*direction.split("-", 1)) if direction else self
        one = next((p for p in self.parts if f"{p.src}-{p.tgt}" == direction), one)
        several = {} if direction or not self.parts else dict(
            directions=[(p.src, p.tgt, p.dir, getattr(p, split))
                        for p in [*self.parts, *(self.denoising if split == "train" else [])]], tagged=self.tagged)
        return dict(split=split, spec=getattr(one, split), format=self.format, root=one.dir, src=one.src,
                    tgt=one.tgt, encoding_errors=self.encoding_errors, hf_dataset=self.hf_dataset,
                    hf_config=self.hf_config, src_field=self.src_field, tgt_field=self.tgt_field,
                    streaming=self.streaming, **several)


class TokenizerSection(Section):
    type: Literal["bpe", "unigram"] = "bpe"
    joint: bool = True
    vocab_size: Annotated[int, Field(ge=8)] = 8000
    character_coverage: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    byte_fallback: bool = False
    sample_pairs: PositiveInt = 1_000_000
    threads: PositiveInt = 1


class ModelSection(Section):
    d_model: PositiveInt = 256
    heads: PositiveInt = 4
    enc_layers: PositiveInt = 3
    dec_layers: PositiveInt = 3
    ff_dim: PositiveInt = 1024
    dropout: Fraction = 0.1
    attention_dropout: Fraction = 0.0
    activation: Literal["relu", "gelu", "silu"] = "relu"
    norm: Literal["pre", "post"] = "pre"
    positions: Literal["sinusoidal", "sinusoidal-halves", "learned"] = "sinusoidal"
    tie_embeddings: bool = True
    logits_bias: bool = False
    max_positions: PositiveInt = 256
    no_residual_layer: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSection":
        if self.d_model % self.heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.heads ({self.heads}); e.g. "
                             f"heads {' or '.join(map(str, divisors_near(self.d_model, self.heads)))}")
        if self.positions.startswith("sinusoidal") and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even model.d_model (got {self.d_model})")
        if self.no_residual_layer is not None and self.no_residual_layer > self.enc_layers:
            raise ValueError(f"model.no_residual_layer {self.no_residual_layer} of {self.enc_layers} encoder layers: one of "
                             f"1-{self.enc_layers} (the middle: {self.enc_layers // 2 + 1}), or null for none")
        return self


class TrainSection(Section):
    max_tokens: PositiveInt = 4096
    accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    betas: tuple[Fraction, Fraction] = (0.9, 0.98)
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    schedule: Literal["inverse_sqrt", "noam", "cosine"] = "inverse_sqrt"
    warmup: Annotated[int, Field(ge=0)] = 1000
    label_smoothing: Fraction = 0.1
    rdrop: Annotated[float, Field(ge=0.0)] = 0.0
    clip: Annotated[float, Field(ge=0.0)] = 1.0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: Annotated[int, Field(ge=0)] = 0
    max_steps: PositiveInt = 100_000
    max_epochs: PositiveInt | None = None
    max_time: Annotated[float, Field(gt=0.0)] | None = None
    log_every: PositiveInt = 100
    eval_every: PositiveInt = 1000
    eval_sample: Annotated[int, Field(ge=0)] = 0
    save_every: PositiveInt = 1000
    keep_last: PositiveInt = 3
    patience: Annotated[int, Field(ge=0)] = 0
    average_last: Annotated[int, Field(ge=0)] = 0
    ema: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    max_nonfinite: PositiveInt = 10
    tensorboard: bool = False
    fast: bool = True  # false: the textbook model and loss alone, without fast.py's speed (the same model)
    # Start from a trained model (a checkpoint or a workdir: its best.pt): its tokenizer, shape and
    # weights; optimizer, schedule and progress start fresh (lineage.py).
    init: Path | None = None
    freeze: tuple[Literal["embeddings", "encoder", "decoder"], ...] = ()  # parts of it kept as they are

    @model_validator(mode="after")
    def _check(self) -> "TrainSection":
        if self.freeze and not self.init:
            raise ValueError("train.freeze keeps parts of a trained model as they are: it needs train.init")
        if {"embeddings", "encoder", "decoder"} <= set(self.freeze):
            raise ValueError("train.freeze names every part of the model: nothing would be trained")
        if self.average_last > self.keep_last:
            raise ValueError(f"train.average_last ({self.average_last}) needs that many checkpoints kept: "
                             f"raise train.keep_last ({self.keep_last}) to {self.average_last} or more")
        return self


class DecodeSection(Section):
    # Bounded where more is only a mistake (a beam of 1e9, alpha 1e308: tracebacks; max_len_a 1e308: one token).
    beam_size: Annotated[int, Field(gt=0, le=1024)] = 5
    alpha: Annotated[float, Field(ge=0.0, le=10.0)] = 0.6
    n_best: Annotated[int, Field(gt=0, le=1024)] = 1
    max_len_a: Annotated[float, Field(ge=0.0, le=100.0)] = 1.5
    max_len_b: Annotated[int, Field(ge=0, le=10_000)] = 10
    max_tokens: Annotated[int, Field(gt=0, le=10_000_000)] = 2000

    @model_validator(mode="after")
    def _check(self) -> "DecodeSection":
        if self.n_best > self.beam_size:
            raise ValueError(f"decode.n_best ({self.n_best}) cannot exceed decode.beam_size ({self.beam_size})")
        return self


# sacreBLEU's BLEU tokenizers that need nothing downloaded (spm and flores fetch a model at run time).
BleuTokenizer = Literal["auto", "13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none"]


class EvalSection(Section):
    split: Literal["valid", "test"] = "test"
    checkpoint: Literal["best", "averaged"] = "best"
    metrics: tuple[Literal["bleu", "chrf", "ter"], ...] = ("bleu", "chrf", "ter")
    tokenize: BleuTokenizer = "auto"  # auto: from data.tgt, as sacreBLEU's command line chooses

    @field_validator("metrics")
    @classmethod
    def _nonempty(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("eval.metrics needs at least one of bleu, chrf, ter")
        return v


class ServeSection(Section):
    max_lines: PositiveInt = 1000
    max_chars: PositiveInt = 100_000
    max_beam_size: Annotated[int, Field(gt=0, le=1024)] = 16  # and n_best: a request's search is bounded
    max_body_bytes: PositiveInt = 1_000_000  # refused before it is read further, let alone parsed
    batch_wait_ms: Annotated[float, Field(ge=0.0, le=1000.0)] = 50.0


class Config(Section):
    experiment: ExperimentSection = ExperimentSection()
    data: DataSection
    tokenizer: TokenizerSection = TokenizerSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    decode: DecodeSection = DecodeSection()
    eval: EvalSection = EvalSection()
    serve: ServeSection = ServeSection()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.model.max_positions < self.data.max_len + 2:
            raise ValueError(f"model.max_positions ({self.model.max_positions}) must hold data.max_len ({self.data.max_len}) "
                             f"plus BOS and EOS: raise it to {self.data.max_len + 2} or more")
        if self.eval.checkpoint == "averaged" and self.train.average_last < 2:
            raise ValueError("eval.checkpoint averaged needs train.average_last of 2 or more "
                             "(it scores <workdir>/checkpoints/averaged.pt, which training writes)")
        if self.data.backtranslate and not self.tokenizer.joint:
            raise ValueError("data.backtranslate feeds the model's outputs back in as sources: it needs tokenizer.joint: true")
        return self

    @property
    def eval_checkpoint(self) -> Path:
        """The checkpoint `mtkit run` and `mtkit eval` score: best.pt or averaged.pt (eval.checkpoint)."""
        return self.workdir / "checkpoints" / f"{self.eval.checkpoint}.pt"

    # The workdir layout: every stage finds its inputs and outputs here.
    @property
    def workdir(self) -> Path:
        return self.experiment.workdir or Path("runs") / self.experiment.name

    @property
    def tokenizer_dir(self) -> Path:
        return self.workdir / "tokenizer"

    @property
    def data_cache_dir(self) -> Path:
        return self.workdir / "data"


def to_yaml(cfg: Config) -> str:
    """The resolved config (every default, the workdir spelled out) as YAML that loads back to it:
    readable Unicode, or escaped where PyYAML would write a character it cannot read back (U+0085)."""
    resolved = cfg.model_dump(mode="json")
    resolved["experiment"]["workdir"] = str(cfg.workdir)
    text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    return text if yaml.safe_load(text) == resolved else yaml.safe_dump(resolved, sort_keys=False)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override and validate an experiment config; MtkitError on any mistake."""
    if isinstance(overrides, str):  # it would be taken for a list of one-character overrides
        raise TypeError(f"overrides is a list of 'key=value' strings, not one string: [{overrides!r}]")
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MtkitError(f"config file not found: {path}", hint="check the path (see configs/)")
    except OSError as e:
        raise MtkitError(f"cannot read config file {path}: {e.strerror}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MtkitError(f"{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x}); a config is UTF-8 text",
                         hint="save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        lines = key_lines(yaml.compose(text))
    except MtkitError as e:
        raise MtkitError(f"invalid config {path}: {e.message}", hint="delete one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise MtkitError(f"{where}: YAML syntax error: {problem}",
                         hint="check indentation and quoting on that line or the one before")
    if not isinstance(raw or {}, dict):
        raise MtkitError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    raw = {name: {} if section is None else section for name, section in (raw or {}).items()}  # `train:` alone: defaults
    set_by_override = {apply_override(raw, item): item for item in overrides}
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise config_error(path, e, lines, set_by_override, all_keys(Config)) from None

