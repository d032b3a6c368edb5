"""The `mtkit` command line: one Typer app whose subcommands are the pipeline's stages.

Heavy modules (torch, datasets, the stages) are imported inside the commands, so `mtkit --help`
answers at once. A user's mistake (MtkitError) is printed as one message with a hint and exit
code 2, never as a traceback.
"""

import errno
import functools
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtkit.errors import MtkitError

app = typer.Typer(
    name="mtkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Machine translation you can read: SentencePiece -> prepare -> Transformer -> beam search -> sacreBLEU.",
)
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train the SentencePiece tokenizer.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect experiment configs.")
import_app = typer.Typer(no_args_is_help=True, help="Bring in a model trained elsewhere.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(config_app, name="config")
app.add_typer(import_app, name="import")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. configs/demo.yaml.",
                                           show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.lr=5e-4 (repeatable).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even when its output is up to date.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu, cuda or mps (Apple).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="Decode in auto (the training precision where the "
                                           "device computes it natively, else fp32), fp32, bf16 or fp16 (GPU).")]
InitOpt = Annotated[Optional[Path], typer.Option("--init", help="Start from this trained model (a checkpoint, or a "
                                                 "workdir: its best.pt): --set train.init=PATH.")]
TgtLangOpt = Annotated[Optional[str], typer.Option("--tgt-lang", help="The language to translate into (needed by a "
                                                   "model trained on several).")]


def _with_init(overrides: Optional[list[str]], init: Optional[Path]) -> list[str]:
    return [*(overrides or []), *([f"train.init={init}"] if init else [])]


def _load(config: Path, overrides: Optional[list[str]], writes: bool = True):
    """The validated config; for a stage that writes, also a workdir proven writable."""
    from mtkit.config import load_config
    from mtkit.files import ensure_writable_dir

    cfg = load_config(config, overrides or [])
    if writes:
        ensure_writable_dir(cfg.workdir, "the workdir", "set experiment.workdir to a folder you can write, "
                                                         "e.g. --set experiment.workdir=runs/mine", create=False)
    return cfg


@tokenizer_app.command("train")
def tokenizer_train(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Train the SentencePiece model(s) on the train split (into <workdir>/tokenizer)."""
    from mtkit.train_tokenizer import train_tokenizer

    train_tokenizer(_load(config, set_), force=force)


@app.command()
def prepare(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Normalize, filter and encode every split into a memory-mapped cache (<workdir>/data),
    training the tokenizer first when it is missing or stale."""
    from mtkit.pipeline import prepare_data

    prepare_data(_load(config, set_), force=force)


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, init: InitOpt = None) -> None:
    """Run every stage of the experiment in order, skipping those whose output is current."""
    from mtkit.pipeline import run as run_pipeline

    run_pipeline(_load(config, _with_init(set_, init)))


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, init: InitOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue from <workdir>/checkpoints/last.pt.")] = False
          ) -> None:
    """Train the Transformer (building the tokenizer and prepared data first when missing or stale)."""
    from mtkit.pipeline import prepare_and_train

    result = prepare_and_train(_load(config, _with_init(set_, init)), resume=resume)
    if result.stopped_by == "interrupted":
        raise typer.Exit(code=130)


def _say_lineage(translator) -> None:
    """A fine-tuned model says what it was fine-tuned from (train.init), back to the first run; an
    imported one where it came from."""
    from mtkit.console import info
    from mtkit.lineage import describe

    if translator.init_from or translator.imported_from:
        info(f"translate: {translator.path}, " + (f"fine-tuned from {describe(translator.init_from)}"
             if translator.init_from else f"imported from {translator.imported_from['source']}"))


