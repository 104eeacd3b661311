"""More bad input: numbers out of range, FIFOs, unreachable model paths, odd GGUF versions, stray *.gguf files and
garbled PDFs each end in one clear sentence (or argparse's one error line) and a non-zero exit, never a traceback
or a hang."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from cli_helpers import assert_one_sentence, run_cli
from edgectx.chat.documents import read_document
from edgectx.cli.main import build_parser, main
from edgectx.config import Config
from edgectx.errors import DocumentError, ModelFileError, UnsupportedModelError
from edgectx.model.discover import discover, resolve_model
from edgectx.model.gguf import open_gguf
from edgectx.model.hf import open_hf_dir
from edgectx.model.source import open_model
from test_documents import TWO_PAGES, make_pdf
from tiny_gguf import write_tiny_gguf

# --- numbers ------------------------------------------------------------------------------------------------

BIG = str(2**64)
HEADS_TRAIN = ["heads", "train", "--text", "notes.md"]
PLAN = ["plan", "--synthetic", "llama-3.1-8b"]
BAD_NUMBERS = [  # (command, flag, bad values); the flag's name is what argparse's error line names
    (["chat"], "--max-file-mib", ["nan", "inf", "-inf", "0", "0.0000001", "-1", "abc", "1e400", "2000000"]),
    (["chat"], "--budget", ["lots", "10", "0", "99999999", "nan", BIG]),
    (["chat"], "--chunk", ["0", "-5", "1.5", "99999"]),
    (["chat"], "--threads", ["0", "-1", "nan", "99999"]),
    (["chat"], "--ctx", ["0", "-1", "1e9", BIG]),
    (["chat"], "--max-tokens", ["0", "-3", "nan"]),
    (["chat"], "--temperature", ["nan", "inf", "-0.1", "6"]),
    (["chat"], "--top-k", ["-1", "nan", BIG]),
    (["chat"], "--top-p", ["nan", "1.5", "-0.1"]),
    (["chat"], "--repeat-penalty", ["0", "-1", "nan", "inf"]),
    (["chat"], "--seed", ["-1", BIG, "nan"]),
    (["chat"], "--resume", ["0", "-1", str(2**63), "abc"]),
    (["tui"], "--top-p", ["nan"]),
    (["ingest"], "--max-file-mib", ["nan", "inf", "0.0000001"]),
    (["ingest"], "--budget", ["full", "10"]),
    (["cache", "rm"], "ID", ["0", "-1", str(2**63), "x"]),
    (["cache", "gc"], "--max-bytes", ["-1", "1e400", "9" * 400, "lots"]),
    (["export"], "id", ["0", str(2**63)]),
    (HEADS_TRAIN, "--max-file-mib", ["inf", "nan", "1e-9"]),
    (HEADS_TRAIN, "--hidden", ["0", "-1"]),
    (HEADS_TRAIN, "--tokens", ["-1", "1.5"]),
    (HEADS_TRAIN, "--steps", ["0"]),
    (HEADS_TRAIN, "--seq-len", ["0", "-1"]),
    (HEADS_TRAIN, "--offset", ["-1"]),
    (HEADS_TRAIN, "--span", ["0"]),
    (HEADS_TRAIN, "--top-weight", ["nan", "-1", "inf"]),
    (["heads", "info"], "--threads", ["0"]),
    (["bench", "conformance"], "--tokens", ["0", "1"]),
    (["bench", "speed"], "--context", ["0", "1,abc", BIG]),
    (["bench", "speed"], "--decode-tokens", ["0"]),
    (["bench", "speed"], "--gpu-mem-cap-gib", ["nan", "0", "inf", "-1"]),
    (["bench", "speed"], "--bandwidth-gbs", ["0", "nan"]),
    (["bench", "fidelity"], "--context", ["1"]),
    (["bench", "fidelity"], "--budget", ["10,2048", ","]),
    (["bench", "longppl"], "--full-max", ["-1"]),
    (["bench", "longppl"], "--context", ["0"]),
    (["bench", "memory"], "--contexts", ["0", "nan"]),
    (["bench", "reopen"], "--next-tokens", ["1"]),
    (["bench", "reopen"], "--context", ["0"]),
    (["bench", "tui-latency"], "--presses", ["0"]),
    (["bench", "tui-latency"], "--context", ["0"]),
    (PLAN, "--context", ["0", "-1", BIG]),
    (PLAN, "--gpu-mem-gib", ["nan", "0", "inf", "-1"]),
    (PLAN, "--host-mem-gib", ["nan", "0"]),
]


def _usage_line(stderr: str, flag: str, value: str) -> str:
    """argparse's error: usage lines, then one `PROG: error: argument FLAG: WHY` line naming the value."""
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in line, stderr
    assert (value.split(",")[0] or value) in line, line  # a list names its first bad element
    return line


