"""One rule for every output file a user names (-o): a regular file (or a new name) is replaced
atomically; a symlink is followed, so the link stays and its target gets the content; a FIFO or a
device is written through, never renamed over (files.output_file). Checked for each command that
takes an output path."""

import os
import stat
import threading
from pathlib import Path

import pytest

# Each command with an output file: its arguments before `-o PATH`, and how its content begins.
COMMANDS = {
    "translate": (lambda run, tmp: ["translate", run, "-i", _lines(tmp), "--greedy"], b""),
    "average": (lambda run, tmp: ["average", run / "checkpoints/best.pt", run / "checkpoints/last.pt"], b"PK"),
    "attention": (lambda run, tmp: ["attention", run, "the cat sleeps", "--beam", "2"], b"\x89PNG"),
    "plot": (lambda run, tmp: ["plot", run], b"\x89PNG"),
    "explore": (lambda run, tmp: ["explore", run, "the cat sleeps", "--beam", "2"], b"<!"),
}
NAMES = {"attention": "out.png", "plot": "out.png", "explore": "out.html"}


def _lines(tmp: Path) -> Path:
    path = tmp / "in.txt"
    path.write_text("the cat sleeps\n\na dog\n", encoding="utf-8")
    return path


def _check(command: str, content: bytes) -> None:
    assert content.startswith(COMMANDS[command][1])
    if command == "translate":  # one line out per line in
        assert content.count(b"\n") == 3 and content.split(b"\n")[1] == b""
    else:
        assert len(content) > 100


@pytest.mark.parametrize("command", COMMANDS)
def test_a_symlink_is_followed_and_stays_a_link(command, cli, trained, tmp_path):
    args, _ = COMMANDS[command]
    name = NAMES.get(command, "out.txt")
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / name
    target.write_bytes(b"old")
    link = tmp_path / name
    link.symlink_to(target)
    code, _, err = cli(*args(trained, tmp_path), "-o", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    _check(command, target.read_bytes())
    assert [p.name for p in (tmp_path / "real").iterdir()] == [name]  # no temporary left beside it


@pytest.mark.parametrize("command", COMMANDS)
def test_a_fifo_is_written_through(command, cli, trained, tmp_path):
    args, _ = COMMANDS[command]
    fifo = tmp_path / NAMES.get(command, "out.txt")
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = cli(*args(trained, tmp_path), "-o", fifo)
    reader.join(timeout=60)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a file"
    assert got, "the FIFO's reader got nothing"
    _check(command, got[0])


@pytest.mark.parametrize("command", ["translate", "average", "attention"])
def test_a_device_stays_a_device(command, cli, trained, tmp_path):
    """A character device like /dev/null, made in tmp (renaming over the real one, as root,
    would replace it for every program on the machine)."""
    null = tmp_path / ("null.png" if command == "attention" else "null")
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device needs CAP_MKNOD")
    args, _ = COMMANDS[command]
    code, _, err = cli(*args(trained, tmp_path), "-o", null)
    assert code == 0, err
    assert stat.S_ISCHR(os.lstat(null).st_mode), "the device was replaced by a file"


def test_a_regular_output_is_replaced_whole_and_keeps_its_permissions(cli, trained, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("an older translation\n" * 100, encoding="utf-8")
    out.chmod(0o600)
    code, _, err = cli("translate", trained, "-i", _lines(tmp_path), "--greedy", "-o", out)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    _check("translate", out.read_bytes())


def test_what_is_written_through(tmp_path):
    from mtkit.files import written_through

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert written_through(tmp_path / "fifo") and written_through(Path("/dev/null"))
    assert not any(written_through(tmp_path / n) for n in ("file", "link", "dangling", "new", "."))


def test_a_hint_quotes_a_path_with_a_space(cli, trained, tmp_path):
    """A hint is a command line to copy: a path with a space in it was printed bare."""
    folder = tmp_path / "my outputs"
    folder.mkdir()
    code, _, err = cli("translate", trained, "-i", "/dev/null", "-o", folder)
    assert code == 2 and f"e.g. '{folder}/out.txt'" in err, err
    code, _, err = cli("attention", trained, "A dog.", "-o", tmp_path / "my map")
    assert code == 2 and f"e.g. '{tmp_path}/my map.png'" in err, err