@app.command()
def translate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file, or an experiment workdir (uses its best.pt).",
                                               show_default=False)],
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Text to translate (default: stdin).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write (default: stdout).")] = None,
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, help="Beam size (default: the experiment's decode.beam_size).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy search (same as --beam 1).")] = False,
    alpha: Annotated[Optional[float], typer.Option("--alpha", min=0.0, help="Length penalty exponent.")] = None,
    nbest: Annotated[Optional[int], typer.Option("--nbest", min=1, help="Write N hypotheses per line as TSV: line, score, text.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Source tokens per batch.")] = None,
    attention: Annotated[Optional[Path], typer.Option("--attention", help="Also draw each line's attention map into this folder (NNNNNN.png).")] = None,
    tgt_lang: TgtLangOpt = None,
    engine: Annotated[str, typer.Option("--engine", help="mtkit, or ctranslate2 (CHECKPOINT is then a folder from mtkit export).")] = "mtkit",
    compute_type: Annotated[str, typer.Option("--compute-type", help="With --engine ctranslate2: int8, float32, ... (default: as exported).")] = "default",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    set_: SetOpt = None,
) -> None:
    """Translate text: one output line per input line, always (an empty line gives an empty line)."""
    from mtkit.config import DecodeSection
    from mtkit.config_text import section_overrides
    from mtkit.files import ensure_writable_dir
    from mtkit.line_io import translate_file
    from mtkit.translate import Translator

    if greedy and beam not in (None, 1):
        raise MtkitError("--greedy and --beam contradict each other", hint="use one of them")
    if engine not in ("mtkit", "ctranslate2"):
        raise MtkitError(f"--engine {engine!r}: mtkit or ctranslate2")
    if attention is not None and engine == "mtkit":
        ensure_writable_dir(attention, "--attention", "name a folder to write the maps in", create=False)
    overrides = section_overrides(set_, "translate", {"decode": DecodeSection})["decode"]
    if engine == "ctranslate2":
        from mtkit.export import CT2Translator

        if attention:
            raise MtkitError("attention maps need mtkit's own engine", hint="drop --engine ctranslate2")
        if precision != "auto":
            raise MtkitError("--precision is mtkit's engine's setting", hint="CTranslate2's is --compute-type")
        translator = CT2Translator.load(checkpoint, compute_type, device)
    else:
        if compute_type != "default":
            raise MtkitError(f"--compute-type {compute_type} is CTranslate2's setting",
                             hint="add --engine ctranslate2 (with a folder from mtkit export), or drop it")
        translator = Translator.load(checkpoint, device, precision)
        _say_lineage(translator)
    options = dict(beam_size=1 if greedy else beam, alpha=alpha, n_best=nbest, max_tokens=max_tokens)
    overrides.update({k: v for k, v in options.items() if v is not None})  # an option not given keeps --set's
    opts = translator.options(**overrides)
    translator.tag_for(tgt_lang)  # a missing or unknown --tgt-lang is said before any input is read
    draw = search = None
    if attention is not None:
        from mtkit.figures import attention_png  # matplotlib: only when asked for
        search = functools.partial(translator.search, attention=True)  # mtkit's engine keeps the attention

        def draw(number: int, line: str, ids: list[int], best) -> None:
            attention.mkdir(parents=True, exist_ok=True)  # made with the first map, not before a refusal
            attention_png(translator.attention_map(line, ids, best), attention / f"{number:06d}.png")
    translate_file(translator, input, output, opts, draw, tgt_lang, search=search)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file, or an experiment workdir (uses its best.pt).",
                                               show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The folder to write.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="ctranslate2 (the only one so far).")] = "ctranslate2",
    quantization: Annotated[Optional[str], typer.Option("--quantization", help="Store the weights as int8, float16, ... (default: float32; int8 can also be chosen when translating).")] = None,
) -> None:
    """Export a model for another inference engine (CTranslate2: pip install 'mtkit\\[ct2]')."""
    from mtkit.console import info
    from mtkit.export import export_ctranslate2

    if format != "ctranslate2":
        raise MtkitError(f"--format {format!r}: only ctranslate2 is supported")
    export_ctranslate2(checkpoint, output, quantization)
    info(f"exported -> {output} (translate with: mtkit translate --engine ctranslate2 {shlex.quote(str(output))})")


@import_app.command("marian")
def import_marian(
    source: Annotated[str, typer.Argument(help="A MarianMTModel folder (as save_pretrained writes it), or a hub "
                                          "name such as Helsinki-NLP/opus-mt-de-en (needs a network).",
                                          show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The workdir to write (new or empty).",
                                         show_default=False)],
) -> None:
    """Import an OPUS-MT/Marian model (pip install 'mtkit\\[hf]'): it then translates, exports and fine-tunes (--init) as
    any mtkit model."""
    from mtkit.console import info
    from mtkit.marian import import_marian as run_import

    path = run_import(source, output)
    where = shlex.quote(str(output))
    info(f"imported -> {path} (translate with: mtkit translate {where}; fine-tune with: mtkit run CONFIG --init {where})")