@pytest.mark.parametrize("command, flag, value", [(c, f, v) for c, f, values in BAD_NUMBERS for v in values],
                         ids=lambda x: " ".join(x) if isinstance(x, list) else x[:12])
def test_bad_number_is_one_argparse_error(command, flag, value, capsys):
    """The parser `edgectx.cli.main.run` uses, alone: a value it let through would run the command here."""
    argv = command + ([value] if flag in ("ID", "id") else [f"{flag}={value}"])  # `=`: "-1" is a value, not a flag
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    _usage_line(capsys.readouterr().err, flag, value)


def test_edge_values_are_accepted():
    parse = build_parser().parse_args
    assert int(parse(["chat", "--max-file-mib", "0.000001"]).max_file_mib * 2**20) == 1  # one byte
    args = parse(["chat", "--temperature", "0", "--top-k", "0", "--top-p", "1", "--seed", "0", "--budget", "full"])
    assert (args.temperature, args.top_k, args.top_p, args.seed, args.budget) == (0, 0, 1, 0, "full")
    assert parse(["cache", "gc", "--max-bytes", "0"]).max_bytes == 0
    args = parse(HEADS_TRAIN + ["--offset", "0", "--top-weight", "0", "--tokens", "0"])
    assert (args.offset, args.top_weight, args.tokens) == (0, 0, 0)
    assert parse(["bench", "fidelity", "--budget", "2048,1024"]).budget == [2048, 1024]


@pytest.mark.parametrize("argv, flag, value", [
    (["chat", "--doc", "notes.md", "--max-file-mib", "nan"], "--max-file-mib", "nan"),
    (["ingest", "notes.md", "--max-file-mib", "inf"], "--max-file-mib", "inf"),
    (HEADS_TRAIN + ["--max-file-mib", "0.0000001"], "--max-file-mib", "0.0000001"),
    (["cache", "rm", "99999999999999999999"], "ID", "99999999999999999999"),
])
def test_bad_number_through_the_real_command(argv, flag, value):
    result = run_cli(*argv, timeout=60)
    assert result.returncode == 2
    _usage_line(result.stderr, flag, value)


def test_one_byte_limit_refuses_a_two_byte_document(tmp_path):
    doc = tmp_path / "two.txt"
    doc.write_text("hi")
    assert_one_sentence(run_cli("chat", "--doc", str(doc), "--max-file-mib", "0.000001", "--prompt", "hi", timeout=60),
                        "over the 1 bytes limit")


# --- a model path that cannot be reached --------------------------------------------------------------------

@pytest.fixture
def locked_model(tmp_path, monkeypatch):
    """A model inside a folder that cannot be entered. Tests run as root, which chmod 000 does not stop, so
    os.stat (what Path.exists/is_file/is_dir call) raises PermissionError for the folder's paths, as it
    would for a user without search permission on it."""
    locked = tmp_path / "locked"
    locked.mkdir()
    model = write_tiny_gguf(locked / "m.gguf")
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    return model


