"""The bad-input table, generated: every argument and option of every command, read from the Typer
app itself, is given each extreme value (empty, NaN, infinity, negative, zero, huge, a number too
big for any integer, a word where a number goes) on an otherwise good command line. Each must end
in exit 0 or exit 2 with one `error:` line, never a traceback: a new option is in this table the
moment it exists. The hand-written rows (tests/test_bad_input*.py) keep the semantic cases and
their exact messages."""

import shutil

import pytest
import typer

from mtkit.cli import app

EXTREMES = ["", "nan", "inf", "-1", "0", "1e308", "9" * 30, "true"]

# A good command line for each command: its arguments in order, and its options. X is a copy of a
# trained experiment (config.yaml, run/ and two small text files), W its workdir, C its config.
GOOD = {
    "prepare": (["C"], {}),
    "run": (["C"], {}),
    "train": (["C"], {"--resume": None}),
    "tokenizer train": (["C"], {}),
    "translate": (["W"], {"--input": "X/input.txt", "--output": "X/out.txt"}),
    "export": (["W"], {"--output": "X/ct2"}),
    "attention": (["W", "A dog runs."], {"--output": "X/a.png"}),
    "explore": (["W", "A dog runs."], {"--output": "X/e.html"}),
    "plot": (["W"], {"--output": "X/p.png"}),
    "serve": (["W"], {"--port": "0"}),  # with the server's loop stubbed: it returns at once
    "eval": ([], {"--hyp": "X/input.txt", "--ref": "X/input.txt"}),
    "average": (["W/checkpoints/best.pt"], {"--output": "X/avg.pt"}),
    "config show": (["C"], {}),
    "import marian": (["X/marian"], {"--output": "X/imported"}),  # no Marian model here: refused
}


def leaf_commands(command, path=()):
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from leaf_commands(sub, (*path, name))
    if not getattr(command, "commands", None):
        yield " ".join(path), command


def rows() -> list[tuple[str, str, str | None]]:
    """(command, option or argument name, value): each extreme for each parameter; a flag alone."""
    found = []
    for name, command in leaf_commands(typer.main.get_command(app)):
        for param in command.params:
            if param.name == "help":
                continue
            label = param.opts[0] if param.param_type_name == "option" else param.name
            values = [None] if getattr(param, "is_flag", False) else EXTREMES
            found += [(name, label, value) for value in values]
    return found


ROWS = rows()


def test_the_table_covers_every_command_and_has_a_good_line_for_each():
    commands = {name for name, _ in leaf_commands(typer.main.get_command(app))}
    assert commands == set(GOOD)
    assert len({(c, p) for c, p, _ in ROWS}) > 60  # every parameter of them


@pytest.fixture(scope="module")
def experiment(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("options") / "x"
    shutil.copytree(trained.parent, folder, symlinks=True)
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace(str(trained), str(folder / "run")))
    (folder / "input.txt").write_text("A dog runs.\nTwo cats.\n")
    return folder


def run_line(cli, experiment, command, param=None, value=None):
    """The command's good line, with `param` (an argument's name or an option) set to `value`
    (None: a flag given alone); returns (argv, exit code, stdout, stderr)."""
    names = {"X": experiment, "W": experiment / "run", "C": experiment / "config.yaml"}

    def place(text: str) -> str:
        return str(names[text[0]]) + text[1:] if text[:1] in names and text[1:2] in ("", "/") else text

    arguments, options = GOOD[command]
    arguments, options = [place(a) for a in arguments], {k: v and place(v) for k, v in options.items()}
    positional = [p.name for p in dict(leaf_commands(typer.main.get_command(app)))[command].params
                  if p.param_type_name == "argument"]
    if param in positional:
        i = positional.index(param)
        arguments += [""] * (i + 1 - len(arguments))  # (eval's CONFIG: optional, not in its good line)
        arguments[i] = value
    elif param is not None:
        options[param] = value
    argv = [*command.split(), *arguments, *(a for k, v in options.items() for a in ([k] if v is None else [k, v]))]
    return (argv, *cli(*argv))


@pytest.fixture
def sandbox(monkeypatch, tmp_path):
    """In a folder of its own (a value taken as a relative path lands there); serve's loop returns at once."""
    monkeypatch.chdir(tmp_path)
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)


@pytest.mark.parametrize("command", sorted(GOOD))
def test_each_good_line_is_taken(cli, experiment, sandbox, command):
    """So that an extreme refused is refused for its own value, not for the line around it."""
    argv, code, _, err = run_line(cli, experiment, command)
    assert code == (2 if command == "import marian" else 0), (argv, err)


@pytest.mark.parametrize("command, param, value", ROWS, ids=[f"{c} {p} {v!r}" for c, p, v in ROWS])
def test_an_extreme_value_is_taken_or_refused_never_a_traceback(cli, experiment, sandbox, command, param, value):
    argv, code, out, err = run_line(cli, experiment, command, param, value)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in out + err
    if code == 2:
        assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