@app.command("attention")
def attention_(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file, or an experiment workdir (uses its best.pt).",
                                               show_default=False)],
    sentence: Annotated[str, typer.Argument(help="The source sentence to translate.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG to draw.")] = Path("attention.png"),
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, help="Beam size (default: the experiment's decode.beam_size).")] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Only this decoder layer (1 = the first).")] = None,
    head: Annotated[Optional[int], typer.Option("--head", help="Only this head (1 = the first).")] = None,
    tgt_lang: TgtLangOpt = None,
) -> None:
    """Translate one sentence and draw where each output subword looked in the source
    (cross-attention: one heatmap per layer and head, and the heads' mean)."""
    from mtkit.console import console, table
    from mtkit.figures import attention_png, check_picture_path
    from mtkit.translate import Translator

    check_picture_path(output)
    translator = Translator.load(checkpoint)
    amap = translator.attention(sentence, tgt_lang, **({"beam_size": beam} if beam else {}))
    attention_png(amap, output, layer, head)
    last = amap.weights.shape[1] if layer is None else layer
    t = table(f"{amap.translation}  (score {amap.score:.3f}); layer {last}, heads averaged",
              ["target subword", "looks most at", "weight"])
    for target, source, weight in amap.strongest(last - 1):
        t.add_row(target, source, f"{weight:.2f} " + "█" * round(weight * 10))
    console.print(t)
    console.print(f"attention map -> {output}")


@app.command()
def explore(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file, or an experiment workdir (uses its best.pt).",
                                               show_default=False)],
    sentence: Annotated[str, typer.Argument(help="The source sentence to translate.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML page to write.")] = Path("explorer.html"),
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, max=16, help="Beam size (default: the experiment's decode.beam_size).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", min=0.0, max=5.0, help="Length penalty exponent (default: the experiment's).")] = None,
    whatif: Annotated[Optional[str], typer.Option("--whatif", help="Also score this translation of the sentence, subword by subword.")] = None,
    tgt_lang: TgtLangOpt = None,
) -> None:
    """Write the Translation Explorer for one sentence as one self-contained HTML page: its
    subwords, the search tree (beam and greedy), the attention, and a what-if score. `mtkit serve`
    serves the same page, live."""
    from mtkit.explain import explore_page
    from mtkit.translate import Translator

    explore_page(Translator.load(checkpoint), sentence, output, whatif, tgt_lang, beam_size=beam, alpha=alpha)


@app.command()
def plot(workdir: Annotated[Path, typer.Argument(help="An experiment workdir (or its metrics.jsonl); a run in progress too.",
                                                 show_default=False)],
         output: Annotated[Path, typer.Option("--output", "-o", help="The PNG to draw.")] = Path("curves.png")) -> None:
    """Draw a run's learning curves: train and valid loss, valid BLEU, learning rate, tokens/s."""
    from mtkit.console import info
    from mtkit.figures import check_picture_path, curves_png

    curves_png(workdir, check_picture_path(output))
    info(f"learning curves -> {output}")


