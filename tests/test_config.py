import re
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mtkit.config import Config, DataSection, load_config, to_yaml
from mtkit.config_text import all_keys
from mtkit.errors import MtkitError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "data:\n  src: de\n  tgt: en\n"


def error_of(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(MtkitError) as info:
        load_config(path, overrides)
    return info.value.message


def test_base_yaml_documents_every_key_with_its_default():
    text = (REPO / "configs" / "base.yaml").read_text()
    documented = {}
    section = None
    for line in text.splitlines():
        m = re.match(r"^(\s*)([a-z_0-9]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        if not indent:
            section = key
            continue
        documented[f"{section}.{key}"] = rest
    leaf_keys = [k for k in all_keys(Config) if k.count(".") == 1]  # (data.corpora's keys: in its comment)
    assert sorted(documented) == sorted(leaf_keys)
    undocumented = [k for k, rest in documented.items() if "#" not in rest]
    assert undocumented == []
    # base.yaml shows the real defaults: loading it equals the defaults (src/tgt are required).
    base = load_config(REPO / "configs" / "base.yaml")
    defaults = Config(data=DataSection(src=base.data.src, tgt=base.data.tgt))
    assert base == defaults


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_is_named_for_its_file(name):
    """Loading checks each value (it raises otherwise); a config copied to a new file and not
    renamed would write its runs over the original's."""
    cfg = load_config(REPO / "configs" / name)
    stem = name.removesuffix(".yaml")
    if stem != "base":
        assert (cfg.experiment.name, cfg.workdir) == (stem, Path("runs") / stem)


@pytest.mark.parametrize("pair", ["de_en", "en_de", "fr_en"])
def test_the_45_minute_configs_are_the_recipe_their_table_rows_were_measured_with(pair):
    """docs/results.md measured the 45-minute recipe as --set overrides on the 20-minute config
    (run b5; en->de: run b14, fr->en: run b17, the same recipe from another language): each
    shipped config must be exactly that, or its row is not what it reproduces."""
    src, tgt = pair.split("_")
    shipped = load_config(REPO / "configs" / f"multi30k_{pair}.yaml").model_dump()
    measured = load_config(REPO / "configs" / "multi30k_de_en_20min.yaml", [
        "train.max_time=2700", "model.dropout=0.2", f"data.src={src}", f"data.tgt={tgt}",
        f"experiment.name=multi30k_{pair}", f"experiment.workdir=runs/multi30k_{pair}",
    ]).model_dump()
    assert shipped == measured


def test_every_former_recipe_line_in_results_md_is_the_one_its_runs_were_measured_with():
    """docs/results.md rebuilds the former recipe (the shipped configs before the ablations: runs
    r0, b0, b8, b13, b16) as FORMER="--set ..." on top of today's configs. No shipped config keeps
    it any more, so the lines are pinned here: one edited line would rebuild another recipe than
    the one its rows were measured with."""
    lines = re.findall(r'^FORMER="([^"]*)"', (REPO / "docs" / "results.md").read_text(), re.M)
    assert len(lines) >= 5
    former = ["model.dropout=0.3", "train.schedule=inverse_sqrt", "train.warmup=400", "train.max_tokens=4096"]
    for line in lines:
        assert re.findall(r"--set (\S+)", line) == former
    for name in ("multi30k_de_en_20min.yaml", "multi30k_de_en.yaml", "multi30k_en_de.yaml", "multi30k_fr_en.yaml"):
        load_config(REPO / "configs" / name, former)  # raises if a key was renamed or a value is no longer valid


def test_overrides_merge_before_validation_and_are_typed(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 3e-4\n")  # PyYAML reads 3e-4 as a string
    assert load_config(path).train.lr == pytest.approx(3e-4)
    cfg = load_config(path, ["train.lr=5e-4", "model.heads=8", "train.betas=[0.8, 0.9]",
                             "tokenizer.joint=false", "experiment.workdir=/tmp/x", "train.max_time=60"])
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.model.heads == 8
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.tokenizer.joint is False
    assert cfg.workdir == Path("/tmp/x")
    assert cfg.train.max_time == 60.0
    # An override can make an invalid file valid: it is merged first, validated after.
    bad = write(tmp_path, MINIMAL + "model:\n  heads: 3\n")
    assert load_config(bad, ["model.heads=4"]).model.heads == 4


def test_workdir_defaults_to_runs_name(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "experiment:\n  name: abc\n"))
    assert cfg.workdir == Path("runs/abc")
    assert cfg.tokenizer_dir == Path("runs/abc/tokenizer")


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValidationError, match="Instance is frozen"):
        cfg.train.lr = 1.0


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "data.src.x=1"])
def test_malformed_overrides_are_errors(tmp_path, override):
    message = error_of(write(tmp_path, MINIMAL), [override])
    assert "override" in message or "not a section" in message


@pytest.mark.parametrize("key, suggestion", [
    ("train.warmpu", "train.warmup"),     # typo in the right section
    ("train.dropout", "model.dropout"),   # right name, wrong section
    ("modle.d_model", "model"),           # typo in a section name
    ("decode.beam", "decode.beam_size"),
])
def test_unknown_key_names_line_and_closest_key(tmp_path, key, suggestion):
    section, leaf = key.split(".")
    path = write(tmp_path, MINIMAL + f"{section}:\n  {leaf}: 1\n")
    message = error_of(path)
    assert str(path) in message
    assert f"did you mean `{suggestion}`" in message
    line = 4 if suggestion == "model" else 5
    assert f"line {line}:" in message