def test_model_in_unreachable_folder_is_one_sentence(locked_model, capsys):
    with pytest.raises(ModelFileError, match="Permission denied"):
        resolve_model(str(locked_model), Config())
    for loader in (open_gguf, open_model, open_hf_dir):
        with pytest.raises(ModelFileError):
            loader(locked_model)
    listed = discover(Config(model_paths=(str(locked_model.parent), str(locked_model))))
    assert [e for e in listed if e.source == "config"] == []  # skipped without an error
    for argv in (["plan", "--model", str(locked_model), "--context", "100", "--gpu-mem-gib", "1"],
                 ["heads", "info", "--model", str(locked_model)]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("edgectx: Permission denied"), err


# --- FIFOs: refused at once, never waited on ----------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["chat", "--model", "{fifo}.gguf", "--prompt", "hi"], ("named pipe", "not a model file")),
    (["plan", "--model", "{fifo}.gguf", "--context", "100", "--gpu-mem-gib", "1"], ("named pipe",)),
    (["heads", "info", "--model", "{fifo}.gguf"], ("named pipe",)),
    (["chat", "--doc", "{fifo}.txt", "--prompt", "hi"], ("named pipe", "nothing writes")),
    (["ingest", "{fifo}.txt"], ("named pipe", "nothing writes")),
])
def test_fifo_is_refused_without_hanging(tmp_path, argv, words):
    fifo = tmp_path / "fifo"
    argv = [a.format(fifo=fifo) for a in argv]
    os.mkfifo(next(a for a in argv if a.startswith(str(fifo))))
    start = time.monotonic()
    assert_one_sentence(run_cli(*argv, timeout=60), *words)  # a hang is subprocess.TimeoutExpired
    assert time.monotonic() - start < 60


def test_pipe_whose_writer_starts_a_little_later_is_read(tmp_path):
    fifo = tmp_path / "late.txt"
    os.mkfifo(fifo)

    def write_later():
        time.sleep(0.3)
        fifo.write_bytes(b"late words\n")

    writer = threading.Thread(target=write_later, daemon=True)
    writer.start()
    assert read_document(fifo).text == "late words\n"
    writer.join(timeout=10)


# --- GGUF version ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, version", [((7).to_bytes(4, "little"), 7), ((1).to_bytes(4, "little"), 1),
                                            ((7).to_bytes(4, "big"), 7), (b"\xff\xff\xff\xff", 2**32 - 1)])
def test_unsupported_gguf_version(tmp_path, field, version):
    path = write_tiny_gguf(tmp_path / "v.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = field
    path.write_bytes(data)
    with pytest.raises(UnsupportedModelError, match=f"GGUF version {version}, .*versions 2 and 3"):
        open_gguf(path)
    if version == 7 and field[0] == 7:
        result = run_cli("chat", "--model", str(path), "--prompt", "hi", timeout=120)
        assert_one_sentence(result, "GGUF version 7", "2 and 3")
        assert "corrupt" not in result.stderr


# --- `edgectx models` -------------------------------------------------------------------------------------------

def test_models_lists_only_regular_files_with_the_gguf_magic(tmp_path):
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    write_tiny_gguf(folder / "sub" / "good.gguf")
    (folder / "empty.gguf").write_bytes(b"")
    (folder / "short.gguf").write_bytes(b"GG")
    (folder / "noise.gguf").write_bytes(b"\0" + random.Random(0).randbytes(4096))
    (folder / "notes.gguf").write_text("not a model\n")
    (folder / "folder.gguf").mkdir()
    os.mkfifo(folder / "pipe.gguf")
    Path(os.environ["EDGECTX_CONFIG"]).write_text(f"model_paths = [{json.dumps(str(folder))}]\n")
    result = run_cli("models", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    listed = [(e["name"], e["path"]) for e in json.loads(result.stdout) if e["source"] == "config"]
    assert listed == [("good", str(folder / "sub" / "good.gguf"))]


# --- PDFs: garbled is not "scanned" ---------------------------------------------------------------------------

def test_garbled_pdf_cannot_be_read_as_a_pdf(tmp_path):
    path = tmp_path / "garbled.pdf"
    path.write_bytes(make_pdf(TWO_PAGES).replace(b"/Type /Pages", b"/Type \x01Pages"))  # same length: xref still right
    with pytest.raises(DocumentError) as error:
        read_document(path)
    message = str(error.value)
    assert "cannot be read as a PDF" in message and "damaged or not a PDF" in message and "scanned" not in message
    assert_one_sentence(run_cli("chat", "--doc", str(path), "--prompt", "hi", timeout=60), "cannot be read as a PDF")


def test_valid_pdf_without_text_is_still_scanned(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([None]))
    with pytest.raises(DocumentError, match="its page is probably scanned images") as error:
        read_document(path)
    assert "cannot be read" not in str(error.value)