@app.command()
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file, or an experiment workdir (uses its best.pt).",
                                               show_default=False)],
    host: Annotated[str, typer.Option("--host", help="The address to listen on; 0.0.0.0 exposes the server to the "
                                                     "network (it has no authentication: put it behind a proxy).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="The port (0: any free one, printed).")] = 8000,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    set_: SetOpt = None,
) -> None:
    """Serve the model over HTTP/JSON (POST /v1/translate; API docs at /docs), searching concurrent
    requests together. Needs pip install 'mtkit\\[serve]'."""
    try:
        from mtkit.serve import serve as run_server
    except ImportError as e:
        raise MtkitError(f"mtkit serve needs {e.name or 'FastAPI and uvicorn'}",
                         hint="pip install 'mtkit[serve]' (or: pip install fastapi uvicorn)") from None
    from mtkit.config import DecodeSection, ServeSection
    from mtkit.config_text import section_overrides

    overrides = section_overrides(set_, "serve", {"decode": DecodeSection, "serve": ServeSection})
    run_server(checkpoint, host=host, port=port, device=device, precision=precision, decode=overrides["decode"],
               limits=overrides["serve"])


@app.command("eval")
def eval_(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment config: translate a split with its eval.checkpoint (best.pt or averaged.pt) and score it.",
                                                     show_default=False)] = None,
    hyp: Annotated[Optional[list[Path]], typer.Option("--hyp", help="Score this file of translations (instead of CONFIG); "
                                                       "repeat it to compare systems, the first being the baseline.")] = None,
    ref: Annotated[Optional[list[Path]], typer.Option("--ref", help="A reference file (repeatable for several references).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="valid or test (default: eval.split).")] = None,
    beam: Annotated[Optional[int], typer.Option("--beam", min=1, help="Beam size (default: decode.beam_size).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Another checkpoint than the config's eval.checkpoint (a file, or a workdir: its best.pt).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option("--bootstrap", min=1, max=10_000, help="Paired bootstrap resampling with this many "
                                                     "samples (1000 is usual): 95% confidence intervals, and p-values "
                                                     "against the first --hyp.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (bleu, chrf, ter) to stdout.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    tokenize: Annotated[Optional[str], typer.Option("--tokenize", help="BLEU's tokenizer: 13a, intl, zh, ja-mecab, "
                                                    "ko-mecab, char or none (default: files 13a, an experiment its "
                                                    "eval.tokenize, auto: from the target language).")] = None,
    direction: Annotated[Optional[str], typer.Option("--direction", help="With a CONFIG: score this direction, e.g. "
                                                      "de-fr (default: each of the experiment's).")] = None,
    set_: SetOpt = None,
) -> None:
    """Score translations with sacreBLEU (BLEU, chrF, TER, with signatures): files, or an experiment."""
    import typing

    from mtkit import evaluate
    from mtkit.config import BleuTokenizer

    choices = typing.get_args(BleuTokenizer)
    if tokenize is not None and tokenize not in choices:
        raise MtkitError(f"--tokenize {tokenize!r}: one of {', '.join(choices)}")
    if hyp:
        _check_file_options(config, ref, tokenize, [
            name for name, value in (("--split", split), ("--beam", beam), ("--checkpoint", checkpoint), ("--set", set_),
                                     ("--device", device != "auto"), ("--precision", precision != "auto"),
                                     ("--direction", direction)) if value])
        metrics = ("bleu", "chrf", "ter")
        results = [evaluate.score_files(hyp, ref, tokenize or "13a", bootstrap)]
    else:
        if bootstrap:
            raise MtkitError("--bootstrap compares files: give them with --hyp and --ref",
                             hint="mtkit eval --hyp base.txt --hyp new.txt --ref ref.txt --bootstrap 1000")
        if config is None:
            raise MtkitError("name an experiment CONFIG, or files with --hyp and --ref",
                             hint="mtkit eval configs/demo.yaml  or  mtkit eval --hyp out.txt --ref ref.txt")
        if ref:
            raise MtkitError("--ref goes with --hyp: an experiment CONFIG scores against its own references",
                             hint="drop --ref, or score files: mtkit eval --hyp out.txt --ref ref.txt")
        if split not in (None, "valid", "test"):
            raise MtkitError(f"--split must be valid or test, not {split!r}")
        cfg = _load(config, [*(set_ or []), *([f"eval.tokenize={tokenize}"] if tokenize else [])])
        metrics = cfg.eval.metrics
        results = [evaluate.evaluate_split(cfg, split, beam, checkpoint, device, precision, d)
                   for d in evaluate.directions_to_score(cfg, direction)]
    _report(results, metrics, as_json, bootstrap)


def _report(results: list[dict], metrics, as_json: bool, bootstrap) -> None:
    """mtkit eval's output: tables, or JSON (several directions: one object each, by name)."""
    import json

    from mtkit import evaluate

    scores = [] if bootstrap else [{k: r[k] for k in (*metrics, "sentences", "language") if k in r} for r in results]
    if as_json:
        typer.echo(json.dumps(results[0] if bootstrap else scores[0] if len(results) == 1 else
                              {r["split"]: score for r, score in zip(results, scores)}))
    elif bootstrap:
        evaluate.print_bootstrap(results[0], metrics)
    else:
        for result in results:
            evaluate.print_scores(result, metrics)


def _check_file_options(config: Path | None, ref: list[Path] | None, tokenize: str | None, given: list[str]) -> None:
    """mtkit eval --hyp: what scoring files refuses (the options that choose what an experiment translates)."""
    if config is not None or not ref:
        raise MtkitError("--hyp needs --ref and no CONFIG", hint="mtkit eval --hyp out.txt --ref ref.txt")
    if given:  # they choose what an experiment translates: files are already translated
        raise MtkitError(f"{', '.join(given)} apply to an experiment CONFIG, not to --hyp files",
                         hint="drop " + ", ".join(given))
    if tokenize == "auto":
        raise MtkitError("--tokenize auto takes the target language from an experiment's config",
                         hint="with --hyp, name the tokenizer, e.g. --tokenize zh")


@app.command()
def average(checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to average (same model); a workdir "
                                                                   "gives its kept step checkpoints.")],
            output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the averaged checkpoint.")]
            ) -> None:
    """Average the weights of several checkpoints into one (often a little better than any of them)."""
    from mtkit import checkpoint
    from mtkit.console import info
    from mtkit.files import check_output

    check_output(output, example="averaged.pt")
    paths = []
    for path in checkpoints:  # a workdir: its kept step checkpoints
        found = checkpoint.step_checkpoints(path) if path.is_dir() else [path]
        if not found:
            raise MtkitError(f"{path} holds no step checkpoints (checkpoints/step_*.pt)",
                             hint="name a workdir whose run saved some (train.save_every, train.keep_last), or checkpoint files")
        paths += found
    checkpoints = paths
    checkpoint.save(checkpoint.average(checkpoints), output)
    info(f"averaged {len(checkpoints)} checkpoint{'s' * (len(checkpoints) != 1)} -> {output}")


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved config: the file, the --set overrides and every default."""
    from mtkit.config import to_yaml

    cfg = _load(config, set_, writes=False)
    overrides = "".join(f" --set {o}" for o in set_ or [])
    typer.echo(f"# resolved from {config}{overrides}")
    typer.echo(to_yaml(cfg), nl=False)


# The flag of each setting that an error of the stages and the core names by its concept (MtkitError.setting).
FLAGS = {"target_lang": "--tgt-lang", "input": "--input", "output": "--output", "device": "--device", "precision":
         "--precision", "quantization": "--quantization", "compute_type": "--compute-type", "direction": "--direction",
         "bootstrap": "--bootstrap", "host": "--host", "layer": "--layer", "head": "--head", "engine": "--engine",
         "beam_size": "--beam", "translation": "--whatif"}
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _usage_error(e: typer.TyperException) -> MtkitError:
    """click's own refusals (an unknown option, a value out of range, a missing argument) in
    mtkit's words: one `error:` line naming the option and the value, a hint to the command's help."""
    context = getattr(e, "ctx", None)
    return MtkitError(e.format_message(), hint=f"see {context.command_path if context else 'mtkit'} --help")


def main(argv: Optional[list[str]] = None) -> None:
    try:
        # standalone_mode=False: click's usage errors come here, to be told like every other error.
        code = app(args=argv, prog_name="mtkit", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as a code
            raise SystemExit(code)
    except typer.Abort:  # Ctrl-C or the end of input at a prompt
        raise SystemExit(130) from None
    except typer.TyperException as e:  # typer's copy of click's exceptions (typer >= 0.29)
        if type(e).__name__ == "NoArgsIsHelpError":  # `mtkit` alone: the help, as click shows it
            e.show()
            raise SystemExit(e.exit_code) from None
        from mtkit.console import print_error

        print_error(_usage_error(e))
        raise SystemExit(2) from None
    except MtkitError as e:
        from mtkit.console import print_error

        print_error(MtkitError(f"{FLAGS[e.setting]}: {e.message}", e.hint) if e.setting in FLAGS else e)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except OSError as e:
        # A full disk or a read-only place is the machine's state, not a bug: one message. The
        # stages write atomically, so whatever was finished before is intact. (A closed output
        # pipe, `mtkit translate ... | head`, never gets here: click ends it quietly, exit code 1.)
        if e.errno not in _ENVIRONMENT_ERRORS:
            raise
        from mtkit.console import print_error

        print_error(MtkitError(f"cannot write {e.filename or 'the output'}: {e.strerror}",
                               hint="free disk space or fix permissions, then run again (what was finished before "
                                    "is kept, checkpoints included)"))
        raise SystemExit(2) from None