def test_unknown_key_from_override_says_so(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["train.warmpu=10"])
    assert "(from --set train.warmpu=10)" in message and "train.warmup" in message


def test_all_errors_are_reported_at_once(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "train:\n  lr: x\n  warmpu: 3\n"))
    assert "train.lr" in message and "train.warmpu" in message


def test_config_show_prints_resolved_yaml(cli, tmp_path):
    path = write(tmp_path, MINIMAL)
    code, out, err = cli("config", "show", path, "--set", "train.lr=5e-4")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["train"]["lr"] == 5e-4
    assert shown["model"]["d_model"] == 256  # defaults are shown too
    assert shown["experiment"]["workdir"] == "runs/experiment"
    assert load_config(write(tmp_path, out)).train.lr == 5e-4  # the output is itself a valid config


# Fuzzing (hypothesis): whatever the file and the overrides, the loader returns a config or says
# what is wrong (MtkitError); never another exception. A loaded config shows (`mtkit config show`)
# as YAML that loads back to the same config.

SECTIONS = [k for k in all_keys(Config) if "." not in k]
LEAVES = sorted({k.rpartition(".")[2] for k in all_keys(Config) if "." in k})
VALUES = (st.none() | st.booleans() | st.integers(-10, 100_000) | st.floats(allow_nan=True) | st.text(max_size=8)
          | st.sampled_from(["de", "en", "fr", "bpe", "unigram", "auto", "fp32", "bf16", "best", "demo", "text"])
          | st.lists(st.integers(-2, 5), max_size=3))
SECTION = st.dictionaries(st.sampled_from(LEAVES) | st.text(max_size=6), VALUES, max_size=4)
# Mostly the section's own keys, so that many documents are valid and the round trip is tested too.
DEFAULTS = Config.model_validate({"data": {"src": "de", "tgt": "en"}}).model_dump(mode="json")
OWN_KEYS = st.sampled_from(SECTIONS).flatmap(lambda section: st.tuples(st.just(section), st.dictionaries(
    st.sampled_from(sorted(DEFAULTS[section])), VALUES, max_size=2).flatmap(lambda values: st.fixed_dictionaries(
        {k: st.just(DEFAULTS[section][k]) | st.just(v) for k, v in values.items()}))))
DOCUMENT = (st.lists(OWN_KEYS, max_size=4).map(dict) | st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=6), SECTION | VALUES, max_size=5)).map(
    lambda doc: {**doc, "data": {"src": "de", "tgt": "en", **(doc.get("data") if isinstance(doc.get("data"), dict) else {})}})
OVERRIDE = st.builds("{}={}".format, st.sampled_from(all_keys(Config)) | st.text(max_size=10), st.text(max_size=8))


def loads_or_says_why(path: Path, overrides: list[str]) -> Config | None:
    try:
        return load_config(path, overrides)
    except MtkitError as e:
        assert e.message  # and it is one (the CLI prints it with exit code 2)
        return None


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(doc=DOCUMENT, overrides=st.lists(OVERRIDE, max_size=3))
@example(doc={"experiment": {"workdir": "a\x85b"}, "data": {"src": "de", "tgt": "en"}}, overrides=[])  # found by it
def test_any_mapping_loads_or_says_why(tmp_path_factory, doc, overrides):
    folder = tmp_path_factory.mktemp("config")
    cfg = loads_or_says_why(write(folder, yaml.safe_dump(doc)), overrides)
    if cfg is not None:
        shown = to_yaml(cfg)  # what `mtkit config show` prints
        assert to_yaml(load_config(write(folder, shown))) == shown


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_loads_or_says_why(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("config") / "exp.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    loads_or_says_why(path, [])


def _numbers() -> list[str]:
    """Every number of the config: its dotted key (from the sections themselves, so a new one is in)."""
    from mtkit.config_text import _kinds

    return [f"{name}.{key}" for name, section in Config.model_fields.items()
            for key, field in section.annotation.model_fields.items() if {int, float} & _kinds(field.annotation)]


@pytest.mark.parametrize("value", ["inf", "-.inf", ".nan", "nan", "true", "1e400"])
def test_every_number_is_finite_and_no_bool(tmp_path, value):
    """One rule for every number, whatever its door (YAML, --set; a command's option and an HTTP
    field go through the same sections): decode.max_len_a=inf cut every translation to one word."""
    path = write(tmp_path, MINIMAL)
    keys = _numbers()
    assert "decode.max_len_a" in keys and "train.max_time" in keys and len(keys) > 40
    for key in keys:
        message = error_of(path, [f"{key}={value}"])
        assert key in message, (key, message)


def test_the_translate_and_serve_overrides_are_read_as_every_other_set(cli, tmp_path):
    """mtkit translate --set with broken YAML was a traceback, and --set KEY without = was ignored."""
    from mtkit.config import DecodeSection, ServeSection
    from mtkit.config_text import section_overrides

    decode = {"decode": DecodeSection}
    assert section_overrides(["decode.beam_size=["], "translate", decode) == {"decode": {"beam_size": "["}}
    with pytest.raises(MtkitError, match="bad override 'decode.beam_size'"):
        section_overrides(["decode.beam_size"], "translate", decode)
    with pytest.raises(MtkitError, match="takes only decode.\\* and serve.\\* overrides, not 'train.lr'"):
        section_overrides(["train.lr=1"], "serve", decode | {"serve": ServeSection})
