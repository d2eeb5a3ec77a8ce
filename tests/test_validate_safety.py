"""`edgeprune validate` on a folder an attacker wrote: only plain names inside the folder, every artifact listed, no
unlisted file, well-formed entries, numeric .npy arrays only, and an optional HMAC signature (--key-file)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_validate import MODEL
from typer.testing import CliRunner

from edgeprune import build
from edgeprune.cli import app
from edgeprune.pipeline import BuildOptions
from edgeprune.target import Budget


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate-safety")
    (root / "net.py").write_text(MODEL)
    options = BuildOptions(model=f"{root / 'net.py'}:net", input_shape=(1, 3, 32, 32), budget=Budget(latency_ms=1000.0),
                           out=root / "out")  # fmt: skip
    build(options, say=lambda message: None)
    return root / "out"


@pytest.fixture
def out(built, tmp_path) -> Path:
    """A copy of the build's output, this test's to alter."""
    return Path(shutil.copytree(built, tmp_path / "out"))


def run(*args: str):
    return CliRunner().invoke(app, ["validate", *args], catch_exceptions=False)


def edit(out: Path, name: str, change) -> None:
    data = json.loads((out / name).read_text())
    change(data)
    (out / name).write_text(json.dumps(data))


def relist(out: Path, *names: str) -> None:
    """Record the current size and sha256 of ``names`` in the manifest, as a forger who rewrites it would."""

    def change(manifest: dict) -> None:
        for name in names:
            body = (out / name).read_bytes()
            manifest["files"][name] = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}

    edit(out, "manifest.json", change)


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def verdict(result) -> str:
    assert result.exit_code == 1, result.output
    return result.stdout.strip()


def test_an_absolute_path_in_the_manifest_says_nothing_of_the_file(out):
    """The message for a path that exists outside the folder is the one for a path that does not."""
    messages = []
    for name in ("/etc/passwd", "/no/such/file"):
        edit(out, "manifest.json", lambda m, name=name: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
        message = one_line_error(run(str(out)))
        assert "is not an edgeprune output folder" in message and "not a plain file name" in message
        messages.append(message.replace(name, "NAME"))
        edit(out, "manifest.json", lambda m, name=name: m["files"].pop(name))
    assert messages[0] == messages[1]


def test_a_parent_path_in_the_manifest_says_nothing_of_the_file(out):
    (out.parent / "secret").write_text("key")
    messages = []
    for name in ("../secret", "../nothing"):
        edit(out, "manifest.json", lambda m, name=name: m["files"].update({name: {"sha256": "0" * 64, "bytes": 3}}))
        messages.append(one_line_error(run(str(out))).replace(name, "NAME"))
        edit(out, "manifest.json", lambda m, name=name: m["files"].pop(name))
    assert messages[0] == messages[1] and "not a plain file name" in messages[0]


@pytest.mark.parametrize("name", ["sub/model.bin", "..", ".", "", "a\\b", "model.bin\x00"])
def test_a_name_with_a_separator_or_a_dot_name_is_bad_input(out, name):
    edit(out, "manifest.json", lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    assert "not a plain file name" in one_line_error(run(str(out)))


def test_a_symlink_out_of_the_folder_is_refused(out):
    """The link leads to a byte-identical copy outside, so only the rule itself can refuse it."""
    outside = out.parent / "outputs.npy"
    shutil.move(out / "reference_outputs.npy", outside)
    os.symlink(outside, out / "reference_outputs.npy")
    assert "reference_outputs.npy: a symbolic link" in verdict(run(str(out)))


def test_a_symlinked_manifest_is_refused(out):
    shutil.move(out / "manifest.json", out.parent / "manifest.json")
    os.symlink(out.parent / "manifest.json", out / "manifest.json")
    assert "manifest.json is a symbolic link" in one_line_error(run(str(out)))


def test_an_empty_manifest_is_invalid(out):
    edit(out, "manifest.json", lambda m: m.update(files={}))
    line = verdict(run(str(out)))
    assert line.startswith("invalid: manifest.json lists no files") and "model.xml" in line


def test_an_artifact_the_report_names_must_be_listed(out):
    """The ONNX file is gone and the manifest was edited to match: the report still names it."""
    (out / "model.onnx").unlink()
    edit(out, "manifest.json", lambda m: m["files"].pop("model.onnx"))
    assert verdict(run(str(out))) == "invalid: model.onnx: named by report.json but not listed in the manifest"


def test_an_unlisted_file_is_invalid_and_named(out):
    (out / "extra.sh").write_text("rm -rf ~\n")
    (out / "sub").mkdir()
    assert verdict(run(str(out))) == "invalid: extra.sh: not listed in the manifest; sub: not listed in the manifest"


def test_the_size_is_compared_before_the_hash(out):
    with open(out / "model.bin", "ab") as handle:
        handle.write(b"\0")
    size = (out / "model.bin").stat().st_size
    assert verdict(run(str(out))) == f"invalid: model.bin: {size} bytes, the manifest says {size - 1}"


@pytest.mark.parametrize(
    "entry",
    [{"sha256": "xyz", "bytes": 1}, {"sha256": "A" * 64, "bytes": 1}, {"sha256": 5, "bytes": 1},
     {"sha256": "0" * 64, "bytes": "1"}, {"sha256": "0" * 64, "bytes": True}, {"sha256": "0" * 64, "bytes": -1},
     {"sha256": "0" * 64}, "model.bin", None],
)  # fmt: skip
def test_a_malformed_entry_is_bad_input(out, entry):
    edit(out, "manifest.json", lambda m: m["files"].update({"model.bin": entry}))
    assert "is not an edgeprune output folder" in one_line_error(run(str(out)))


@pytest.mark.parametrize("files", [[], "model.bin", None, {"model.bin": [1, 2]}])
def test_a_malformed_files_table_is_bad_input(out, files):
    edit(out, "manifest.json", lambda m: m.update(files=files))
    assert "is not an edgeprune output folder" in one_line_error(run(str(out)))


def _object_array(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, "b"], dtype=object), allow_pickle=True)


def _huge_header(path: Path) -> None:
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        handle.write(b"\0" * 64)


@pytest.mark.parametrize(
    "write",
    [_object_array, _huge_header, lambda p: p.write_bytes(b"not an npy file"), lambda p: np.save(p, np.array(["x"])),
     lambda p: np.savez(p.with_suffix(""), a=np.zeros(3)) or p.with_suffix(".npz").rename(p)],
    ids=["object", "huge-header", "garbage", "strings", "npz"],
)  # fmt: skip
def test_a_reference_array_that_is_not_numeric_is_one_line(out, write):
    write(out / "reference_inputs.npy")
    relist(out, "reference_inputs.npy")
    assert "reference_inputs.npy" in one_line_error(run(str(out)))


@pytest.mark.parametrize("role", ["model", "weights"])
@pytest.mark.parametrize("name", ["/etc/passwd", "../net.py"])
def test_an_artifact_name_in_the_report_must_be_plain(out, role, name):
    edit(out, "report.json", lambda r: r["artifacts"].update({role: name}))
    relist(out, "report.json")
    message = one_line_error(run(str(out)))
    assert "report.json" in message and "not a plain file name" in message


def test_the_report_names_a_target_not_a_file(out):
    messages = []
    for name in ("/etc/passwd", "/no/such.toml"):
        edit(out, "report.json", lambda r, name=name: r.update(target=name))
        relist(out, "report.json")
        messages.append(one_line_error(run(str(out))).replace(name, "NAME"))
    assert messages[0] == messages[1] and "not a target name" in messages[0]


@pytest.mark.parametrize(
    "change, words",
    [(lambda r: r["model"].update(input_shape=[1, 3, 64, 64]), "do not fit report.json's input shape"),
     (lambda r: r["model"].update(input_shape="1,3,32,32"), "lacks the backend, input shape or budget"),
     (lambda r: r.pop("budget"), "lacks the backend, input shape or budget"),
     (lambda r: r["budget"].update(latency_ms="1000"), "lacks the backend, input shape or budget"),
     (lambda r: r.update(backend=None), "lacks the backend, input shape or budget")],
    ids=["shape", "shape-string", "no-budget", "budget-string", "no-backend"],
)  # fmt: skip
def test_a_report_that_does_not_fit_the_build_is_one_line(out, change, words):
    edit(out, "report.json", change)
    relist(out, "report.json")
    assert words in one_line_error(run(str(out)))


@pytest.fixture
def key(tmp_path) -> Path:
    path = tmp_path / "ci.key"
    path.write_bytes(os.urandom(32))
    return path


def test_a_signed_folder_validates_with_its_key(out, key):
    from edgeprune.validate import sign_manifest

    sign_manifest(out, key)
    result = run(str(out), "--key-file", str(key), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["signature_ok"] and "signature verified" in data["verdict"]
    assert run(str(out)).exit_code == 0  # without a key, the signature is not checked


def test_write_manifest_signs_with_a_key(out, key):
    """What a build calls: the manifest it writes with a key validates with the same key file."""
    from edgeprune.validate import file_hashes, write_manifest

    old = json.loads((out / "manifest.json").read_text())
    write_manifest(out, file_hashes(out), old["inputs"], old["versions"], key=key.read_bytes())
    assert len(json.loads((out / "manifest.json").read_text())["signature"]) == 64
    assert run(str(out), "--key-file", str(key)).exit_code == 0


def test_a_forger_who_rewrites_the_manifest_fails_the_signature(out, key):
    from edgeprune.validate import sign_manifest

    sign_manifest(out, key)
    with open(out / "model.bin", "r+b") as handle:
        handle.write(b"\0\0\0\0")
    relist(out, "model.bin")
    assert run(str(out)).exit_code == 0  # the manifest alone cannot tell
    expected = "manifest.json: the signature does not match --key-file (altered, or signed with another key)"
    assert verdict(run(str(out), "--key-file", str(key))) == f"invalid: {expected}"
    edit(out, "manifest.json", lambda m: m.pop("signature"))
    assert verdict(run(str(out), "--key-file", str(key))).startswith("invalid: manifest.json is not signed")


def test_a_wrong_key_fails(out, key, tmp_path):
    from edgeprune.validate import sign_manifest

    sign_manifest(out, key)
    other = tmp_path / "other.key"
    other.write_bytes(b"another secret")
    assert "signature does not match" in verdict(run(str(out), "--key-file", str(other)))


def test_an_unsigned_folder_fails_with_a_key(out, key):
    assert verdict(run(str(out), "--key-file", str(key))).startswith("invalid: manifest.json is not signed")


def test_an_empty_or_missing_key_file_is_bad_input(out, tmp_path):
    (tmp_path / "empty.key").write_bytes(b"")
    assert "is empty" in one_line_error(run(str(out), "--key-file", str(tmp_path / "empty.key")))
    assert "cannot read" in one_line_error(run(str(out), "--key-file", str(tmp_path / "none.key")))


def test_signing_refuses_a_folder_that_does_not_match_its_manifest(out, key):
    from edgeprune.errors import BadInput
    from edgeprune.validate import sign_manifest

    (out / "extra.txt").write_text("x")
    with pytest.raises(BadInput, match="extra.txt: not listed in the manifest"):
        sign_manifest(out, key)
    assert "signature" not in json.loads((out / "manifest.json").read_text())
